"""YAML from files someone else may have written (recipes, config files): bounded in size,
UTF-8 only, and safe against alias expansion bombs.

A recipe is small (a few KB). Without these bounds a 300 MB file takes a minute and
600 MB before failing, a binary one fails with a traceback, and a 600-byte file of nested
aliases (`&a [*b, *b, ...]`) expands to megabytes the moment anything walks the result.
Used by the trainer's recipe loader and by tpuctl for its recipes and config files; it
needs nothing but PyYAML.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import yaml

MAX_BYTES = 1_000_000
# Nodes plus scalar characters, with every alias counted each time it is used.
MAX_EXPANDED = 1_000_000


class YamlInputError(ValueError):
    """The input is not something to parse: too big, not UTF-8, or expanding too far."""


def read_capped(handle: BinaryIO, source: str) -> bytes:
    """Read an open file, refusing one over MAX_BYTES without reading the rest of it."""
    data = handle.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise YamlInputError(
            f"{source} is over {MAX_BYTES // 1_000_000} MB; a YAML file this big is not a "
            "recipe or a config file: check the path"
        )
    return data


def load_yaml(raw: bytes, source: str) -> Any:
    """`yaml.safe_load` of `raw`, after the checks above; YAML syntax errors propagate as
    yaml.YAMLError (callers report their line)."""
    if len(raw) > MAX_BYTES:
        raise YamlInputError(f"{source} is over {MAX_BYTES // 1_000_000} MB: check the path")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise YamlInputError(
            f"{source} is not UTF-8 text (byte {err.start} is 0x{raw[err.start]:02x}); "
            "give a YAML file"
        ) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set(), source) > MAX_EXPANDED:
            raise YamlInputError(
                f"{source}: its aliases (*name) expand to over {MAX_EXPANDED:,} nodes and "
                "characters; write the values out or use fewer nested aliases"
            )
        return loader.construct_document(node)
    except RecursionError:
        raise YamlInputError(f"{source} nests too deeply to be a recipe or config") from None
    finally:
        loader.dispose()


def _expanded_size(
    node: yaml.Node, sizes: dict[int, int], open_nodes: set[int], source: str
) -> int:
    """The size of `node` with every alias expanded, each shared node measured once."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        line = node.start_mark.line + 1
        raise YamlInputError(f"{source} line {line}: an alias there contains itself")
    open_nodes.add(key)
    if isinstance(node, yaml.ScalarNode):
        size = 1 + len(node.value)
    else:
        children = node.value if isinstance(node, yaml.SequenceNode) else sum(node.value, ())
        size = 1 + sum(_expanded_size(c, sizes, open_nodes, source) for c in children)
    open_nodes.discard(key)
    sizes[key] = size
    return size
