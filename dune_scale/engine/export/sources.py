"""Finding and reading a student source into our layout (:func:`read_student`).

Sources: a run folder (its latest complete checkpoint, else ``student.safetensors``; a run of
several students needs the student's name, or its folder ``students/<name>`` as the source), a
checkpoints root, one checkpoint folder (read by the strategy its trainer state records: each
strategy owns the reader of the files it writes), ``student.safetensors`` (or any of our weights
files), an official DUNE ``.pth`` (a release, or main_dune.py's training ``checkpoint.pth``), and
the folders the folder formats write (read back by the format that wrote them). Nothing is
unpickled but tensors and, in official ``.pth`` files, their ``argparse.Namespace`` of training
arguments and the numpy arrays and scalars those hold.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from dune_scale.config import resolve_student_dicts
from dune_scale.distributed import DistInfo
from dune_scale.engine.checkpoint_files import CheckpointError
from dune_scale.engine.checkpointer import Checkpointer, is_complete, read_trainer_state
from dune_scale.engine.export.formats import FOLDER_CONFIG, FOLDER_WEIGHTS, FORMATS
from dune_scale.engine.export.layouts import from_official_dune, strip_wrappers
from dune_scale.engine.export.weights import DuneEncoder, StudentFileError, StudentWeights, read_safetensors
from dune_scale.engine.run_files import CHECKPOINTS, CONFIG, LATEST, MANIFEST, STUDENT_WEIGHTS, STUDENTS_FOLDER, student_subdir
from dune_scale.engine.strategies import STRATEGIES
from dune_scale.models.vit import NAMED_ARCHS
from dune_scale.safe_load import UnreadableCheckpoint, official_training_globals, torch_load
from dune_scale.teachers.checkpoints import describe_layout, detect_layout

log = logging.getLogger(__name__)

# What a source must be, for the messages about one that is not.
EXPECTED = ("expected a DUNE student: a run or checkpoint folder, student.safetensors or another weights file of "
            "ours (.safetensors, .pt), an official DUNE .pth, or a folder launch/export.py wrote")


def read_student(source: str | Path, student: str | None = None) -> StudentWeights:
    """Any student source (see the module docstring) → :class:`StudentWeights` in our layout;
    ``student``: which one, for a run or checkpoint of several students."""
    path = Path(source)
    if not path.exists():
        raise StudentFileError(f"{path}: not found")
    if path.is_dir() and path.parent.name == STUDENTS_FOLDER and (path.parent.parent / CONFIG).is_file():
        if student not in (None, path.name):
            raise StudentFileError(f"{path}: this is student {path.name!r}'s folder, not {student!r}'s")
        return read_student(path.parent.parent, path.name)  # a student's folder in a run of several
    if path.is_dir() and (path / FOLDER_CONFIG).is_file():
        return _read_exported_folder(path)
    weights = _read_folder(path, student) if path.is_dir() else _read_file(path)
    if weights.run_dir is None and (weights.source.parent / CONFIG).is_file() and weights.source.is_file():
        weights.run_dir = weights.source.parent
    if weights.config is None and weights.run_dir is not None:
        weights.name, weights.config = _student_config(_read_config_yaml(weights.run_dir / CONFIG), student, weights.run_dir)
    state = dict(weights.state)
    if not any(k.startswith("encoder.") for k in state):
        state = {f"encoder.{k}": v for k, v in state.items()}  # the encoder alone
    state.pop("encoder.mask_token", None)
    weights.state = state
    return weights


def load_encoder(source: str | Path, student: str | None = None) -> DuneEncoder:
    """The encoder of any student source, in eval mode (see :class:`DuneEncoder`); ``student``
    names one of several students of a run."""
    return DuneEncoder.from_weights(read_student(source, student))


# ------------------------------------------------------------------------------------- folders


def _read_folder(path: Path, student: str | None) -> StudentWeights:
    """A run folder, a checkpoints root, a checkpoint folder, or a folder holding student.safetensors."""
    run_dir = None
    if (path / CHECKPOINTS).is_dir():
        run_dir, path = path, path / CHECKPOINTS
    if (path / LATEST).exists():
        path = _latest_complete(path) or path
    if (path / MANIFEST).exists():
        weights = _read_checkpoint_folder(path, student)
        weights.run_dir = run_dir or (path.parent.parent if (path.parent.parent / CONFIG).is_file() else None)
        return weights
    if (path / STUDENT_WEIGHTS).is_file():
        return StudentWeights(read_safetensors(path / STUDENT_WEIGHTS), path / STUDENT_WEIGHTS)
    if run_dir is None:
        raise StudentFileError(f"{path}: {EXPECTED}")
    name, config = _student_config(_read_config_yaml(run_dir / CONFIG), student, run_dir)
    weights = run_dir / student_subdir(name) / STUDENT_WEIGHTS
    if not weights.is_file():
        raise StudentFileError(f"{run_dir}: neither a complete checkpoint nor {weights.relative_to(run_dir)}")
    return StudentWeights(read_safetensors(weights), weights, config=config, run_dir=run_dir, name=name)


def _latest_complete(root: Path) -> Path | None:
    try:
        return Checkpointer(root, keep_last=1, every_steps=1, dist=DistInfo()).find_latest()
    except CheckpointError as err:
        raise StudentFileError(str(err)) from None


def _read_checkpoint_folder(folder: Path, student: str | None) -> StudentWeights:
    """One student of one checkpoint folder, read by the strategy that wrote it (recorded in its
    trainer state), whatever rank count wrote it."""
    if not is_complete(folder):
        raise StudentFileError(f"{folder}: checkpoint is incomplete or corrupt (its {MANIFEST} manifest does not match)")
    try:
        trainer = read_trainer_state(folder)
        record = trainer["run"]
        name, config = _student_config(record["config"], student, folder)
        strategy = record.get("layout", {}).get("strategy")
        if strategy not in STRATEGIES:
            written = f"written by strategy {strategy!r}" if strategy else "its trainer state records no strategy (an older checkpoint)"
            raise StudentFileError(f"{folder}: {written}; the strategies that read checkpoints: {', '.join(STRATEGIES)}; "
                                   f"export the run's {STUDENT_WEIGHTS} instead")
        state = STRATEGIES[strategy].read_model_state(folder / student_subdir(name))
    except CheckpointError as err:  # a file that is missing or cannot be read safely, named
        raise StudentFileError(str(err)) from None
    state = _check_tensors(folder / student_subdir(name), state)
    state = strip_wrappers({k: v.detach().cpu() for k, v in state.items()})
    return StudentWeights(state, folder, trainer["progress"]["step"], config, name=name)


def _student_config(config: dict[str, Any] | None, student: str | None, source: Path) -> tuple[str, dict[str, Any] | None]:
    """(name, resolved configuration) of the student to read from a run whose config is ``config``:
    a run of several students needs ``student`` to be one of them; a single-student run, none."""
    if config is None:
        return student or "", None
    resolved = dict(resolve_student_dicts(config))
    names = [name for name in resolved if name]
    if not names and student:
        raise StudentFileError(f"{source}: this run trained one student; leave out the student name ({student!r})")
    if names and student not in resolved:
        given = f"{student!r} is not one of them" if student else "say which"
        raise StudentFileError(
            f"{source}: this run trained several students ({', '.join(names)}); {given} "
            "(--student NAME, or the student's folder students/NAME of the run as the source)"
        )
    return student or "", resolved[student or ""]


def _read_config_yaml(path: Path) -> dict[str, Any] | None:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _read_exported_folder(folder: Path) -> StudentWeights:
    """A folder a folder format wrote, read back by that format (its config.json says which)."""
    try:
        config = json.loads((folder / FOLDER_CONFIG).read_text())
    except ValueError as err:
        raise StudentFileError(f"{folder / FOLDER_CONFIG}: not JSON ({err}); {EXPECTED}") from None
    if not (folder / FOLDER_WEIGHTS).is_file():
        raise StudentFileError(f"{folder}: {FOLDER_CONFIG} is there but {FOLDER_WEIGHTS} is missing")
    for fmt in FORMATS.values():
        weights = fmt.read(folder, config) if fmt.read is not None and isinstance(config, dict) else None
        if weights is not None:
            return weights
    readers = [name for name, fmt in FORMATS.items() if fmt.read is not None]
    raise StudentFileError(f"{folder / FOLDER_CONFIG}: not the config of a folder written by --format {' or '.join(readers)}")


# ------------------------------------------------------------------------------------- files


def _read_file(path: Path) -> StudentWeights:
    if path.suffix == ".safetensors":
        return StudentWeights(read_safetensors(path), path)
    state, step, heads = _state_from_torch_file(path)
    return StudentWeights(state, path, step, num_heads=heads)


def _torch_load(path: Path) -> Any:
    """``weights_only=True`` with the classes of official DUNE files allow-listed one by one: the
    ``args`` Namespace, and the numpy arrays and scalars of training checkpoints."""
    try:
        return torch_load(path, official_training_globals())
    except UnreadableCheckpoint as err:
        raise StudentFileError(f"{path}: {err}; {EXPECTED}") from None


def _official_arg(args: argparse.Namespace | dict[str, Any], name: str) -> Any:
    """One training argument of an official file (its ``args``: a Namespace, or a dict)."""
    return args.get(name) if isinstance(args, dict) else getattr(args, name, None)


def _report_official_training_checkpoint(path: Path, raw: dict[str, Any]) -> None:
    """Names what an official training checkpoint (main_dune.py's ``checkpoint.pth``: ``model``,
    ``optimizer``, ``iter``, ``args``) holds besides the student, none of which is used (a warning:
    shown by every program without logging set up)."""
    if "optimizer" not in raw:
        return
    iters = _official_arg(raw["args"], "iters")
    unused = ", ".join(sorted(str(key) for key in raw if key not in ("model", "iter")))
    log.warning("%s: an official DUNE training checkpoint at iteration %s of %s: only its student weights are read "
                "(not used: %s)", path, raw.get("iter"), iters, unused)


def _state_from_torch_file(path: Path) -> tuple[dict[str, torch.Tensor], int | None, int | None]:
    """(our-layout state, step, heads) of a ``.pt``/``.pth``: official DUNE or our weights."""
    raw = _torch_load(path)
    teacher = detect_layout(raw)
    if teacher:
        raise StudentFileError(f"{path}: this is a teacher's checkpoint, {describe_layout(teacher)}, not a DUNE student; "
                               "give a student run, checkpoint or weights file")
    if isinstance(raw, dict) and isinstance(raw.get("args"), (argparse.Namespace, dict)) and isinstance(raw.get("model"), dict):
        enc_args = _official_arg(raw["args"], "enc_args") or {}
        arch = enc_args.get("arch", "vit_base")
        if arch not in NAMED_ARCHS:
            raise StudentFileError(f"{path}: args.enc_args arch {arch!r} is unknown; known: {', '.join(NAMED_ARCHS)}")
        state = _check_tensors(path, from_official_dune(strip_wrappers(raw["model"])))
        _report_official_training_checkpoint(path, raw)
        return state, raw.get("iter"), NAMED_ARCHS[arch][2]
    for key in ("model", "state_dict"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    state = strip_wrappers(_check_tensors(path, raw))
    if any(re.match(r"encoder\.blocks\.\d+\.\d+\.", k) for k in state):  # official layout without args
        state = from_official_dune(state)
    return state, None, None


def _check_tensors(path: Path, state: Any) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StudentFileError(f"{path}: does not hold a state dict of tensors; {EXPECTED}")
    return state
