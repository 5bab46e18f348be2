"""Initialise a student from a stage-1 run or a released DUNE checkpoint (stage 2).

Accepted: every student source :func:`~dune_scale.engine.export.read_student` reads — a run folder,
a checkpoint root or folder of any strategy, a weights file (``.safetensors``, or ``.pt``/``.pth``
loaded with ``weights_only=True``) holding the full student or the encoder alone, an official DUNE
``.pth`` (``args`` Namespace allow-listed, ``module.`` prefixes, ``BlockChunk`` keys, teacher-norm
statistics; a training ``checkpoint.pth`` too, its optimizer and schedules named and not used) or an
exported folder. The positional embedding is resampled when the checkpoint was
trained at another resolution (336 → 448 px).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from dune_scale.engine.export import StudentFileError, read_student
from dune_scale.models.vit import resample_pos_embed


class PretrainedError(ValueError):
    """The pretrained student weights cannot be used (named in the message)."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The student weights of ``path`` in our layout (official DUNE files and checkpoints of every
    strategy are converted by :func:`dune_scale.engine.export.read_student`)."""
    try:
        return read_student(path).state
    except StudentFileError as err:
        raise PretrainedError(f"student.pretrained: {err}") from None


def load_pretrained_student(student: nn.Module, path: Path) -> None:
    """Encoder weights strictly; projectors and teacher norms where the checkpoint has them."""
    state = read_state_dict(path)
    own = student.state_dict()
    key = "encoder.pos_embed"
    if key in state and state[key].shape != own[key].shape:
        # The table the stage-1 encoder itself would use at the new resolution (DINOv2's rule).
        grid = math.isqrt(own[key].shape[1] - 1)
        encoder = student.encoder
        state[key] = resample_pos_embed(state[key], grid, grid, encoder.interpolate_offset, encoder.interpolate_antialias)
    missing = [k for k in own if k.startswith("encoder.") and k not in state]
    if missing:
        raise PretrainedError(f"student.pretrained: {path} lacks encoder weights, e.g. {missing[0]}")
    for name, value in state.items():
        if name in own and value.shape != own[name].shape:
            raise PretrainedError(
                f"student.pretrained: {path}: {name} has shape {tuple(value.shape)}, the student needs {tuple(own[name].shape)}"
            )
    student.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
