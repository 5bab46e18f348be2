"""Refuse to resume from a checkpoint of another model: list what differs instead of a shape error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dune_scale.config import Config, ConfigError
from dune_scale.engine.checkpointer import TRAINER_STATE

# Settings that decide the shapes and meaning of the saved weights.
_MODEL_KEYS = ("student", "projector", "train.image_size")
_TEACHER_KEYS = ("name", "arch", "tokens")


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def model_signature(config: dict[str, Any]) -> dict[str, Any]:
    signature: dict[str, Any] = {}
    for key in _MODEL_KEYS:
        signature.update(_flatten(_get(config, key), key))
    signature.pop("student.pretrained", None)  # only decides the initial weights
    teachers = _get(config, "teachers.models") or []
    signature["teachers"] = [{k: t.get(k) for k in _TEACHER_KEYS} for t in teachers]
    return signature


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    old, new = model_signature(saved), model_signature(current)
    return [f"{key}: checkpoint has {old.get(key)!r}, this run has {new.get(key)!r}" for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def check_resume_compatible(cfg: Config, folder: Path) -> None:
    saved = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True).get("config", {})
    differences = config_differences(saved, cfg.to_dict())
    if differences:
        raise ConfigError(
            f"cannot resume from {folder}: it was written by another model configuration:\n  "
            + "\n  ".join(differences)
            + "\nuse a new run.output_dir, or checkpoint.resume=never to start over"
        )
