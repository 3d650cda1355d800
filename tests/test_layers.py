"""The package's layout: each folder in one layer, no import cycle, no module importing one above its layer, no
private name imported from another module, no module over 400 lines, and the registries that name the same choices
agreeing with each other.

Imports are read from the source (ast), those inside functions included: a lazy import is still a dependency,
and lazy imports once hid a cycle. The tables below are the declared layout; a new module goes into its folder's layer,
a new top-level module or folder into LAYERS.
"""

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "trap2_hf"
MAX_LINES = 400
# The trainer dispatches to the modes, the update kinds and the release; what it grows belongs in one of them.
TRAINER_MAX_LINES = 300

# Lower layers never import higher ones. Each layer lists folders of the package ("audit/": every module in it and
# in its sub-folders) and the package's top-level modules ("settings.py"; "__init__.py" is the package itself).
LAYERS = [
    # 0: facts and small helpers, importing nothing of the package above them (settings stay free of training code):
    # the settings, the choices (trap modes, update kinds, off-ray terms), seed streams, files and checksums,
    # command-line errors, parsing text as settings
    [
        "__init__.py", "_lazy.py", "_warnings.py", "_args.py", "settings.py", "scale_settings.py", "choices/", "seeding.py", "files.py",
        "cli_errors.py",
    ],
    # 1: the maths and the model surgery: objective, re-scaling (adapters, full weights), batches, best responses,
    # update kinds, off-ray terms
    ["objective.py", "rescale/", "batch.py", "best_response.py", "updates.py", "offray/"],
    # 2: the trap modes: their strategies, plans, row draws and the step object they drive
    ["modes/"],
    # 3: the audit's report (verdict, summary, tables, plot), which the audit writes and the card shows
    ["report/"],
    # 4: what a release records, which the trainer writes and the loader reads: the card, its protection block, the
    # upload policy, the push hook
    ["release/"],
    # 5: the trainer and what it is built from
    ["config.py", "trainer.py", "callbacks.py", "checkpoints.py", "launchers.py", "nonfinite.py"],
    # 6: the Hub (loading, `trap2 card`), the audit (its engine, settings and command line, mergekit's backend in
    # audit/mergekit/), the demo, tracing a release in merges
    ["hub/", "audit/", "demo/", "trace/"],
    # 7: the commands
    ["cli.py"],
]

# Imports of a higher layer that are allowed for now, each with why; (importer, imported).
ALLOWED_UPWARD = {}

# Import cycles known and not yet removed, each with why; a set of module names per cycle.
KNOWN_CYCLES = {}

# Modules allowed over MAX_LINES for now, each with why.
LONG_MODULES = {}

# Modules that still compare a trap_mode or trap_target value by name outside `choices/`, each with why.
NAME_COMPARES: dict[str, str] = {}


@functools.cache
def module_files() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def place_of(path: Path) -> str:
    """The entry of LAYERS that holds the module at `path`: its top folder under the package ("audit/"), or the
    top-level file itself ("settings.py")."""
    first, *rest = path.relative_to(PACKAGE).parts
    return f"{first}/" if rest else first


def imported_from(name: str, path: Path, node: ast.ImportFrom) -> str:
    """The module an `ImportFrom` of module `name` (at `path`) reads, relative levels resolved."""
    if not node.level:
        return node.module or ""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its source (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = imported_from(name, path, node)
            candidates = [source] + [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


def private_imports(name: str, path: Path, source: str) -> list[str]:
    """`from x import _name` in module `name` where x is another module of the package: a private name read across
    modules (dunders such as `__version__` are public)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = imported_from(name, path, node)
        if module.split(".")[0] != PACKAGE.name or module == name:
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not (alias.name.startswith("__") and alias.name.endswith("__")):
                found.append(f"{name} line {node.lineno}: from {module} import {alias.name}")
    return found


def layer_of(name: str) -> int | None:
    place = place_of(module_files()[name])
    for index, places in enumerate(LAYERS):
        if place in places:
            return index
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_the_import_reader_sees_relative_lazy_and_package_imports():
    modules = module_files()
    assert {"trap2_hf.settings", "trap2_hf.config", "trap2_hf.modes", "trap2_hf.release.mixin"} <= imports_of(
        "trap2_hf.trainer", modules["trap2_hf.trainer"], modules
    )
    assert "trap2_hf.choices.offray" in imports_of("trap2_hf.settings", modules["trap2_hf.settings"], modules)
    # modes/__init__.py: `from .fused import Fused` is the modes' own file
    assert "trap2_hf.modes.fused" in imports_of("trap2_hf.modes", modules["trap2_hf.modes"], modules)


def test_every_module_has_a_layer(graph):
    assert [name for name in graph if layer_of(name) is None] == []


def test_every_folder_maps_to_one_layer():
    """A folder sits in one layer as a whole (its sub-folders too): LAYERS names only the package's top-level folders
    and modules, each once, and every name there exists, so no module of a folder can be listed elsewhere."""
    listed = [place for places in LAYERS for place in places]
    assert sorted(p for p in set(listed) if listed.count(p) > 1) == []
    existing = {place_of(path) for path in module_files().values()}
    assert sorted(set(listed) - existing) == [], "LAYERS names what is not a top-level folder or module of the package"


def test_no_private_name_is_imported_from_another_module():
    found = [line for name, path in module_files().items() for line in private_imports(name, path, path.read_text())]
    assert found == []


def test_the_private_import_reader_sees_relative_and_absolute_imports():
    path = PACKAGE / "hub" / "load.py"
    source = (
        "from ..files import _tmp, ok\nfrom .. import __version__\nfrom trap2_hf.release.card import _strip\n"
        "def f():\n    from .cli import _helper\nfrom collections import _private_elsewhere\n"
    )
    assert private_imports("trap2_hf.hub.load", path, source) == [
        "trap2_hf.hub.load line 1: from trap2_hf.files import _tmp",
        "trap2_hf.hub.load line 3: from trap2_hf.release.card import _strip",
        "trap2_hf.hub.load line 5: from trap2_hf.hub.cli import _helper",
    ]


def test_no_module_imports_one_above_its_layer(graph):
    upward = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, imported in graph.items()
        for b in sorted(imported)
        if layer_of(b) > layer_of(a) and (a, b) not in ALLOWED_UPWARD
    ]
    assert upward == []
    stale = [edge for edge in ALLOWED_UPWARD if edge[0] in graph and edge[1] not in graph[edge[0]]]
    assert stale == [], "allowed upward imports that no longer exist: drop them from ALLOWED_UPWARD"


def test_no_import_cycle(graph):
    cycles = [c for c in strongly_connected(graph) if len(c) > 1 or next(iter(c)) in graph[next(iter(c))]]
    assert [sorted(c) for c in cycles if c not in KNOWN_CYCLES] == []


def test_no_module_over_the_line_limit():
    lengths = {name: len(path.read_text().splitlines()) for name, path in module_files().items()}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES and name not in LONG_MODULES} == {}
    assert [name for name in LONG_MODULES if lengths.get(name, 0) <= MAX_LINES] == [], "drop them from LONG_MODULES"
    assert lengths["trap2_hf.trainer"] <= TRAINER_MAX_LINES


def test_registries_of_the_same_choices_agree():
    """Each mode and update kind is declared once (`choices/`); the implementations are keyed by the declarations."""
    from trap2_hf import choices, modes, settings, updates
    from trap2_hf.audit import kinds
    from trap2_hf.choices import offray as terms
    from trap2_hf.offray import transforms

    assert set(modes.STRATEGIES) == set(choices.MODES) and set(settings.TRAP_MODES) == {"auto", *choices.MODES}
    assert all(strategy.declared is choices.MODES[name] for name, strategy in modes.STRATEGIES.items())
    assert set(updates.UPDATE_KINDS) == set(settings.TARGETS) == set(kinds.AUDITED_KINDS)
    assert {kind.name for kind in choices.AUTO_ORDER} == set(choices.TARGETS)
    assert all(kind.declared is choices.TARGETS[name] for name, kind in updates.UPDATE_KINDS.items())
    assert all(choice.mode in choices.MODES.values() for order in choices.AUTO_ORDER.values() for choice in order)
    assert all(order[-1].mode is choices.FALLBACK for order in choices.AUTO_ORDER.values())
    assert set(transforms.TRANSFORMS) == set(terms.OWN_PARTS) | {terms.GUARD}
    assert set(transforms.PARTNER_UPDATES) == set(terms.PARTNER_PARTS)
    parts = [*terms.OWN_PARTS.values(), *terms.PARTNER_PARTS.values()]
    assert {r for part in parts for r in part.ranges} <= set(terms.RANGES)
    fields = set(settings.Trap2Settings.__dataclass_fields__)
    assert {f for r in terms.RANGES.values() for f in (r.low, r.high)} <= fields


def test_modes_and_update_kinds_are_compared_by_name_only_where_they_are_declared():
    """`trap_mode` and `trap_target` values are compared only in `choices/`; everyone else asks the declarations."""
    from trap2_hf.choices import AUTO, MODES, TARGETS

    names = set(MODES) | set(TARGETS)

    def constants(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            for element in node.elts:
                yield from constants(element)

    comparing = {}
    for name, path in module_files().items():
        if name.startswith("trap2_hf.choices"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            found = {value for part in [node.left, *node.comparators] for value in constants(part)}
            if found & names or (AUTO in found and "trap_mode" in ast.unparse(node)):
                comparing.setdefault(name, []).append(f"line {node.lineno}: {ast.unparse(node)}")
    assert {name: lines for name, lines in comparing.items() if name not in NAME_COMPARES} == {}
    assert [name for name in NAME_COMPARES if name not in comparing] == [], "drop them from NAME_COMPARES"


def strongly_connected(graph: dict[str, set[str]]) -> list[frozenset]:
    """Tarjan's strongly connected components."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components
