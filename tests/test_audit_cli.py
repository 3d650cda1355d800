"""`trap2 audit`'s command line: a dataclass parsed by HfArgumentParser, fast to ask for help."""

import subprocess
import sys
from pathlib import Path

import pytest

from trap2_hf.audit.arguments import AuditArguments
from trap2_hf.audit.cli import parse_args
from trap2_hf.audit.settings import DEFAULT_SCALES, MODES, PERTURBATIONS, InformedSettings, RepairSettings

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["--base_model", "base", "--tasks", "tasks.py", "--protected_task", "topic", "--protected", "prot"]


def test_help_imports_neither_torch_nor_a_model_library():
    """`trap2 audit --help` parses the dataclass only: torch, peft and mergekit load after parsing."""
    code = (
        "import sys\nfrom trap2_hf.cli import main\n"
        "try:\n    main(['audit', '--help'])\nexcept SystemExit as exit:\n    assert exit.code == 0\n"
        "print('loaded:', sorted(m for m in ('torch', 'peft', 'mergekit', 'trap2_hf.audit.methods') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "--other TASK=FOLDER" in out and "--public_methods" in out and "mergekit:ties" in out
    assert out.strip().endswith("loaded: []"), out


def test_flags_parse_into_the_dataclass_with_the_settings_defaults():
    args, _ = parse_args(REQUIRED + ["--other", "city=out/city", "--other", "kind=out/kind", "region=out/region"])
    assert args.others == {"city": "out/city", "kind": "out/kind", "region": "out/region"}
    assert args.modes == list(MODES) and args.sweep_scales == list(DEFAULT_SCALES)
    assert args.benign == list(PERTURBATIONS) and args.methods is None and args.target == "adapter"
    assert args.informed_settings() == InformedSettings()
    assert args.repair_settings() is None and args.public_settings().methods is None
    args, _ = parse_args(REQUIRED + [
        "--other", "city=c", "--methods", "ties", "mergekit:della", "--modes", "average", "public", "--benign",
        "--public_methods", "mergekit:della", "--repair_ks", "16", "64", "--repair_rank", "4", "--seed", "3",
        "--target", "full", "--protected_weights", "1", "1.1", "--search_budget", "4", "--no_progress",
    ])
    assert args.methods == ["ties", "mergekit:della"] and args.modes == ["average", "public"] and args.benign == []
    assert args.public_settings().methods == ("mergekit:della",) and args.no_progress and args.target == "full"
    assert args.repair_settings() == RepairSettings(ks=(16, 64), rank=4, seed=3)
    assert args.informed_settings() == InformedSettings(protected_weights=(1.0, 1.1), budget=4)
    assert parse_args(["--list_methods"])[0].list_methods


@pytest.mark.parametrize("argv, message", [
    (REQUIRED[:4], "missing --protected_task, --protected, --other TASK=FOLDER"),
    (REQUIRED + ["--other", "city"], "--other 'city': write TASK=FOLDER"),
    (REQUIRED + ["--other", "c=d", "--modes", "naive"], "argument --modes: invalid choice: 'naive'"),
    (REQUIRED + ["--other", "c=d", "--mergekit_methods", "ties"],
     "--mergekit_methods was removed: mergekit's methods are in the one registry: pass --methods mergekit:ties"),
    (REQUIRED + ["--mergekit_informed", "ties"], "--mergekit_informed was removed: the informed grid runs on"),
])
def test_bad_flags_exit_with_a_message_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        parse_args(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_every_field_has_help_and_no_default_is_written_twice():
    import dataclasses

    fields = dataclasses.fields(AuditArguments)
    assert all(f.metadata.get("help") for f in fields)
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in fields}
    assert defaults["other_weights"] == list(InformedSettings().other_weights)
    assert defaults["repair_methods"] == list(RepairSettings().methods)


def test_transform_flags_build_the_transform_settings():
    from trap2_hf.audit.settings import TransformSettings

    base = ["--base_model", "b", "--tasks", "t.py", "--protected_task", "x", "--protected", "p", "--other", "y=q"]
    args, _ = parse_args(base)
    assert args.transform_settings() == TransformSettings()
    args, _ = parse_args(base + ["--transforms", "--tensor_draws", "2"])
    assert args.transform_settings().kinds == () and args.transform_settings().tensor_draws == 2
    args, _ = parse_args(base + ["--transforms", "trim", "--transform_densities", "0.5"])
    assert args.transform_settings() == TransformSettings(kinds=("trim",), densities=(0.5,))
