"""The seed-style DUNE step: the baseline every throughput the project publishes is divided by.

A GPU time alone says little (another card, driver or day changes it); dune_scale's step divided
by this step, measured in the same process on the same device, does not. The step is what a
first implementation on top of timm looks like: timm ViTs for the frozen teachers (weights fp32
under bf16 autocast, or cast to bf16), a timm ViT student with one transformer block + linear
per teacher as projector, the loss written in plain torch, AdamW, global norm clipping. Its maths
and structure are kept as the original measurement (``../shared/perf/reference_step.py``) had them
so ratios stay comparable across releases; only the shapes come from the recipe being benchmarked
(student and teacher widths, depths, heads, patch sizes, registers, image and batch size).

Variants: ``seed`` (eager, teacher weights fp32 under autocast), ``bf16teach`` (teacher weights
cast to bf16), ``compiled`` (bf16 teachers, student, projectors and teacher calls compiled).
timm is needed only here (a dev dependency): it is imported when the reference runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REFERENCE_VARIANTS = ("seed", "bf16teach", "compiled")


class ReferenceUnavailable(RuntimeError):
    """The reference cannot run here (timm missing); the message says what to install."""


@dataclass(frozen=True)
class VitShape:
    """The timm ``VisionTransformer`` settings of one network of the reference step."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int
    reg_tokens: int
    init_values: float | None  # layer scale; None = no layer-scale module (MASt3R)


@dataclass(frozen=True)
class ReferenceWork:
    """What one reference step computes: the recipe's shapes, the seed's structure."""

    teachers: dict[str, VitShape]
    student: VitShape
    projector_depth: int
    projector_mlp_ratio: float
    batch_size: int
    image_size: int


@dataclass
class ReferenceResult:
    name: str
    status: str = "ok"  # "ok" | "failed"
    error: str | None = None
    img_per_s: float | None = None
    step_time_s: float | None = None
    teacher_time_s: float | None = None
    peak_memory_gib: float | None = None
    final_loss: float | None = None


def require_timm() -> Any:
    try:
        import timm.models.vision_transformer as timm_vit
    except ImportError:
        raise ReferenceUnavailable(
            "the seed-style reference step is built from timm, which is not installed: pip install timm "
            "(it is in the dev extra: pip install -e '.[dev]')"
        ) from None
    return timm_vit


def _vit(shape: VitShape) -> nn.Module:
    return require_timm().VisionTransformer(
        img_size=shape.img_size, patch_size=shape.patch_size, embed_dim=shape.embed_dim, depth=shape.depth,
        num_heads=shape.num_heads, reg_tokens=shape.reg_tokens, init_values=shape.init_values, num_classes=0,
        dynamic_img_size=False,
    )


class ReferenceModels(nn.Module):
    """Frozen teachers, the student and its projectors, as the seed builds them."""

    def __init__(self, work: ReferenceWork) -> None:
        super().__init__()
        block = require_timm().Block
        self.teachers = nn.ModuleDict({name: _vit(shape) for name, shape in work.teachers.items()})
        self.teachers.eval().requires_grad_(False)
        self.student = _vit(work.student)
        dim, heads = work.student.embed_dim, work.student.num_heads
        self.projectors = nn.ModuleDict(
            {
                name: nn.Sequential(
                    *(block(dim, heads, mlp_ratio=work.projector_mlp_ratio, init_values=1e-4) for _ in range(work.projector_depth)),
                    nn.Linear(dim, shape.embed_dim),
                )
                for name, shape in work.teachers.items()
            }
        )
        self.image_scale = {name: shape.patch_size / work.student.patch_size for name, shape in work.teachers.items()}


def teacher_tokens(teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = teacher.forward_features(images)
    return out[:, 0], out[:, teacher.num_prefix_tokens :]


def seed_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Teacher standardised over all but the channel dim, then ½ cosine + ½ smooth-L1 (the seed's maths)."""
    dims = tuple(range(teacher.dim() - 1))
    teacher = (teacher - teacher.mean(dim=dims)) / teacher.std(dim=dims).clamp_min(1e-3)
    student, teacher = student.float(), teacher.float()
    return 0.5 * (1 - F.cosine_similarity(student, teacher, dim=-1)).mean() + 0.5 * F.smooth_l1_loss(student, teacher)


TeacherFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ReferenceStep:
    """One variant: models, optimizer, and the per-teacher calls (compiled or eager)."""

    def __init__(self, work: ReferenceWork, variant: str, device: torch.device) -> None:
        if variant not in REFERENCE_VARIANTS:
            raise ValueError(f"unknown reference variant {variant!r}; choose from {', '.join(REFERENCE_VARIANTS)}")
        torch.manual_seed(0)
        self.device = device
        self.models = ReferenceModels(work).to(device)
        if variant != "seed":
            self.models.teachers.to(torch.bfloat16)
        self.params = [*self.models.student.parameters(), *self.models.projectors.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, fused=device.type == "cuda")
        self.teacher_fns: dict[str, TeacherFn] = {
            name: (lambda images, t=teacher: teacher_tokens(t, images)) for name, teacher in self.models.teachers.items()
        }
        if variant == "compiled":
            self.models.student.compile()
            self.models.projectors.compile()
            self.teacher_fns = {name: torch.compile(fn) for name, fn in self.teacher_fns.items()}

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def teachers_forward(self, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        outputs = {}
        with torch.no_grad(), self._autocast():
            for name, fn in self.teacher_fns.items():
                scale = self.models.image_scale[name]
                aligned = images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bicubic", align_corners=True)
                outputs[name] = fn(aligned)
        return outputs

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        targets = self.teachers_forward(images)
        student = self.models.student
        with self._autocast():
            features = student.forward_features(images)
            loss = torch.zeros((), device=images.device)
            for name, projector in self.models.projectors.items():
                out = projector(features)
                t_cls, t_patch = targets[name]
                loss = loss + seed_loss(out[:, 0], t_cls) + seed_loss(out[:, student.num_prefix_tokens :], t_patch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def mean_seconds(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Mean time of ``fn`` after ``warmup`` discarded calls: CUDA events on a GPU, wall clock on CPU."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        begin = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - begin) / steps
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1000.0 / steps


def reference_images(work: ReferenceWork, device: torch.device) -> torch.Tensor:
    """One synthetic batch on the device (ImageNet-normalised images ≈ N(0, 1)), as the seed used."""
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randn(work.batch_size, 3, work.image_size, work.image_size, generator=generator, device=device)


def measure_reference(
    work: ReferenceWork, variant: str, images: torch.Tensor, steps: int, warmup: int, result: ReferenceResult
) -> None:
    """Time ``variant`` on ``images`` (full step, then the teachers alone); fill ``result``."""
    device = images.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # CUDA is initialised: ``images`` lives there
    step = ReferenceStep(work, variant, device)
    losses: list[torch.Tensor] = []
    result.step_time_s = mean_seconds(lambda: losses.append(step(images)), steps, max(warmup, 1), device)
    result.teacher_time_s = mean_seconds(lambda: step.teachers_forward(images), max(2, steps // 2), 1, device)
    result.img_per_s = work.batch_size / result.step_time_s
    result.final_loss = float(losses[-1])
    if device.type == "cuda":
        result.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30


def ratios(img_per_s: float | None, results: list[ReferenceResult]) -> dict[str, float]:
    """dune_scale's img/s ÷ each successful reference variant's img/s (same device, same call)."""
    if img_per_s is None:
        return {}
    return {r.name: img_per_s / r.img_per_s for r in results if r.status == "ok" and r.img_per_s}
