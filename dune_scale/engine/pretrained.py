"""Initialise a student from a stage-1 run or a released DUNE checkpoint (stage 2).

Accepted: a run's checkpoint root (its latest complete checkpoint), one checkpoint folder, or a
weights file (``.safetensors``, or ``.pt``/``.pth`` loaded with ``weights_only=True``) holding the
full student state (``encoder.*``, ``projectors.*``, ``teacher_norms.*``) or the encoder alone,
optionally under a ``model``/``state_dict`` key. The positional embedding is resampled when the
checkpoint was trained at another resolution (336 → 448 px).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dune_scale.engine.checkpointer import LATEST, is_complete


class PretrainedError(ValueError):
    """The pretrained student weights cannot be used (named in the message)."""


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if path.is_dir():
        if not is_complete(path):
            raise PretrainedError(f"student.pretrained: checkpoint {path} is incomplete or corrupt")
        if (path / "model.pt").is_file():
            return path / "model.pt"
    raise PretrainedError(f"student.pretrained: {path} is neither a weights file nor a checkpoint folder with model.pt")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    path = _weights_file(Path(path))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
            raise PretrainedError(f"student.pretrained: cannot read {path}: {err}") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"student.pretrained: {path} does not hold a state dict of tensors")
    if not any(k.startswith("encoder.") for k in state):
        state = {f"encoder.{k}": v for k, v in state.items()}
    return state


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1+M*M, D) → (1, 1+grid*grid, D): bicubic over the patch grid, class position kept."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    side = math.isqrt(patch_pos.shape[1])
    patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


def load_pretrained_student(student: nn.Module, path: Path) -> None:
    """Encoder weights strictly; projectors and teacher norms where the checkpoint has them."""
    state = read_state_dict(path)
    own = student.state_dict()
    key = "encoder.pos_embed"
    if key in state and state[key].shape != own[key].shape:
        state[key] = resample_pos_embed(state[key], math.isqrt(own[key].shape[1] - 1))
    missing = [k for k in own if k.startswith("encoder.") and k not in state]
    if missing:
        raise PretrainedError(f"student.pretrained: {path} lacks encoder weights, e.g. {missing[0]}")
    for name, value in state.items():
        if name in own and value.shape != own[name].shape:
            raise PretrainedError(
                f"student.pretrained: {path}: {name} has shape {tuple(value.shape)}, the student needs {tuple(own[name].shape)}"
            )
    student.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
