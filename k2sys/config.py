"""Configuration: nested dataclasses, recipes as functions, `--set a.b=c` overrides.

Every component owns a `@dataclass(kw_only=True)` config with attribute docstrings; a recipe is
a Python function returning a full config (k2sys.recipes). The CLI applies overrides with
`apply_overrides`, which coerces strings to the field's declared type and fails before any work
starts, naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

# Integers beyond int64 cannot reach torch, numpy or a C extension; seeds are kept to 31 bits because
# several places add offsets to them (seed + 1_000_003, seed * 7 + iteration) before seeding RNGs.
INT_MAX = 2**63 - 1
SEED_MAX = 2**31 - 1


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the field and what is allowed."""


# ---- range checks shared by every section's validate() ------------------------------------------------
def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _bound_text(gt: float | None, ge: float | None, lt: float | None, le: float | None) -> str:
    lo = f"> {_num(gt)}" if gt is not None else f">= {_num(ge)}" if ge is not None else None
    hi = f"< {_num(lt)}" if lt is not None else f"<= {_num(le)}" if le is not None else None
    if lo and hi:
        left = "(" if gt is not None else "["
        right = ")" if lt is not None else "]"
        a = gt if gt is not None else ge
        b = lt if lt is not None else le
        return f"in {left}{_num(a)}, {_num(b)}{right}"
    return lo or hi or "a finite number"


def check_number(field: str, value: Any, *, gt: float | None = None, ge: float | None = None,
                 lt: float | None = None, le: float | None = None, integer: bool = False, hint: str = "") -> None:
    """Raise ConfigError naming `field` unless `value` is a finite number (an int if `integer`) within the bounds."""
    kind = "an int" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"{field}: expected {kind}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{field}: must be a finite number, got {value!r}")
    bad = ((gt is not None and not value > gt) or (ge is not None and not value >= ge)
           or (lt is not None and not value < lt) or (le is not None and not value <= le))
    if bad:
        raise ConfigError(f"{field}: must be {_bound_text(gt, ge, lt, le)}, got {value!r}"
                          + (f"; {hint}" if hint else ""))


def check_int(field: str, value: Any, lo: int | None = None, hi: int | None = None, hint: str = "") -> None:
    check_number(field, value, ge=lo, le=hi, integer=True, hint=hint)


def check_seed(field: str, value: Any) -> None:
    check_int(field, value, 0, SEED_MAX)


def check_fraction(field: str, value: Any, *, open_low: bool = False, open_high: bool = False) -> None:
    """A probability or share: in [0, 1] (ends open as asked)."""
    check_number(field, value, **({"gt": 0} if open_low else {"ge": 0}), **({"lt": 1} if open_high else {"le": 1}))


def check_port(field: str, value: Any, allow_zero: bool = True) -> None:
    """A TCP port: 1..65535, or 0 (pick a free one) where allowed."""
    check_int(field, value, 0 if allow_zero else 1, 65535,
              hint="a TCP port is 1..65535" + (" (0 picks a free one)" if allow_zero else ""))


def check_name(field: str, value: Any) -> None:
    """A non-empty identifier-like string (column names, module names)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{field}: must be a non-empty string, got {value!r}")


def check_writable_dir(field: str, value: Any) -> None:
    """`value` is a directory this process can write into, or one it can create (its nearest existing
    ancestor is a writable directory)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{field}: must be a directory path, got {value!r}")
    p = Path(value).expanduser()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{field}: {probe} is a file, not a directory; choose another path")
    # A real probe rather than os.access: root passes every access() check, yet cannot write into
    # /proc, a read-only mount or a full quota.
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".k2sys-write-probe-"))
    except OSError as e:
        what = "is not writable" if probe == p else f"cannot be created ({probe} is not writable)"
        raise ConfigError(f"{field}: {p} {what}: {e.strerror}; choose a directory you can write to") from None


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
            parsed = json.loads(value, parse_constant=_reject_constant)
        except (json.JSONDecodeError, ValueError, RecursionError) as e:
            raise ConfigError(f"{field}: expected a JSON object, got {value!r} ({e})") from None
        if not isinstance(parsed, dict):
            raise ConfigError(f"{field}: expected a JSON object, got {value!r}")
        _check_json_numbers(parsed, field)
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
            out = int(value)
        except ValueError:
            raise ConfigError(f"{field}: expected an int, got {value!r}") from None
        if abs(out) > INT_MAX:
            raise ConfigError(f"{field}: {value!r} is out of range (an int within +-{INT_MAX})")
        return out
    if tp is float:
        try:
            out = float(value)
        except ValueError:
            raise ConfigError(f"{field}: expected a float, got {value!r}") from None
        if not math.isfinite(out):  # also 1e999, which float() reads as inf
            raise ConfigError(f"{field}: must be a finite number, got {value!r}")
        return out
    if tp is str:
        if "\x00" in value:
            raise ConfigError(f"{field}: contains a NUL character")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{field}: cannot set a field of type {_describe(tp)} from the command line")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def _check_json_numbers(obj: Any, field: str) -> None:
    if isinstance(obj, dict):
        for v in obj.values():
            _check_json_numbers(v, field)
    elif isinstance(obj, list):
        for v in obj:
            _check_json_numbers(v, field)
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ConfigError(f"{field}: contains the non-finite number {obj!r}")
    elif isinstance(obj, int) and not isinstance(obj, bool) and abs(obj) > INT_MAX:
        raise ConfigError(f"{field}: contains the out-of-range int {obj}")


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
    """Every section's `validate()`, innermost first, after a type check of every value: a number field
    holds a finite number of its type, a choice field one of its choices, whether the value came
    from `--set`, from a recipe function or from a saved config.json."""
    if not dataclasses.is_dataclass(cfg):
        return
    hints = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            validate_tree(v, f"{prefix}{f.name}.")
        else:
            _check_value_type(f"{prefix}{f.name}", v, hints.get(f.name, Any))
    check = getattr(cfg, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def check_value_type(field: str, value: Any, tp: Any) -> None:
    """Raise ConfigError naming `field` unless `value` (from JSON or Python) fits the annotation `tp`."""
    _check_value_type(field, value, tp)


def build_checked(cls: type, data: Any, where: str) -> Any:
    """cls(**data) for a flat config dataclass read from JSON (e.g. `k2sys serve --config`): an unknown
    key or a value of the wrong type is a ConfigError naming `where.<key>` before the class sees it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object of {cls.__name__} fields, got {data!r}")
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{where}.{key}: unknown field of {cls.__name__}; valid fields: {', '.join(names)}")
        _check_value_type(f"{where}.{key}", value, hints[key])
    return cls(**data)


def _check_value_type(field: str, value: Any, tp: Any) -> None:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                _check_value_type(field, value, a)
                return
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{field}: {value!r} is not {_describe(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{field}: {value!r} is not allowed; choose {_describe(tp)}")
        return
    if tp is float:
        check_number(field, value)
    elif tp is int:
        check_number(field, value, ge=-INT_MAX, le=INT_MAX, integer=True)
    elif tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{field}: expected a bool (true/false), got {value!r}")
    elif tp is str and not isinstance(value, str):
        raise ConfigError(f"{field}: expected a string, got {value!r}")
    elif tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{field}: expected a JSON object, got {value!r}")
        _check_json_numbers(value, field)


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
