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


# ----------------------------------------------------------------------------- errors: one line, exit code 2
def run_trap2(*argv, env=None):
    """`trap2 ...` as a user runs it: a new process, so the exit path is the real one."""
    import os

    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "trap2_hf.cli", *argv], cwd=ROOT, env=environment,
                          capture_output=True, text=True)


def test_a_wrong_path_is_one_line_naming_the_closest_folder(tmp_path):
    (tmp_path / "tiny").mkdir()
    result = run_trap2("card", str(tmp_path / "tinyy"), "--trap_lambda", "0.05")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("trap2 card: error: ") and f"did you mean {str(tmp_path / 'tiny')!r}" in result.stderr
    debug = run_trap2("card", str(tmp_path / "tinyy"), "--trap_lambda", "0.05", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr
    assert "Traceback" in run_trap2("card", str(tmp_path / "tinyy"), env={"TRAP2_DEBUG": "1"}).stderr


def test_an_error_of_another_library_names_the_path_given(tmp_path, capsys, monkeypatch):
    """PEFT's "Can't find 'adapter_config.json' at 'out/tinyy'" for a mistyped adapter folder of `trap2 audit`:
    reported as the flag, the path and the closest folder."""
    from trap2_hf.cli_errors import run_command

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "tiny").mkdir(parents=True)

    def audit(argv):  # loads the adapter folder as `trap2 audit` does
        from peft import PeftConfig

        PeftConfig.from_pretrained(argv[1])

    assert run_command(audit, ["--protected", "out/tinyy"], prog="trap2 audit") == 2
    assert capsys.readouterr().err == (
        "trap2 audit: error: --protected: There is no local file or folder 'out/tinyy' (did you mean 'out/tiny'?).\n"
    )


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["card", "f", "--trap_lamda", "0.1"], "trap2 card: error: unknown flag --trap_lamda (did you mean --trap_lambda?)"),
        (["card", "f", "--trap_lambda", "abc"], "trap2 card: error: argument --trap_lambda: invalid float value: 'abc'"),
        (["demo", "--trap_lamda", "0.1"], "trap2 demo: error: unknown flag --trap_lamda (did you mean --trap_lambda?)"),
        (["demo", "--stpes", "3"], "trap2 demo: error: unknown flag --stpes (did you mean --steps?)"),
        (["cards", "f"], "trap2: error: unknown command 'cards' (did you mean card?)"),
    ],
)
def test_bad_flags_are_one_line_with_the_closest_field(argv, expected, capsys):
    from trap2_hf.cli import main

    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own exit, as `trap2` would end
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(expected) and err.count("\n") == 1, err
    assert "usage:" not in err


def test_version():
    from trap2_hf import __version__

    result = run_trap2("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"trap2_hf {__version__}"


def test_a_failed_push_says_how_to_log_in_on_the_command_line(tmp_path, capsys, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from conftest import tiny_llama
    from trap2_hf.cli import main

    folder = str(tmp_path / "adapter")
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    assert main(["card", folder, "--trap_lambda", "0.05", "--push", "me/adapter"]) == 2
    err = capsys.readouterr().err
    assert "`hf auth login` or set the HF_TOKEN environment variable" in err
    assert f"run `trap2 card {folder} --push me/adapter` again" in err
    assert "hub_token" not in err and "push_to_hub()" not in err and err.count("\n") == 1


def test_importing_trap2_hf_drops_only_peft_s_read_of_a_deprecated_name():
    """PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` in every `get_peft_model(...)`: after
    `import trap2_hf` that FutureWarning is gone from the user's own calls (the README's examples); others stay."""
    code = (
        "import warnings\n"
        "from peft import LoraConfig, get_peft_model\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "import trap2_hf\n"
        "config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,\n"
        "                     num_attention_heads=4, num_key_value_heads=2)\n"
        "get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules='all-linear'))\n"
        "try:\n"
        "    warnings.warn('another deprecation', FutureWarning)\n"
        "except FutureWarning:\n"
        "    print('others still raised')\n"
    )
    result = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], cwd=ROOT,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "others still raised"
