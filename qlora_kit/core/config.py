"""The one typed config schema: YAML file (or the same tree as a dict) + ``--set section.key=value`` overrides.

Every problem in a config is reported at once (unknown keys with the closest valid
name, wrong types, out-of-range values, contradictory settings).  The resolved config
is saved next to every output with where each value came from (file, override,
default), so a run directory always says exactly what ran.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import ValidationError

from qlora_kit.core.errors import ConfigError, QloraKitError, short_repr, shorten
from qlora_kit.core.safe_yaml import MAX_CONFIG_BYTES, parse_yaml, read_yaml
from qlora_kit.core.schema import (  # noqa: F401  (the schema's names, imported from here across the package)
    CHAT_TEMPLATE_NAMES,
    DEFAULT_BETA,
    SECTIONS,
    TRACKERS,
    AdapterInit,
    AdapterType,
    Config,
    DataConfig,
    DataFormat,
    DatasetConfig,
    DpoLoss,
    LoraConfig,
    Method,
    ModelConfig,
    TrainConfig,
    closest as _closest,
)

# A YAML file, or the same tree as a mapping (the Python API); overrides as ``--set`` strings or a mapping.
ConfigSource = Union[str, Path, Mapping[str, Any]]
Overrides = Union[list[str], tuple[str, ...], Mapping[str, Any], None]
CONFIG_DICT = "the config dict"


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into a key path and a YAML-parsed value."""
    shown = short_repr(item)
    if "=" not in item:
        raise ConfigError(f"--set {shown} is not of the form section.key=value", "e.g. --set train.max_steps=100")
    key, _, value = item.partition("=")
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {shown} has an empty key", "e.g. --set train.max_steps=100")
    if len(item) > MAX_CONFIG_BYTES:
        raise ConfigError(f"--set {shown} is longer than {MAX_CONFIG_BYTES // 1024} KiB", "put the value in the file")
    parsed = parse_yaml(value, f"--set {short_repr(key, 60)}", "quote the value or fix its YAML") \
        if value.strip() else ""
    return keys, parsed


def _apply_override(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {short_repr('.'.join(keys))}: {short_repr(k)} is not a section",
                              "e.g. --set train.max_steps=100")
        node = child
    node[keys[-1]] = value


def _owners(name: str, skip: str | None = None) -> list[str]:
    """``section.name`` for every section (other than ``skip``) that has a field called ``name``."""
    return [f"{sec}.{name}" for sec, model in SECTIONS.items() if sec != skip and name in model.model_fields]


def _suggest(name: str, section: str | None) -> str:
    """The suggestion after an unknown key: a section key for a bare or misplaced one, else the closest name."""
    owners = _owners(name, skip=section)
    if owners:
        return f" (did you mean {' or '.join(repr(o) for o in owners)}?)"
    if section is None:
        return _closest(name, list(SECTIONS) + ["output_dir"])
    return _closest(name, list(SECTIONS[section].model_fields))


def _unknown_key_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    top = list(SECTIONS) + ["output_dir"]
    for key, value in raw.items():
        if key not in top:
            problems.append((str(key)[:200], f"unknown key {short_repr(key)}{_suggest(str(key)[:100], None)}"))
        elif key in SECTIONS and isinstance(value, dict):
            fields = list(SECTIONS[key].model_fields)
            for sub in value:
                if sub not in fields:
                    problems.append((f"{key}.{sub}"[:200], f"unknown key {short_repr(f'{key}.{sub}')}{_suggest(str(sub)[:100], key)}"))
            if key == "data":
                problems += _unknown_entry_keys(value.get("datasets"))
    return problems


def _unknown_entry_keys(entries: Any) -> list[tuple[str, str]]:
    """Unknown keys inside the entries of ``data.datasets`` (``data.datasets[2].wieght``), with the closest name."""
    if not isinstance(entries, list):
        return []
    fields = list(DatasetConfig.model_fields)
    problems = []
    for i, entry in enumerate(entries, 1):
        for sub in entry if isinstance(entry, dict) else ():
            if sub not in fields:
                where = f"data.datasets[{i}].{str(sub)[:100]}"
                problems.append(("data.datasets", f"unknown key {short_repr(where)}{_closest(str(sub)[:100], fields)}"))
    return problems


def _location(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as a config key: ``data.datasets[2].weight`` (list entries counted from 1)."""
    out = ""
    for part in loc:
        text = str(part)
        if text.startswith(("function-after", "literal[", "list[")):
            continue
        if isinstance(part, int):
            out += f"[{part + 1}]"
        else:
            out += ("." if out else "") + text[:60]
    return out


def _format_validation_error(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        if err["type"] == "extra_forbidden":
            continue  # reported with a suggestion by _unknown_key_problems
        loc = _location(err["loc"])
        msg = shorten(err["msg"].removeprefix("Value error, "), 300)
        got = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(got, dict) else f" (got {short_repr(got)})"
        problems.append((loc, f"{loc or 'config'}: {msg}{shown}"))
    return problems


def _where(key: str, origin: str, overrides: dict[str, str]) -> str:
    """Where the value of ``key`` came from: its ``--set`` argument, else the config file."""
    key = key.split("[")[0]  # data.datasets[2].weight: set with the whole list
    if key in overrides:
        return f"--set {overrides[key]}"
    inside = [item for k, item in overrides.items() if not key or k.startswith(key + ".")]
    return f"{origin} with --set {', '.join(inside)}" if inside else origin


def validate(raw: dict[str, Any], origin: str = "config", overrides: dict[str, str] | None = None) -> Config:
    """Build a Config from a raw mapping, listing every problem at once, each with where it came from.

    ``overrides`` maps a dotted key to the ``--set`` argument that gave it, so a problem in an
    override is reported as one (``--set max_steps=30: unknown key ...``), not as one of the file.

    Raises:
        ConfigError: with one line per problem.
    """
    overrides = overrides or {}
    problems = _unknown_key_problems(raw)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        problems += _format_validation_error(exc)
        cfg = None
    found = list(dict.fromkeys((_where(key, origin, overrides), text) for key, text in problems))
    if not found:
        assert cfg is not None
        return cfg
    from_set = {where.startswith("--set ") for where, _ in found}
    hint = ("correct the --set argument (--set section.key=value, e.g. --set train.max_steps=100)" if from_set == {True}
            else f"correct it in {origin} (or override it with --set section.key=value)" if from_set == {False}
            else f"correct them in {origin} and in the --set arguments")
    if len(found) == 1:
        raise ConfigError(f"{found[0][0]}: {found[0][1]}", _exact_fix(found[0], overrides) or hint)
    header = {frozenset({False}): origin, frozenset({True}): "--set"}.get(frozenset(from_set), f"{origin} and --set")
    listed = "\n  - ".join(text if where == origin else f"{where}: {text}" for where, text in found)
    raise ConfigError(f"{header}: {len(found)} problems:\n  - {listed}", hint)


def _exact_fix(problem: tuple[str, str], overrides: dict[str, str]) -> str | None:
    """``--set train.max_steps=30`` for ``--set max_steps=30``: the one fix when a --set key has one owner."""
    where, text = problem
    owners = re.findall(r"did you mean '(\w+\.\w+)'\?\)$", text)
    if not where.startswith("--set ") or len(owners) != 1:
        return None
    value = where.removeprefix("--set ").partition("=")[2]
    return f"--set {owners[0]}={value}"


def attribute_origin(exc: BaseException, sources: dict[str, str]) -> None:
    """Add to the fix of an error about a config value (an error whose ``key`` is set) where that value came from.

    E.g. ``fix: check data.val_path; it is set in configs/x.yaml (edit it there or override it with
    --set data.val_path=...)``: the user sees whether to fix the file or the ``--set`` argument.
    """
    key = getattr(exc, "key", None)
    if not isinstance(exc, QloraKitError) or not key:
        return
    origin = sources.get(key) or sources.get(key.split("[")[0], "default")  # data.datasets[2].path: the list's
    if origin == "override --set":
        said = f"it was given with --set {key}=..."
    elif origin.startswith("file "):
        said = f"it is set in {origin.removeprefix('file ')} (edit it there or override it with --set {key}=...)"
    elif origin == CONFIG_DICT:
        said = f"it is set in {CONFIG_DICT} (change it there or override {key})"
    else:
        said = f"it is the default (set it in the config or with --set {key}=...)"
    exc.hint = f"{exc.hint}; {said}" if exc.hint else f"{key}: {said}"


def load_config(path: ConfigSource, overrides: Overrides = None) -> tuple[Config, dict[str, str]]:
    """Load, override and validate a config; return it with each value's origin.

    ``path`` is a YAML file or a mapping of the same sections; ``overrides`` are ``--set``
    strings (``section.key=value``, the value read as YAML) or a mapping of dotted keys to
    values (taken as they are).  Relative paths in ``data.path``, ``data.val_path``,
    ``output_dir`` and a local ``model.name_or_path`` are taken relative to the current
    directory (as a user typing the command expects), not to the config file.
    """
    if isinstance(path, Mapping):
        raw, origin, label = _plain(copy.deepcopy(dict(path))), CONFIG_DICT, CONFIG_DICT
    else:
        raw, origin, label = read_yaml(path), str(path), f"file {path}"
    sources = {k: label for k in _leaf_keys(raw)}
    given: dict[str, str] = {}  # dotted key -> the --set argument that gave it
    for item, (keys, value) in _parsed_overrides(overrides):
        _apply_override(raw, keys, value)
        sources[".".join(keys)] = "override --set"
        given[".".join(keys)] = item
    cfg = validate(raw, origin=origin, overrides=given)
    for key in _leaf_keys(cfg.model_dump()):
        sources.setdefault(key, "default")
    return cfg, sources


def _parsed_overrides(overrides: Overrides) -> list[tuple[str, tuple[list[str], Any]]]:
    """(the ``--set`` text shown in messages, (key path, value)) for each override."""
    if not isinstance(overrides, Mapping):
        return [(item, parse_override(item)) for item in overrides or []]
    parsed = []
    for key, value in overrides.items():
        item = f"{key}={value}"
        keys = [k for k in str(key).strip().split(".") if k]
        if not keys:
            raise ConfigError(f"--set {short_repr(item)} has an empty key", "e.g. --set train.max_steps=100")
        parsed.append((item, (keys, _plain(copy.deepcopy(value)))))
    return parsed


def _plain(value: Any) -> Any:
    """``value`` with paths (``pathlib.Path``, any ``os.PathLike``) as strings, as a YAML file would give them."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _leaf_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and k in SECTIONS and not prefix:
            keys += _leaf_keys(v, f"{name}.")
        else:
            keys.append(name)
    return keys


def dump_config(cfg: Config, sources: dict[str, str] | None = None) -> str:
    """YAML text of the resolved config, each value annotated with its origin."""
    data = cfg.model_dump(mode="json")
    lines = ["# Resolved qlora-kit config: every value, with where it came from."]
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            for sub, subval in value.items():
                origin = (sources or {}).get(f"{key}.{sub}", "")
                text = yaml.safe_dump({sub: subval}, default_flow_style=True, width=10**6).strip()[1:-1]
                lines.append(f"  {text}" + (f"  # {origin}" if origin else ""))
        else:
            origin = (sources or {}).get(key, "")
            text = yaml.safe_dump({key: value}, default_flow_style=True, width=10**6).strip()[1:-1]
            lines.append(text + (f"  # {origin}" if origin else ""))
    return "\n".join(lines) + "\n"
