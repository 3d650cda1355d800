"""The README's examples marked "runs as written" run as written, print what the README shows after them, and
print no warning a user did not cause (PEFT's read of transformers' deprecated `is_gradient_checkpointing`,
torch's `pin_memory` on a machine without an accelerator)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- runs as written"
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def runnable_blocks() -> list[tuple[str, str]]:
    """(code, the output block after it) for every Python block the README marks as running as written."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for part in text.split(MARKER)[1:]:
        fences = FENCE.findall(part)
        assert fences[0][0] == "python", "the marker must precede a ```python block"
        blocks.append((fences[0][1], fences[1][1]))
    return blocks


def test_the_readme_marks_its_runnable_examples():
    codes = [code for code, _ in runnable_blocks()]
    assert len(codes) == 2
    assert "Trap2Trainer(" in codes[0] and "load_protected_adapter(" in codes[0] and "Trap2SFTTrainer(" in codes[1]


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1], ids=["swap_in", "trl"])
def test_readme_example_runs_as_written(tmp_path, index):
    code, shown = runnable_blocks()[index]
    (tmp_path / "example.py").write_text(code)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")  # run from the clone's root, as the README says
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"), "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    # The trainer's log lines carry timings; everything else the example prints is the README's, to the digit.
    printed = [line for line in result.stdout.splitlines() if not line.startswith("{")]
    assert printed == [line for line in shown.splitlines() if not line.startswith("{")]
    for warning in ("is_gradient_checkpointing", "pin_memory", "Warning:"):
        assert warning not in result.stderr, result.stderr[-4000:]


def test_install_commands_work_from_the_clone():
    """The package is not on PyPI: every install command the README shows works in the clone, and `make install`,
    which the Makefile has, is documented."""
    text = (ROOT / "README.md").read_text()
    assert "make install" in text and "pip install -e '.[mergekit]'" in text
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = [line for line in page.read_text().splitlines() if "finds nothing" not in line]
        assert not [line for line in lines if re.search(r"pip install ['\"]?trap2_hf\[", line)], page.name


def test_make_clean_removes_what_the_examples_write():
    # Run inside `make test`, a nested make prints "Entering directory" unless told not to.
    dry_run = subprocess.run(
        ["make", "--no-print-directory", "-n", "clean"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    removed = dry_run.split()
    assert removed[:2] == ["rm", "-rf"] and {".venv", "demo_output", "out", ".pytest_cache"} <= set(removed)
