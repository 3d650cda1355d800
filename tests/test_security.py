"""Remote code is never enabled by the library or the recipes: only a user's own explicit choice could."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_no_code_path_turns_on_trust_remote_code():
    offenders = []
    for path in list((ROOT / "trap2_hf").rglob("*.py")) + list((ROOT / "recipes").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.value.lineno}")
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and key.value == "trust_remote_code":
                        if not (isinstance(value, ast.Constant) and value.value is False):
                            offenders.append(f"{path.relative_to(ROOT)}:{value.lineno}")
    assert offenders == []
    for path in (ROOT / "recipes").rglob("*.yaml"):
        assert "trust_remote_code: true" not in path.read_text().lower(), path
