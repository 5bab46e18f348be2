"""Loading: a recipe file (``base:`` chains, shipped recipes by name) + ``key=value`` overrides →
a validated :class:`Config`; and the resolved config back to YAML."""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path
from typing import Any

import yaml

from dune_scale.config.sections import Config, ConfigError
from dune_scale.config.typed import build_section, merge_layer, without_custom_shape
from dune_scale.config.validation import validate


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Recipe file (optional; a shipped recipe may be named without a path, e.g. ``vitb14_448``) +
    ``key=value`` overrides → validated :class:`Config`."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_recipe(Path(path) if Path(path).exists() or "/" in str(path) else recipe_path(str(path)))
    parsed = [_parse_override(item) for item in overrides]
    for key, value in parsed:
        if key == "student.arch":
            raw = without_custom_shape(raw, value)
    for key, value in parsed:
        _set_path(raw, key.split("."), value, key)
    config = build_section(Config, raw, "")
    validate(config)
    return config


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A resolved config (e.g. the ``config.yaml`` of a run) back into a validated :class:`Config`."""
    config = build_section(Config, raw, "")
    validate(config)
    return config


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def _read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"recipe {path} includes itself through 'base'")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    places = [path.parent / str(base), _shipped_recipes() / str(base)]
    found = next((place for place in places if place.is_file()), None)
    if found is None:
        raise ConfigError(f"config file {path}: its base {base!r} is neither at {places[0]} nor a shipped recipe ({places[1]})")
    return merge_layer(_read_recipe(found, seen + (path,)), data)


def recipe_path(name: str) -> Path:
    """The shipped recipe ``name`` (``configs/<name>.yaml``, package data of dune_scale)."""
    return _shipped_recipes() / f"{name}.yaml"


def _shipped_recipes() -> Path:
    return Path(str(importlib.resources.files("dune_scale") / "configs"))


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.max_steps=100)")
    if re.fullmatch(r"\d+:\d+", text.strip()):
        return key.strip(), text.strip()  # a step range (run.profile_steps=10:20), not YAML's base-60 integer
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_path(raw: Any, parts: list[str], value: Any, key: str) -> None:
    head, rest = parts[0], parts[1:]
    if isinstance(raw, list):
        if not head.isdigit() or int(head) >= len(raw):
            raise ConfigError(f"{key}: index {head!r} is not valid for a list of {len(raw)} entries")
        if rest:
            _set_path(raw[int(head)], rest, value, key)
        else:
            raw[int(head)] = value
        return
    if not rest:
        raw[head] = value
        return
    child = raw.setdefault(head, {})
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"{key}: {head!r} holds a value, not a section")
    _set_path(child, rest, value, key)

