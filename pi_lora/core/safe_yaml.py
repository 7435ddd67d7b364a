"""YAML as recipes are read: `yaml.safe_load` semantics, bounded, duplicate keys refused;
and values quoted in error messages cut short.

An alias bomb (a few lines whose aliases expand to billions of values) is refused from the
composed node graph before anything expands; a key given twice, which YAML would resolve by
silently keeping the last, is an error naming the key and its lines.
"""

from __future__ import annotations

import contextlib
import reprlib
from typing import Any

import yaml

from pi_lora.core.errors import PiLoraError

MAX_YAML_NODES = 100_000  # a recipe is a few hundred values; an alias bomb is billions
ERROR_VALUE_CHARS = 200  # longest value quoted in an error message


def short_repr(value: Any, limit: int = ERROR_VALUE_CHARS) -> str:
    """`repr(value)` cut to `limit` characters, so an error message stays one screen."""
    text = _bounded_repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _bounded_repr(value: Any) -> str:
    """repr of a value whose nesting and length are bounded (a recipe's, after the node
    budget), but cut early for long containers so a 100k-item list is not printed whole."""
    limits = reprlib.Repr()
    limits.maxlist = limits.maxdict = limits.maxtuple = limits.maxset = 20
    limits.maxstring = limits.maxother = ERROR_VALUE_CHARS
    limits.maxlevel = 6
    return limits.repr(value)


class _BoundedLoader(yaml.SafeLoader):
    """yaml.safe_load's semantics, plus: a key given twice in one mapping is an error (YAML
    would keep the last silently), and a document may expand to at most MAX_YAML_NODES
    values counting every alias expansion (an alias bomb is rejected before it expands)."""

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source = source
        self.paths: dict[int, str] = {}  # id of a mapping node -> its dotted path

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        self.paths = _check_expanded_size(node, self.source)
        return self.construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            with contextlib.suppress(TypeError):  # unhashable key: reported by YAML itself
                if key in seen:
                    parent = self.paths.get(id(node), "")
                    field = f"{parent}.{key}" if parent else str(key)
                    raise PiLoraError(
                        f"duplicate key {short_repr(key)} on line {line} (first on line "
                        f"{seen[key]}) in {self.source}: YAML would silently keep only the last",
                        field=cut(field, ERROR_VALUE_CHARS), fix="merge the two blocks into one")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_expanded_size(root: yaml.Node, source: str) -> dict[int, str]:
    """Count the values `root` expands to, an alias counting as a copy of what it names;
    return the dotted path of each mapping (where it is first reached).

    Each node's size is computed once (memoised), so the count is linear in the document's
    text even for a bomb whose expansion has billions of values."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    paths: dict[int, str] = {}

    def size(node: yaml.Node, path: str) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise PiLoraError(f"{source} holds a recursive alias (a value that contains itself)",
                              fix="replace the alias by the values it should repeat")
        open_nodes.add(key)
        children: list[tuple[yaml.Node, str]] = []
        if isinstance(node, yaml.SequenceNode):
            children = [(child, f"{path}[{i}]") for i, child in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            paths[key] = path
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                children += [(key_node, path), (value_node, f"{path}.{name}" if path else name)]
        total = 1
        for child, child_path in children:
            total += size(child, cut(child_path, ERROR_VALUE_CHARS))
            if total > MAX_YAML_NODES:
                raise PiLoraError(
                    f"{source} expands to more than {MAX_YAML_NODES} values (aliases count "
                    f"once per use, line {node.start_mark.line + 1})",
                    fix="write the recipe out plainly; anchors and aliases are for small repeats")
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root, "")
    return paths


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> Python values (safe_load semantics, bounded; duplicate keys refused)."""
    try:
        loader = _BoundedLoader(text, source)  # refuses control characters (binary) already
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise PiLoraError(f"{source} is not valid YAML: {cut(str(exc))}",
                          fix="fix the YAML syntax") from None
    except RecursionError:
        raise PiLoraError(f"{source} nests too deeply", fix="flatten the YAML") from None


def cut(text: str, limit: int = 4 * ERROR_VALUE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
