"""Plain mappings (YAML, a saved ``config.yaml``) ↔ the typed sections: building with one
:class:`ConfigError` per unknown key or wrong type, merging layers (a base recipe under a recipe,
a ``students:`` entry over the top level)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

from dune_scale.config.sections import ARCH_SHAPE_KEYS, STUDENT_SECTIONS, Config, ConfigError


def resolve_student_dicts(raw: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, the configuration that student trains under) for each entry of a resolved config's
    ``students`` list, as plain dicts; ``[("", raw)]`` without the list. Reads saved configs too."""
    entries = raw.get("students") or []
    if not entries:
        return [("", raw)]
    shared = {key: value for key, value in raw.items() if key != "students"}
    resolved = []
    for entry in entries:
        resolved.append((entry["name"], merge_layer(shared, {s: entry[s] for s in STUDENT_SECTIONS if entry.get(s)})))
    return resolved


def student_configs(config: Config) -> list[tuple[str, Config]]:
    """(name, configuration) of every student the run trains: ``[("", config)]`` for a config without
    ``students:``, else each entry's sections merged over the top level (validated at load)."""
    if not config.students:
        return [("", config)]
    return [(name, build_section(Config, raw, "")) for name, raw in resolve_student_dicts(config.to_dict())]


def merge_layer(lower: dict[str, Any], upper: dict[str, Any]) -> dict[str, Any]:
    """``upper`` merged over ``lower`` (:func:`deep_merge`); a student section of ``upper`` naming
    an architecture takes the custom shape of ``lower``'s away (see :mod:`dune_scale.config`)."""
    student = upper.get("student")
    return deep_merge(without_custom_shape(lower, student.get("arch") if isinstance(student, dict) else None), upper)


def without_custom_shape(raw: dict[str, Any], arch: Any) -> dict[str, Any]:
    """``raw`` without student.embed_dim/depth/num_heads when ``arch`` names an architecture (it fixes them)."""
    student = raw.get("student")
    if arch in (None, "custom") or not isinstance(student, dict):
        return raw
    return {**raw, "student": {k: v for k, v in student.items() if k not in ARCH_SHAPE_KEYS}}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, nested mappings merged key by key (neither input is changed)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    """``raw`` (a mapping) as the dataclass ``cls``, every value coerced to its field's type; ``prefix``:
    the key of ``raw`` itself, for messages (``""`` at the top)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of settings, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]}; allowed keys here: {', '.join(sorted(fields))}"
        )
    values = {name: _coerce(hints[name], raw[name], join_key(prefix, name), fields[name]) for name in raw}
    return cls(**values)


def join_key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(hint: Any, value: Any, key: str, fld: dataclasses.Field | None = None) -> Any:
    aliases = fld.metadata.get("aliases", {}) if fld is not None else {}
    for old, new in aliases.items():
        if type(value) is type(old) and value == old:
            value = new
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build_section(hint, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # "none" spells an unset number (e.g. optim.grad_clip=none), YAML's null being awkward on a command line.
        if isinstance(value, str) and value.lower() == "none" and type(None) in args and str not in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(hint)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(hint)}), got {value!r}")
        return [_coerce(args[0], v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(hint)}), got {value!r}")
        return tuple(_coerce(a, v, f"{key}.{i}") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    return _scalar(hint, value, key)


def _scalar(hint: type, value: Any, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return {"int": "integer", "float": "number", "bool": "boolean (true/false)", "str": "string"}.get(
            hint.__name__, hint.__name__
        )
    return str(hint).replace("typing.", "")

