"""The documentation against the code: the generated settings reference is current, every relative link (and
heading anchor) of the manual, docs/, benchmarks/ and recipes/ resolves, and every Python block of docs/ parses."""

import ast
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(
    {ROOT / "README.md", ROOT / "benchmarks" / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("benchmarks/results/*.md"),
     *ROOT.glob("recipes/**/README.md")}
)
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def load_generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_reference_is_current():
    generated = load_generator().render_settings()
    page = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert page == generated, "docs/settings.md is not current: run PYTHONPATH=. python docs/generate.py"


def test_settings_reference_names_every_setting_with_its_help():
    from dataclasses import fields

    from trap2_hf.settings import Trap2Settings

    page = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    for f in fields(Trap2Settings):
        assert f"### `{f.name}`" in page and f.metadata["help"] in page, f.name
    assert "`'inv_sqrt'` in `Trap2SFTConfig`" in page  # a subclass's own default is shown next to the base one


def prose(text: str) -> str:
    """The page without its fenced code blocks and inline code, where brackets are code, not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(prose(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading with anchor #{anchor} in {resolved})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_link_check_finds_a_broken_link(tmp_path):
    (tmp_path / "there.md").write_text("# A heading, here\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md) [ok](there.md#a-heading-here) [web](https://example.org) `[code](nowhere.md)`\n"
        "```\n[in a block](nowhere.md)\n```\n[missing](nowhere.md) [bad anchor](there.md#nope)\n"
    )
    assert [b.split(" ")[0] for b in broken_links(page)] == ["nowhere.md", "there.md#nope"]


@pytest.mark.parametrize("page", sorted(ROOT.glob("docs/*.md")), ids=lambda p: p.name)
def test_python_blocks_parse(page):
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)
    for block in blocks:
        ast.parse(block)
