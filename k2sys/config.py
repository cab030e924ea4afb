"""Configuration: nested dataclasses, recipes as functions, `--set a.b=c` overrides.

Every component owns a `@dataclass(kw_only=True)` config with attribute docstrings; a recipe is
a Python function returning a full config (k2sys.recipes). The CLI applies overrides with
`apply_overrides`, which coerces strings to the field's declared type and fails before any work
starts, naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, get_args, get_origin


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the field and what is allowed."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def coerce(value: str, tp: Any, field: str) -> Any:
    """Parse the override string `value` as type `tp` (raises ConfigError naming `field`)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and value.lower() in ("none", "null"):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, field)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{field}: cannot parse {value!r} as {_describe(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if str(c) == value:
                return c
        raise ConfigError(f"{field}: {value!r} is not allowed; choose {_describe(tp)}")
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (str,)
        items = [] if value.strip() == "" else [v.strip() for v in value.split(",")]
        out = [coerce(v, inner, field) for v in items]
        return out if origin is list else tuple(out)
    if origin is dict or tp is dict:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{field}: expected a JSON object, got {value!r} ({e})") from None
        if not isinstance(parsed, dict):
            raise ConfigError(f"{field}: expected a JSON object, got {value!r}")
        return parsed
    if tp is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{field}: expected a bool (true/false), got {value!r}")
    if tp is int:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{field}: expected an int, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{field}: expected a float, got {value!r}") from None
    if tp is str:
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{field}: cannot set a field of type {_describe(tp)} from the command line")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def set_path(cfg: Any, dotted: str, raw: str) -> None:
    """Set cfg.a.b.c = coerce(raw) in place; unknown keys list the valid ones."""
    parts = dotted.split(".")
    obj = cfg
    walked = []
    for i, name in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"{'.'.join(walked)} is a value, not a section; cannot set {dotted!r}")
        hints = _field_types(type(obj))
        names = [f.name for f in dataclasses.fields(obj)]
        if name not in names:
            where = ".".join(walked) or "config"
            raise ConfigError(f"{dotted}: unknown key {name!r} in {where}; valid keys: {', '.join(names)}")
        walked.append(name)
        if i == len(parts) - 1:
            tp = hints[name]
            if _is_dataclass_type(tp):
                raise ConfigError(f"{dotted} is a section; set one of its keys, e.g. {dotted}.{dataclasses.fields(tp)[0].name}=...")
            setattr(obj, name, coerce(raw, tp, dotted))
        else:
            obj = getattr(obj, name)


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ["a.b=c", ...] to a copy of cfg, then run each section's `validate()` if it has one."""
    cfg = copy_config(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. rl.steps=20")
        key, raw = item.split("=", 1)
        set_path(cfg, key.strip(), raw.strip())
    validate_tree(cfg)
    return cfg


def validate_tree(cfg: Any, prefix: str = "") -> None:
    if not dataclasses.is_dataclass(cfg):
        return
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            validate_tree(v, f"{prefix}{f.name}.")
    check = getattr(cfg, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def copy_config(cfg: Any) -> Any:
    return dataclasses.replace(cfg, **{
        f.name: copy_config(getattr(cfg, f.name)) if dataclasses.is_dataclass(getattr(cfg, f.name))
        else _copy_value(getattr(cfg, f.name))
        for f in dataclasses.fields(cfg) if f.init
    })


def _copy_value(v: Any) -> Any:
    if isinstance(v, (list, dict, set)):
        return json.loads(json.dumps(v)) if isinstance(v, (list, dict)) else set(v)
    return v


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Rebuild a config from to_dict() output (e.g. runs/<name>/config.json); unknown keys are errors."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{path or cls.__name__}: unknown keys {sorted(unknown)}; valid keys: {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        kwargs[k] = from_dict(tp, v, f"{path}{k}.") if _is_dataclass_type(tp) and isinstance(v, dict) else v
    return cls(**kwargs)


def render(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=False)
