"""The analytic FLOP count behind MFU: a hand count for tiny_cpu, torch's own count of the same
modules, and the full vitb14_448 recipe against the figure in NOTES.md (2.99 TFLOP/img, teachers 73%)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO, TINY_CPU
from dune_scale.cli.bench import random_init_overrides
from dune_scale.config import load_config
from dune_scale.distributed import DistInfo
from dune_scale.engine.compose import build_student, build_trainer, check_run
from dune_scale.teachers import build_teacher_ensemble
from dune_scale.teachers.ensemble import align_images
from dune_scale.telemetry.flops import dune_step_flops


def block(tokens: int, dim: int, hidden: int) -> int:
    """One pre-norm ViT block, multiply-add = 2 FLOPs, term by term."""
    qkv = 2 * tokens * dim * (3 * dim)
    scores = 2 * tokens * tokens * dim  # q·kᵀ over all heads
    weighted = 2 * tokens * tokens * dim  # softmax(·)·v
    proj = 2 * tokens * dim * dim
    fc1 = 2 * tokens * dim * hidden
    fc2 = 2 * tokens * hidden * dim
    return qkv + scores + weighted + proj + fc1 + fc2


def patch_embed(patches: int, patch: int, dim: int) -> int:
    return 2 * patches * (3 * patch * patch) * dim


# tiny_cpu: 56 px images, student patch 14 → a 4×4 grid of 16 patches for the student and (inputs
# resized by teacher patch / 14) for every teacher.
STUDENT_ENCODER = 2 * block(16 + 5, 48, 192) + patch_embed(16, 14, 48)  # 2 blocks, cls + 4 registers
PROJECTOR = block(16 + 1, 48, 192) + 2 * (16 + 1) * 48 * 64  # [cls, patches] → block → Linear(48 → 64)
STUDENT_FORWARD = STUDENT_ENCODER + 3 * PROJECTOR  # one projector per teacher
TEACHERS = {
    "dino2reg_vitlarge_14": 2 * block(16 + 5, 64, 256) + patch_embed(16, 14, 64),  # cls + 4 registers
    "mast3r_vitlarge_16": 2 * block(16, 64, 256) + patch_embed(16, 16, 64),  # 64 px input, no prefix tokens
    "multihmr_vitlarge_14_672": 2 * block(16 + 1, 64, 256) + patch_embed(16, 14, 64),  # cls only
}


@pytest.fixture(scope="module")
def tiny_trainer():
    # SDPA's reference kernel decomposes into matmuls, which torch's FLOP counter sees.
    cfg = load_config(TINY_CPU, ["run.console=none", "student.attention=math", "teachers.attention=math"])
    return build_trainer(cfg, DistInfo(), check_run(cfg, DistInfo()), [])


def test_hand_count_for_tiny_cpu(tiny_trainer) -> None:
    assert STUDENT_FORWARD == 6_694_848  # the sums above, spelled out once
    assert sum(TEACHERS.values()) == 15_102_976
    flops = dune_step_flops(tiny_trainer.students[0].strategy.module, tiny_trainer.teachers.teachers, 56)
    assert flops.student_forward == STUDENT_FORWARD
    assert flops.teachers_forward == sum(TEACHERS.values())
    # Teachers run forward only; the student and its projectors forward + backward (= 2× forward).
    assert flops.total == sum(TEACHERS.values()) + 3 * STUDENT_FORWARD == 35_187_520


def test_torch_flop_counter_agrees(tiny_trainer) -> None:
    """torch.utils.flop_counter counts the matmuls and convolutions the modules actually run."""
    images = torch.randn(2, 3, 56, 56)
    for name, teacher in tiny_trainer.teachers.teachers.items():
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            teacher(align_images(images, teacher.patch_size, 14))
        assert counter.get_total_flops() == 2 * TEACHERS[name], name
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tiny_trainer.students[0].strategy.module(images)
    assert counter.get_total_flops() == 2 * STUDENT_FORWARD


def test_vitb14_448_recipe_matches_notes() -> None:
    """ViT-B/14 @448 + 3 projectors, 3 ViT-L teachers at 448/512/448 px (NOTES.md: 2.99 TFLOP/img,
    teachers 73%); the full-size modules are built on the meta device (no memory, no init)."""
    recipe = REPO / "configs" / "vitb14_448.yaml"
    cfg = load_config(recipe, random_init_overrides(load_config(recipe)))
    with torch.device("meta"):
        teachers = build_teacher_ensemble(cfg.teachers.models, cfg.student.patch_size, torch.device("meta"), torch.bfloat16)
        student = build_student(cfg, teachers.embed_dims, teachers.tokens)
    flops = dune_step_flops(student, teachers.teachers, cfg.train.image_size)
    assert flops.total == pytest.approx(2.99e12, rel=2e-3)
    assert flops.teachers_share == pytest.approx(0.73, abs=0.01)
    # Per ViT-L teacher ≈ 0.72 TFLOP, the student's forward (encoder + projectors) ≈ 0.27 TFLOP.
    assert flops.teachers_forward / 3 == pytest.approx(0.725e12, rel=5e-3)
    assert flops.student_forward == pytest.approx(0.273e12, rel=5e-3)
