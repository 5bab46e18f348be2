"""Analytic FLOP counts for MFU: teachers' forward + student and projectors' forward and backward.

A multiply-add counts as 2 FLOPs. Per transformer block over N tokens of width D (MLP ratio r):
  qkv projection 6·N·D², attention scores 2·N²·D, attention × values 2·N²·D, output projection
  2·N·D², MLP 4·r·N·D²  →  (8 + 4r)·N·D² + 4·N²·D   (= 24·N·D² + 4·N²·D for r = 4).
Patch embedding: 2·N·(3·p²)·D. LayerNorms, softmax, GELU, RoPE and the loss are left out (a few
per cent at most), as is usual for MFU. Backward costs twice the forward, so a trained module
costs 3× its forward (the usual convention: it slightly overstates the student's backward, whose
patch embedding needs no input gradient). Frozen teachers run forward only. Activation
checkpointing's recomputed forward is not counted: MFU counts the model's FLOPs, not the hardware's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    return (8 + 4 * mlp_ratio) * tokens * dim**2 + 4 * tokens**2 * dim


def patch_embed_flops(patches: int, dim: int, patch_size: int, channels: int = 3) -> float:
    return 2 * patches * channels * patch_size**2 * dim


@dataclass(frozen=True)
class VitShape:
    """Enough of an encoder to count its FLOPs at one input size."""

    dim: int
    depth: int
    patch_size: int
    patches: int  # patch tokens at this input size
    prefix_tokens: int  # class + register tokens
    mlp_ratio: float = 4.0

    def forward_flops(self) -> float:
        tokens = self.patches + self.prefix_tokens
        return patch_embed_flops(self.patches, self.dim, self.patch_size) + self.depth * block_flops(tokens, self.dim, self.mlp_ratio)


def projector_flops(tokens: int, dim: int, out_dim: int, depth: int = 1, mlp_ratio: float = 4.0) -> float:
    return depth * block_flops(tokens, dim, mlp_ratio) + 2 * tokens * dim * out_dim


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per image of one training step, split the way the benchmark reports time."""

    teachers_forward: float
    student_forward: float  # encoder + projectors

    @property
    def total(self) -> float:
        return self.teachers_forward + 3 * self.student_forward

    @property
    def teachers_share(self) -> float:
        return self.teachers_forward / self.total


def step_flops_per_image(
    student: VitShape,
    teachers: list[VitShape],
    teacher_dims: list[int],
    projector_depth: int = 1,
    projector_mlp_ratio: float = 4.0,
) -> StepFlops:
    projector_tokens = student.patches + 1  # [cls, patches]: registers are dropped
    projectors = sum(
        projector_flops(projector_tokens, student.dim, out_dim, projector_depth, projector_mlp_ratio) for out_dim in teacher_dims
    )
    return StepFlops(
        teachers_forward=sum(t.forward_flops() for t in teachers),
        student_forward=student.forward_flops() + projectors,
    )


def encoder_shape(encoder: Any, patches: int) -> VitShape:
    """The shape of a built encoder (``VisionTransformer`` or ``CrocoEncoder``) at ``patches`` patch
    tokens, read from its modules so the count follows what runs (arch overrides, registers, MLP
    width). Block wrappers (activation checkpointing, compile) forward the attributes read here."""
    return VitShape(
        dim=encoder.embed_dim,
        depth=len(encoder.blocks),
        patch_size=encoder.patch_size,
        patches=patches,
        prefix_tokens=getattr(encoder, "num_prefix_tokens", 0),  # CroCo has neither class nor registers
        mlp_ratio=_mlp_ratio(encoder.blocks[0], encoder.embed_dim),
    )


def dune_step_flops(student: Any, teachers: Mapping[str, Any], image_size: int) -> StepFlops:
    """FLOPs per image of a DUNE step from the built student (``DuneStudent``: encoder + one projector
    per teacher) and teachers. Every teacher sees the student's token grid: its input is resized by
    teacher patch / student patch (MASt3R: 448 px → 512 px, 32×32 patches either way)."""
    encoder = student.encoder
    patches = (image_size // encoder.patch_size) ** 2
    projectors = list(student.projectors.values())
    depths = {len(p.blocks) for p in projectors}
    ratios = {_mlp_ratio(p.blocks[0], encoder.embed_dim) for p in projectors}
    if len(depths) != 1 or len(ratios) != 1:
        raise ValueError(f"projectors differ in depth {sorted(depths)} or MLP ratio {sorted(ratios)}")
    return step_flops_per_image(
        encoder_shape(encoder, patches),
        [encoder_shape(teacher, patches) for teacher in teachers.values()],
        [p.head.out_features for p in projectors],
        projector_depth=depths.pop(),
        projector_mlp_ratio=ratios.pop(),
    )


def _mlp_ratio(block: Any, dim: int) -> float:
    return block.mlp.fc1.out_features / dim
