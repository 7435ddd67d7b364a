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

# Where each module sits in the data flow; a module may import only from its own layer or
# lower ones. Keys are names inside pi_lora; a package's key (`eval`) covers its __init__ and
# every submodule, and a longer key (`eval.passkey`) would override it for one submodule.
# A new module goes in the row of the stage it serves.
LAYER: dict[str, int] = {
    # 0: foundations any stage may use
    "__init__": 0,  # pi_lora/__init__.py: __version__
    "errors": 0,
    "digest": 0,
    "quiet": 0,
    "safe_yaml": 0,  # bounded YAML reading, duplicate keys refused
    "safe_paths": 0,  # the one gate before deleting a directory (--overwrite)
    "runlock": 0,  # one process per run directory
    # 1: the typed input
    "schema": 1,  # the recipe's pydantic sections
    "recipe_checks": 1,  # the checks between a recipe's sections
    "recipe": 1,
    # 2: what the recipe means for a model
    "dtypes": 2,
    "rope": 2,
    "longrope_factors": 2,  # LongRoPE per-frequency factors: curves, checks, search operators
    "serving": 2,  # what vLLM / GGUF make of a release config: default window, lost methods
    # 3: loading the model and the data
    "model": 3,
    "known_models": 3,  # offline configs of the models shipped recipes name
    "hub": 3,  # locally installed weights (SmolLM2 GGUF), found without downloading
    "data": 3,
    "packing": 3,  # Arrow tokenizing and packing that data assembles
    "checkpoint": 3,  # the base's weights read tensor by tensor (safetensors shards, GGUF)
    "records": 3,  # local data files' records: checked, diagnosed, chat layouts mapped
    "pose": 3,  # PoSE position ids: short rows that teach the whole target window
    # 4: training machinery and the record of what went in
    "loss": 4,
    "attention": 4,
    "allocator": 4,
    "distributed": 4,
    "provenance": 4,
    "validate": 4,  # `pi-lora validate`
    "recompute": 4,  # selective checkpointing: attention kept, not run twice
    "sequence_parallel": 4,  # DeepSpeed Ulysses: checks, sliced rows, the slice loss's share
    # 5: the run directory format: below train (which writes it) and merge/eval (which read it)
    "rundir": 5,
    "adapter_card": 5,  # the adapter directory's README and scaled base config
    "integrity": 5,  # the base model still the one a run trained on (merge, eval)
    # 6: training
    "trainer": 6,  # the Trainer subclass train assembles
    "train": 6,
    "train_args": 6,  # TrainingArguments, DeepSpeed config and progress line from the recipe
    "launch": 6,
    "outcome": 6,  # a failed run recorded as failed; disk full as one user error
    # 7: a trained run -> a release
    "trained": 7,
    "release": 7,
    "card": 7,  # the release's model card
    "merge": 7,
    "merge_checks": 7,  # what merge settles before any work
    "export": 7,  # `pi-lora export`: release -> GGUF by llama.cpp's converter, rope metadata checked
    "fold": 7,  # adapter + extras folded into the base, shard by shard
    "verify": 7,  # release == base + adapter, whole or layer by layer
    # 8: evaluation
    "eval": 8,
    "longrope_search": 8,  # `pi-lora search`: LongRoPE factors scored by the evaluator
    # 9: planning and the demo (built on eval's passkey)
    "plan": 9,
    "demo": 9,
    # 10: entry points and test helpers, which nothing in pi_lora imports
    "commands": 10,  # what each pi-lora command does (only the cli imports it)
    "cli": 10,
    "testing": 10,
}

# imported by nothing inside pi_lora (beyond themselves): entry points and test helpers
FORBIDDEN_MODULES = (f"{PACKAGE}.cli", f"{PACKAGE}.testing")
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


def forbidden_imports(graph: Graph, raw: Mapping[str, set[str]]) -> list[str]:
    """Imports of the CLI or test helpers from inside pi_lora, or of benchmarks/ or tests/."""
    found = []
    for source, targets in sorted(graph.items()):
        found += [f"{source} imports {t}" for t in sorted(targets) if t in FORBIDDEN_MODULES]
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
    assert "pi_lora.known_models" in graph["pi_lora.plan.planner"]  # inside a function
    assert "pi_lora.plan.planner" in graph["pi_lora.plan.render"]  # under TYPE_CHECKING
    assert "pi_lora" in graph["pi_lora.provenance"]  # `from pi_lora import __version__`


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
        "pi_lora.recipe": {"pi_lora.errors"},
        "pi_lora.errors": set(),
        "pi_lora.eval.report": {"pi_lora.eval.runner"},
        "pi_lora.eval.runner": {"pi_lora.eval.report", "pi_lora.recipe"},
        "pi_lora.rope": {"pi_lora.merge", "pi_lora.newthing"},
        "pi_lora.merge": {"pi_lora.rope"},
        "pi_lora.newthing": set(),
    }
    layers = {"errors": 0, "recipe": 1, "rope": 2, "merge": 7, "eval": 8}

    def layer(module: str) -> int | None:
        return layer_of(module, layers)

    assert find_cycles(graph) == [
        ["pi_lora.eval.report", "pi_lora.eval.runner", "pi_lora.eval.report"],
        ["pi_lora.merge", "pi_lora.rope", "pi_lora.merge"],
    ]
    assert upward_edges(graph, layer) == [("pi_lora.rope", 2, "pi_lora.merge", 7)]
    assert unknown_modules(graph, layer) == ["pi_lora.newthing"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_layer_of_uses_the_longest_key() -> None:
    layers = {"__init__": 0, "eval": 8, "eval.passkey": 3}
    assert layer_of("pi_lora", layers) == 0
    assert layer_of("pi_lora.eval", layers) == 8
    assert layer_of("pi_lora.eval.runner", layers) == 8
    assert layer_of("pi_lora.eval.passkey", layers) == 3
    assert layer_of("pi_lora.plan", layers) is None
