"""Refuse to resume from a checkpoint that this run cannot read: another model (list what differs
instead of a shape error) or another strategy layout (say how to go on instead of a file error)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dune_scale.config import STUDENTS_FOLDER, Config, ConfigError, resolve_student_dicts
from dune_scale.engine.checkpointer import read_trainer_state
from dune_scale.engine.strategies import STRATEGIES

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
    """The settings that shape the saved weights: each student's (``students.<name>.…`` for a
    student of several), the student names, the teachers."""
    signature: dict[str, Any] = {}
    students = resolve_student_dicts(config)
    for name, resolved in students:
        prefix = f"{STUDENTS_FOLDER}.{name}." if name else ""
        for key in _MODEL_KEYS:
            signature.update(_flatten(_get(resolved, key), prefix + key))
        signature.pop(f"{prefix}student.pretrained", None)  # only decides the initial weights
    signature["students"] = [name for name, _ in students if name]
    teachers = _get(config, "teachers.models") or []
    signature["teachers"] = [{k: t.get(k) for k in _TEACHER_KEYS} for t in teachers]
    return signature


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    old, new = model_signature(saved), model_signature(current)
    return [f"{key}: checkpoint has {old.get(key)!r}, this run has {new.get(key)!r}" for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def layout_problem(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why files written under the ``saved`` strategy layout cannot be loaded under ``current``: another
    strategy, or what that strategy says (``Strategy.resume_problem``)."""
    if not saved or saved == current:
        return None
    if saved.get("strategy") != current.get("strategy"):
        return (
            f"it was written by strategy.name={saved.get('strategy')}, this run uses strategy.name={current.get('strategy')}; "
            f"resume with strategy.name={saved.get('strategy')}, or start a new run (another run.output_dir) from its "
            "weights with student.pretrained=<the run's student.safetensors>"
        )
    return STRATEGIES[current["strategy"]].resume_problem(saved, current)


def check_resume_compatible(cfg: Config, folder: Path, layout: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` when ``folder`` (a checkpoint) cannot be resumed by this run, whose
    strategy writes the checkpoint ``layout``."""
    record = read_trainer_state(folder)["run"]
    problem = layout_problem(record["layout"], layout)
    if problem:
        raise ConfigError(f"cannot resume from {folder}: {problem}")
    saved = record["config"]
    differences = config_differences(saved, cfg.to_dict())
    if differences:
        raise ConfigError(
            f"cannot resume from {folder}: it was written by another model configuration:\n  "
            + "\n  ".join(differences)
            + "\nuse a new run.output_dir, or checkpoint.resume=never to start over"
        )
