"""Config (de)serialisation: dict/YAML round-trips, dotted overrides, helpful errors.

``RunConfig`` (see :mod:`siamese_detr.config`) is a tree of frozen dataclasses. This module turns
it into plain dicts (for YAML files and checkpoints) and back, and applies ``key.sub=value``
overrides parsed according to each field's annotation. Every mistake raises
:class:`~siamese_detr.config.ConfigError` with one line naming the key and, for unknown keys,
the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from siamese_detr.config import RunConfig
from siamese_detr.errors import ConfigError
from siamese_detr.files import write_text

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass tree as nested plain dicts (tuples become lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config class (used for suggestions)."""
    keys = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key(key: str, root: type) -> ConfigError:
    candidates = all_keys(root)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:  # try matching the last component only
        last = key.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == last][:1]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to annotation ``tp``."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")
    if origin in (types.UnionType, typing.Union):
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                if value is None or value in ("null", "None", "none"):
                    return None
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}={value!r} has the wrong type ({tp})")
    if origin is tuple:
        args = get_args(tp)
        if isinstance(value, str):
            text = value.strip().strip("[]()")
            value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r} must be a list like 1,2,3")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key} needs {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{key}={value!r} must be an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} must be a number") from None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    raise ConfigError(f"{key}: unsupported annotation {tp}")


def _build(cls: type[T], data: Mapping[str, Any], base: T | None, prefix: str, root: type) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key(prefix + str(key), root)
    kwargs: dict[str, Any] = {}
    for name in names:
        tp = hints[name]
        current = getattr(base, name) if base is not None else None
        if name not in data:
            if base is not None:
                kwargs[name] = current
            continue
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], current, prefix + name + ".", root)
        else:
            kwargs[name] = _coerce(data[name], tp, prefix + name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None


def from_dict(data: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Build a ``RunConfig`` from a (possibly partial) dict, on top of ``base``."""
    return _build(RunConfig, data, base if base is not None else RunConfig(), "", RunConfig)


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> nested dict of strings (typed later by :func:`from_dict`)."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override '{pair}' must look like key.sub=value")
        key, value = pair.split("=", 1)
        key = key.strip()
        if key.startswith("--"):
            key = key[2:]
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{pair}' conflicts with another override")
        node[parts[-1]] = value
    return nested


def apply_overrides(cfg: RunConfig, pairs: Iterable[str]) -> RunConfig:
    """``cfg`` with ``key.sub=value`` overrides. Changing ``optim.length`` alone moves the lr
    drops with it (same fractions of the run, e.g. 240 of 300 -> 8 of 10)."""
    data = parse_overrides(pairs)
    optim = data.get("optim")
    if isinstance(optim, Mapping) and "length" in optim and "lr_drops" not in optim:
        old, new = float(cfg.optim.length), float(optim["length"])
        if old > 0 and new > 0 and any(d > new for d in cfg.optim.lr_drops):
            data = {**data, "optim": {**optim, "lr_drops": [
                max(1, int(d * new / old)) if float(d).is_integer() else d * new / old
                for d in cfg.optim.lr_drops]}}
    return from_dict(data, base=cfg)


def load_yaml(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"config file {path} is not valid YAML ({exc.__class__.__name__})"
        ) from None
    return from_dict(data, base=base)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_yaml(cfg: RunConfig, path: str | Path) -> None:
    write_text(path, dump_yaml(cfg))


def diff(a: RunConfig, b: RunConfig) -> list[tuple[str, Any, Any]]:
    """Leaves whose values differ, as ``(dotted key, value in a, value in b)``."""
    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, Mapping):
                out.update(flat(v, prefix + k + "."))
            else:
                out[prefix + k] = v
        return out

    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    return [(k, fa[k], fb[k]) for k in fa if fa[k] != fb[k]]
