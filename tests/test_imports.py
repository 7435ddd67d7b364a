"""The import graph of `pi_lora`: no cycles, no back-edges, data flowing one way.

Read from the source with `ast` (nothing is imported), counting every import: module level,
inside functions, and under `if TYPE_CHECKING:` (a type-only edge still couples the modules
and still makes a cycle the day someone moves it out of the guard).
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = "pi_lora"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

# Where each package sits in the data flow; a module may import only from its own package's
# layer or lower ones. One row per stage package: the path of a file says its stage. Keys are
# names inside pi_lora; a longer key would override a package's row for one submodule. A new
# module goes in the package of the stage it serves; a new flat module needs a row of its own.
LAYER: dict[str, int] = {
    "__init__": 0,  # pi_lora/__init__.py: __version__
    "core": 0,  # errors, safe YAML and paths, the run lock, digests, quiet, allocator
    "recipe": 1,  # schema, loading (extends, --set), cross-section checks, dtypes
    "model": 2,  # loading the base, rope, LongRoPE factors, S2-Attn, base weights, known models
    "data": 3,  # files/hub -> tokenized, packed rows; PoSE; data-file records
    "run": 4,  # the run directory and its reader, provenance, integrity, loading a trained run
    "train": 5,  # the Trainer assembled; loss, recompute, SP, launch, preflight (validate)
    "release": 6,  # merge, fold, verification, release files, model card, GGUF export
    "eval": 7,  # perplexity, passkey, reports
    "search": 8,  # LongRoPE search, scored by the evaluator
    "plan": 9,  # the planner
    "demo": 9,  # the offline CPU demo (built on eval's passkey)
    "cli": 10,  # entry point: nothing in pi_lora imports it
    "testing": 10,  # test helpers: nothing in pi_lora imports them
}

# At most this many modules sit flat under pi_lora/ (the rest live in stage packages).
MAX_FLAT_MODULES = 8

# imported by nothing inside pi_lora (beyond themselves): entry points and test helpers
FORBIDDEN_MODULES = (f"{PACKAGE}.cli", f"{PACKAGE}.testing")  # and what lies inside them
# top-level names outside the package that production code must never import
FORBIDDEN_OUTSIDE = ("benchmarks", "tests", "conftest")

Graph = dict[str, set[str]]


# ----------------------------------------------------------------------------- the graph


def find_modules(package_dir: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package (a package = its __init__)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """`from ..x import y` inside `module` -> the absolute name of `..x`."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _import_module_call(node: ast.Call) -> str | None:
    """`importlib.import_module("pi_lora.x")` / `__import__("pi_lora.x")` with a literal name."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imported_names(path: Path, module: str, is_package: bool, known: Iterable[str]) -> set[str]:
    """Every absolute name `module` imports, anywhere in the file. `from p import name` is an
    import of `p.name` when that is a module, else of `p`."""
    known = set(known)
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                names.add(candidate if candidate in known else base)
        elif isinstance(node, ast.Call) and (dynamic := _import_module_call(node)):
            names.add(dynamic)
    return names


def _owning_module(name: str, known: set[str]) -> str | None:
    """The longest known module that `name` is or lies inside (`pi_lora.x.attr` -> `pi_lora.x`)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def build_graph(package_dir: Path = PACKAGE_DIR) -> tuple[Graph, dict[str, set[str]]]:
    """(edges among pi_lora modules, every raw imported name per module)."""
    modules = find_modules(package_dir)
    known = set(modules)
    graph: Graph = {}
    raw: dict[str, set[str]] = {}
    for module, path in modules.items():
        raw[module] = imported_names(path, module, path.name == "__init__.py", known)
        targets = {_owning_module(name, known) for name in raw[module]}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph, raw


# ----------------------------------------------------------------------------- the checks


def _strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan: the strongly connected components (each a list of modules)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _cycle_through(start: str, graph: Graph, members: set[str]) -> list[str]:
    """A shortest path start -> ... -> start inside one component (breadth first)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, ())):
            if nxt not in members:
                continue
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{start} is in a component but on no cycle")


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle path per group of modules that import each other, e.g. [a, b, a]."""
    return sorted(
        _cycle_through(component[0], graph, set(component))
        for component in _strongly_connected(graph)
        if len(component) > 1
    )


def layer_of(module: str, layers: Mapping[str, int] = LAYER) -> int | None:
    """The layer of the longest LAYER key that names the module or a package above it."""
    name = "__init__" if module == PACKAGE else module.removeprefix(f"{PACKAGE}.")
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        key = ".".join(parts[:end])
        if key in layers:
            return layers[key]
    return None


def unknown_modules(graph: Graph, layer: Callable[[str], int | None] = layer_of) -> list[str]:
    return sorted(m for m in graph if layer(m) is None)


def upward_edges(
    graph: Graph, layer: Callable[[str], int | None] = layer_of
) -> list[tuple[str, int, str, int]]:
    """(importer, its layer, imported, its layer) for every import of a higher layer."""
    found = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            low, high = layer(source), layer(target)
            if low is not None and high is not None and high > low:
                found.append((source, low, target, high))
    return found


def _inside(module: str, packages: Iterable[str]) -> bool:
    return any(module == p or module.startswith(f"{p}.") for p in packages)


def forbidden_imports(graph: Graph, raw: Mapping[str, set[str]]) -> list[str]:
    """Imports of the CLI or test helpers from inside pi_lora, or of benchmarks/ or tests/."""
    found = []
    for source, targets in sorted(graph.items()):
        found += [
            f"{source} imports {t}" for t in sorted(targets)
            if _inside(t, FORBIDDEN_MODULES) and not _inside(source, FORBIDDEN_MODULES)
        ]
    for source, names in sorted(raw.items()):
        found += [
            f"{source} imports {n}" for n in sorted(names) if n.split(".")[0] in FORBIDDEN_OUTSIDE
        ]
    return found


# ----------------------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def graph_and_raw() -> tuple[Graph, dict[str, set[str]]]:
    return build_graph()


def test_the_package_has_no_import_cycle(graph_and_raw) -> None:
    cycles = find_cycles(graph_and_raw[0])
    assert not cycles, "import cycles (give the shared type its own module):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_no_module_imports_the_cli_test_helpers_or_scripts(graph_and_raw) -> None:
    found = forbidden_imports(*graph_and_raw)
    assert not found, "pi_lora must not import these (move the code they need into pi_lora):\n" + (
        "\n".join(found)
    )


def test_every_module_has_a_layer(graph_and_raw) -> None:
    graph = graph_and_raw[0]
    missing = unknown_modules(graph)
    assert not missing, "\n".join(
        f"{m} has no layer: add it to LAYER in tests/test_imports.py "
        f"(it imports {', '.join(sorted(graph[m])) or 'nothing from pi_lora'})"
        for m in missing
    )


def test_imports_only_flow_down_the_layers(graph_and_raw) -> None:
    found = upward_edges(graph_and_raw[0])
    assert not found, "imports against the data flow (move the shared code down a layer):\n" + (
        "\n".join(f"{s} (layer {ls}) imports {t} (layer {lt})" for s, ls, t, lt in found)
    )


def test_the_known_edges_are_seen(graph_and_raw) -> None:
    """Guards the parser itself: edges of each kind the checks rely on are in the graph."""
    graph = graph_and_raw[0]
    assert "pi_lora.eval.settings" in graph["pi_lora.eval.report"]  # module level
    assert "pi_lora.eval.report" in graph["pi_lora.eval.runner"]  # `from pi_lora.eval import report`
    assert "pi_lora.model.known_models" in graph["pi_lora.plan.planner"]  # inside a function
    assert "pi_lora.plan.planner" in graph["pi_lora.plan.render"]  # under TYPE_CHECKING
    assert "pi_lora" in graph["pi_lora.run.provenance"]  # `from pi_lora import __version__`


def test_few_modules_sit_flat_and_every_package_has_one_row() -> None:
    """The tree is the map: stages are packages, not rows of a table over flat modules."""
    flat = sorted(p.stem for p in PACKAGE_DIR.glob("*.py"))
    assert len(flat) <= MAX_FLAT_MODULES, f"{len(flat)} flat modules: {flat}; move them into a stage"
    packages = sorted(p.parent.name for p in PACKAGE_DIR.glob("*/__init__.py"))
    assert [p for p in packages if p not in LAYER] == [], "a package without a LAYER row"
    assert [k for k in LAYER if "." in k] == [], "one row per package: no per-module overrides"


# ----------------------------------------------------------------------------- the checker


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_parser_sees_every_kind_of_import(tmp_path: Path) -> None:
    package = _write(tmp_path / PACKAGE, {
        "__init__.py": "__version__ = '0'\n",
        "low.py": "from pi_lora import __version__\n",
        "sub/__init__.py": "from . import leaf\nfrom .leaf import NAME\n",
        "sub/leaf.py": "NAME = 1\n",
        "sub/user.py": (
            "from typing import TYPE_CHECKING\n"
            "from ..low import __version__\n"
            "if TYPE_CHECKING:\n    from pi_lora.high import Thing\n"
            "def f():\n    import pi_lora.cli\n"
            "def g():\n    import importlib\n    return importlib.import_module('benchmarks.x')\n"
        ),
        "high.py": "from pi_lora.sub import leaf, NAME\n",
        "cli.py": "",
    })
    graph, raw = build_graph(package)
    assert graph["pi_lora.low"] == {"pi_lora"}
    assert graph["pi_lora.sub"] == {"pi_lora.sub.leaf"}  # relative, in a package __init__
    assert graph["pi_lora.sub.user"] == {"pi_lora.low", "pi_lora.high", "pi_lora.cli"}
    assert graph["pi_lora.high"] == {"pi_lora.sub.leaf", "pi_lora.sub"}  # module, then attribute
    assert "benchmarks.x" in raw["pi_lora.sub.user"]
    assert forbidden_imports(graph, raw) == [
        "pi_lora.sub.user imports pi_lora.cli", "pi_lora.sub.user imports benchmarks.x"
    ]


def test_the_checks_report_a_cycle_an_upward_edge_and_an_unknown_module() -> None:
    graph: Graph = {
        "pi_lora.recipe.loading": {"pi_lora.core.errors"},
        "pi_lora.core.errors": set(),
        "pi_lora.eval.report": {"pi_lora.eval.runner"},
        "pi_lora.eval.runner": {"pi_lora.eval.report", "pi_lora.recipe.loading"},
        "pi_lora.model.rope": {"pi_lora.release.merge", "pi_lora.newthing"},
        "pi_lora.release.merge": {"pi_lora.model.rope"},
        "pi_lora.newthing": set(),
    }
    layers = {"core": 0, "recipe": 1, "model": 2, "release": 6, "eval": 7}

    def layer(module: str) -> int | None:
        return layer_of(module, layers)

    assert find_cycles(graph) == [
        ["pi_lora.eval.report", "pi_lora.eval.runner", "pi_lora.eval.report"],
        ["pi_lora.model.rope", "pi_lora.release.merge", "pi_lora.model.rope"],
    ]
    assert upward_edges(graph, layer) == [("pi_lora.model.rope", 2, "pi_lora.release.merge", 6)]
    assert unknown_modules(graph, layer) == ["pi_lora.newthing"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_layer_of_uses_the_longest_key() -> None:
    layers = {"__init__": 0, "eval": 8, "eval.passkey": 3}
    assert layer_of("pi_lora", layers) == 0
    assert layer_of("pi_lora.eval", layers) == 8
    assert layer_of("pi_lora.eval.runner", layers) == 8
    assert layer_of("pi_lora.eval.passkey", layers) == 3
    assert layer_of("pi_lora.plan", layers) is None
