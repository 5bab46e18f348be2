"""TeacherEnsemble: the frozen teachers, run together on each batch.

Inputs are aligned as DUNE does: when a teacher's patch size differs from the student's, the
image is resized by teacher_patch / student_patch (bicubic, align_corners=True), so every
teacher's token grid equals the student's (448 px /14 → 32×32; MASt3R sees 512 px /16 → 32×32).
Weights are kept in ``param_dtype`` (fp32 by default, as the official code: norms, layer scales,
positional embeddings and the residual stream stay fp32) and run under autocast to the compute
``dtype`` (bf16 on accelerators); features come back in the dtype autocast leaves them and the loss
upcasts them. See ``teachers.precision``.
The ensemble stays a plain module: sharding (FSDP2) is applied to it from outside.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dune_scale.config import TOKEN_TYPES, TeacherConfig
from dune_scale.teachers.build import build_teacher
from dune_scale.teachers.precision import quantize_linears_fp8
from dune_scale.teachers.registry import get_teacher_spec


def align_images(images: torch.Tensor, teacher_patch: int, student_patch: int) -> torch.Tensor:
    """Resize so the teacher's token grid equals the student's.

    DUNE passes ``scale_factor=teacher_patch / student_patch``; with ``align_corners=True`` only the
    output size matters, and for sides that are multiples of the student patch it is exactly
    side / student_patch · teacher_patch, which is what is computed here (no float rounding).
    """
    if teacher_patch == student_patch:
        return images
    height, width = images.shape[-2:]
    if height % student_patch or width % student_patch:
        raise ValueError(f"image size {height}x{width} is not a multiple of the student patch size {student_patch}")
    size = (height // student_patch * teacher_patch, width // student_patch * teacher_patch)
    return F.interpolate(images.float(), size=size, mode="bicubic", align_corners=True).to(images.dtype)


class TeacherEnsemble(nn.Module):
    """Frozen teachers → ``{teacher: {token type: features}}`` for the distilled token types only."""

    def __init__(
        self,
        teachers: Mapping[str, nn.Module],
        tokens: Mapping[str, Sequence[str]],
        student_patch_size: int,
        dtype: torch.dtype = torch.float32,
        param_dtype: torch.dtype | None = None,
    ) -> None:
        """``dtype``: autocast's (fp32: none); ``param_dtype``: the weights' (default ``dtype``)."""
        super().__init__()
        for name in teachers:
            chosen = tuple(tokens[name])
            if not chosen or set(chosen) - set(TOKEN_TYPES):
                raise ValueError(f"teacher {name}: token types must be a non-empty subset of {TOKEN_TYPES}, got {chosen}")
        self.teachers = nn.ModuleDict(dict(teachers))
        self.tokens = {name: tuple(tokens[name]) for name in teachers}
        self.student_patch_size = student_patch_size
        self.dtype = dtype
        for teacher in self.teachers.values():
            teacher.to(param_dtype or dtype)
            teacher.requires_grad_(False)
        super().train(False)

    @property
    def embed_dims(self) -> dict[str, int]:
        return {name: teacher.embed_dim for name, teacher in self.teachers.items()}

    def train(self, mode: bool = True) -> TeacherEnsemble:
        """Teachers are frozen: they stay in eval mode whatever the caller asks."""
        return super().train(False)

    def _precision(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Autocast for low-precision weights; nothing in fp32 (also where autocast does not exist, e.g. meta)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    @torch.no_grad()  # not inference_mode: the features are loss targets next to tensors with grad
    def forward(
        self, images: torch.Tensor, timed: Callable[[str], contextlib.AbstractContextManager] | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``timed(name)``: a context around each teacher's work (the benchmark's per-teacher phases)."""
        outputs: dict[str, dict[str, torch.Tensor]] = {}
        for name, teacher in self.teachers.items():
            with timed(name) if timed is not None else contextlib.nullcontext():
                aligned = align_images(images, teacher.patch_size, self.student_patch_size)
                with self._precision(images.device):
                    features = teacher(aligned)  # forward(), where FSDP hooks sit
            outputs[name] = {token: features[token] for token in self.tokens[name]}
        return outputs


def build_teacher_ensemble(
    configs: Sequence[TeacherConfig],
    student_patch_size: int,
    device: torch.device | str,
    dtype: torch.dtype,
    param_dtype: torch.dtype | None = None,
    fp8: bool = False,
    attention: str = "auto",
) -> TeacherEnsemble:
    """From the ``teachers.models`` entries (empty ``tokens``: the teacher's DUNE default). ``dtype`` is autocast's, ``param_dtype`` the
    weights' (default ``dtype``); ``fp8`` quantises every linear layer (``teachers.dtype=fp8``);
    every teacher uses the ``attention`` backend."""
    teachers: dict[str, nn.Module] = {}
    tokens: dict[str, Sequence[str]] = {}
    for config in configs:
        if config.checkpoint is None and not config.random_init:
            raise ValueError(
                f"teacher {config.name}: no checkpoint given; set its checkpoint path "
                "(random weights are for tests and the demo only and need random_init: true)"
            )
        teacher = build_teacher(config.name, config.checkpoint, attention, **config.arch)
        teachers[config.name] = teacher.to(device=device, dtype=param_dtype or dtype)  # one copy on the device, already cast
        tokens[config.name] = tuple(config.tokens) or get_teacher_spec(config.name).tokens
    ensemble = TeacherEnsemble(teachers, tokens, student_patch_size, dtype, param_dtype)
    if fp8:  # after every cast: quantised weights are not cast again
        for teacher in ensemble.teachers.values():
            quantize_linears_fp8(teacher)
    return ensemble
