"""The `trap2` console command."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "peft", "huggingface_hub")


def test_help_imports_no_heavy_library():
    """`trap2 --help` (and `import trap2_hf`) must not import torch, transformers or TRL: that took seconds."""
    code = (
        "import sys\nfrom trap2_hf.cli import main\nassert main(['--help']) == 0\n"
        f"print('loaded:', sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "card" in out and "audit" in out
    assert out.strip().endswith("loaded: []"), out


def test_card_help_imports_neither_trl_nor_the_trainer():
    """`trap2 card` only reads and writes settings: it must not pay for TRL and transformers' Trainer (seconds)."""
    code = (
        "import sys\nfrom trap2_hf.cli import main\n"
        "try:\n    main(['card', '--help'])\nexcept SystemExit as exit:\n    assert exit.code == 0\n"
        "print('loaded:', sorted(m for m in ('trl', 'transformers.trainer', 'trap2_hf.config') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "--trap_lambda" in out and "--trap_rescaled_fraction" in out
    assert out.strip().endswith("loaded: []"), out


def test_public_names_load_on_first_use():
    import trap2_hf
    import trap2_hf.audit
    import trap2_hf.hub

    for package in (trap2_hf, trap2_hf.audit, trap2_hf.hub):
        assert all(getattr(package, name) is not None for name in package.__all__), package.__name__
    assert trap2_hf.Trap2SFTConfig.__module__ == "trap2_hf.config" and callable(trap2_hf.audit.methods.get)
    assert trap2_hf.hub.load_protected_adapter is trap2_hf.load_protected_adapter
    with pytest.raises(AttributeError, match="not_a_name"):
        trap2_hf.not_a_name
