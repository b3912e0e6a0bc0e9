"""Bounded YAML reading: a config file is a few KB, never an alias bomb or 1,000 levels deep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from qlora_kit.core.errors import ConfigError, shorten

MAX_CONFIG_BYTES = 1024**2  # a config is a few KB; a chat template a few more
MAX_DEPTH = 32  # nesting levels, after expanding YAML aliases
MAX_VALUES = 20_000  # values (scalars, lists, mappings), after expanding YAML aliases


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing absurd nesting while it composes (before any recursion limit)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.depth = 0

    def fetch_flow_collection_start(self, token_class: Any) -> None:
        # The scanner looks ahead over open brackets (possible simple keys): refuse before it does.
        if self.flow_level >= MAX_DEPTH:
            raise _Unbounded(f"nests deeper than {MAX_DEPTH} levels")
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _Unbounded(f"nests deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Unbounded(Exception):
    """A YAML document too large to be a config (reason in the message)."""


def _expanded_size(node: yaml.Node, memo: dict[int, tuple[int, int]], active: set[int]) -> tuple[int, int]:
    """(values, depth) of ``node`` once aliases are expanded; shared nodes are measured once.

    Raises:
        _Unbounded: a recursive alias, too many values or too deep.
    """
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise _Unbounded("has a recursive YAML alias")
    active.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    size, depth = 1, 0
    for child in children:
        child_size, child_depth = _expanded_size(child, memo, active)
        size, depth = size + child_size, max(depth, child_depth)
        if size > MAX_VALUES:
            raise _Unbounded(f"expands to more than {MAX_VALUES:,} values (YAML aliases?)")
    if depth + 1 > MAX_DEPTH:
        raise _Unbounded(f"nests deeper than {MAX_DEPTH} levels once its aliases are expanded")
    active.discard(key)
    memo[key] = (size, depth + 1)
    return memo[key]


def load_yaml_bounded(text: str) -> Any:
    """``yaml.safe_load`` with bounded nesting and alias expansion (an alias bomb is refused at once).

    Raises:
        _Unbounded: the document is too deep, too large once expanded, or recursive.
        yaml.YAMLError: invalid YAML.
        ValueError: a scalar Python refuses to build (e.g. an integer of thousands of digits).
    """
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; raise ConfigError with the line for syntax errors.

    Reading is bounded: files over 1 MiB, nesting deeper than 32 levels and YAML alias
    expansions beyond 20,000 values are refused at once (an alias bomb would otherwise
    expand into billions of values when validated or printed).

    Raises:
        ConfigError: missing/unreadable/oversized file, YAML syntax error, or a top level that is not a mapping.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist", "check the path (configs/ has ready examples)")
    if p.is_dir():
        raise ConfigError(f"config path {p} is a directory, not a YAML file", "pass the .yaml file itself")
    try:
        with open(p, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {p} is larger than {MAX_CONFIG_BYTES // 1024} KiB: not a qlora-kit config",
                              "pass the YAML config (configs/ has examples); put long chat templates in a short file")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else f"not UTF-8 text ({exc.reason})"
        raise ConfigError(f"cannot read config {p}: {reason}", "check the file's permissions and encoding") from exc
    raw = parse_yaml(text, str(p), "fix the YAML at that line")
    if raw is None:
        raise ConfigError(f"config file {p} is empty", "start from one of the files in configs/")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must be a mapping of sections, got {type(raw).__name__}",
                          "start from one of the files in configs/")
    return raw


def parse_yaml(text: str, where: str, fix: str) -> Any:
    """Bounded YAML parsing with every failure as one ConfigError line naming ``where``.

    Raises:
        ConfigError: syntax error (with line and column), oversized/deep/recursive document, bad scalar.
    """
    try:
        return load_yaml_bounded(text)
    except _Unbounded as exc:
        raise ConfigError(f"{where} {exc}: refused", "write the values out plainly (no deep nesting or alias "
                                                     "expansions)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"YAML syntax error in {where}{at}: {shorten(str(problem))}", fix) from exc
    except (ValueError, OverflowError, RecursionError) as exc:
        reason = "an integer with more than 4300 digits" if "integer string conversion" in str(exc) \
            else shorten(str(exc), 120)
        raise ConfigError(f"{where}: a value cannot be read ({reason})", "write a value of a sensible size") from exc
