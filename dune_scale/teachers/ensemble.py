"""TeacherEnsemble: the frozen teachers, run together on each batch.

Inputs are aligned as DUNE does: when a teacher's patch size differs from the student's, the
image is resized by teacher_patch / student_patch (bicubic, align_corners=True), so every
teacher's token grid equals the student's (448 px /14 → 32×32; MASt3R sees 512 px /16 → 32×32).
Weights are cast to the compute dtype (bf16 on accelerators); LayerNorms and softmax run in fp32
under autocast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dune_scale.teachers.build import build_teacher
from dune_scale.teachers.registry import get_teacher_spec


def align_images(images: torch.Tensor, teacher_patch: int, student_patch: int) -> torch.Tensor:
    if teacher_patch == student_patch:
        return images
    height, width = images.shape[-2:]
    size = (height // student_patch * teacher_patch, width // student_patch * teacher_patch)
    return F.interpolate(images.float(), size=size, mode="bicubic", align_corners=True).to(images.dtype)


class TeacherEnsemble(nn.Module):
    def __init__(
        self,
        teachers: Mapping[str, nn.Module],
        tokens: Mapping[str, Sequence[str]],
        student_patch_size: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.teachers = nn.ModuleDict(dict(teachers))
        self.tokens = {name: tuple(tokens[name]) for name in teachers}
        self.student_patch_size = student_patch_size
        self.dtype = dtype
        for teacher in self.teachers.values():
            teacher.to(dtype)
            teacher.requires_grad_(False)
        super().train(False)

    @property
    def embed_dims(self) -> dict[str, int]:
        return {name: teacher.embed_dim for name, teacher in self.teachers.items()}

    def train(self, mode: bool = True) -> TeacherEnsemble:
        """Teachers are frozen: they stay in eval mode whatever the caller asks."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        low_precision = self.dtype != torch.float32
        outputs: dict[str, dict[str, torch.Tensor]] = {}
        for name, teacher in self.teachers.items():
            aligned = align_images(images, teacher.patch_size, self.student_patch_size)
            with torch.autocast(images.device.type, dtype=self.dtype, enabled=low_precision):
                features = teacher(aligned.to(self.dtype))  # forward(), where FSDP hooks sit
            outputs[name] = {token: features[token] for token in self.tokens[name]}
        return outputs


def build_teacher_ensemble(
    configs: Sequence[Any], student_patch_size: int, device: torch.device, dtype: torch.dtype
) -> TeacherEnsemble:
    """From config entries with ``name``, ``checkpoint``, ``random_init``, ``arch``, ``tokens``."""
    teachers: dict[str, nn.Module] = {}
    tokens: dict[str, Sequence[str]] = {}
    for config in configs:
        if config.checkpoint is None and not config.random_init:
            raise ValueError(
                f"teacher {config.name}: no checkpoint given; set its checkpoint path "
                "(random weights are for tests only and need random_init: true)"
            )
        teachers[config.name] = build_teacher(config.name, config.checkpoint, **config.arch).to(device)
        tokens[config.name] = tuple(config.tokens) or get_teacher_spec(config.name).tokens
    return TeacherEnsemble(teachers, tokens, student_patch_size, dtype)
