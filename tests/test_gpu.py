"""GPU acceptance (``pytest -m gpu``, run by ``make gpu-check``): the kernels compiled for the card
against their references, compiled and FP8 teachers against eager, and a short bf16
training run that resumes bitwise. Skipped without a CUDA device, so CI on CPU stays green. Needs
neither DeepSpeed nor Streaming (synthetic batches), which the GPU machine lacks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CPU

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1" and torch.cuda.is_available(),
                       reason="TRITON_INTERPRET=1: kernels would not be compiled for the card (run via make gpu-check)"),
]

CUDA = torch.device("cuda")


def _cos_min(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).min().item()


def test_rope_kernel_on_the_card_matches_eager() -> None:
    from dune_scale.models.croco import apply_rope_2d, patch_positions, rope_2d_tables
    from kernels.rope_2d import triton_rope_2d

    gen = torch.Generator(device=CUDA).manual_seed(0)
    qkv = torch.randn(4, 32 * 32, 3, 16, 64, generator=gen, device=CUDA, dtype=torch.bfloat16)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    cos, sin = rope_2d_tables(patch_positions(32, 32, CUDA), 64, 100.0)
    got_q, got_k = triton_rope_2d(q, k, cos, sin)
    torch.testing.assert_close(got_q, apply_rope_2d(q, cos, sin), rtol=2**-7, atol=1e-5)
    torch.testing.assert_close(got_k, apply_rope_2d(k, cos, sin), rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("tokens", [577, 1025])
def test_loss_kernel_on_the_card_matches_reference(tokens: int) -> None:
    from dune_scale.distill.losses import reference_distill_loss
    from kernels.distill_loss import triton_distill_loss

    gen = torch.Generator(device=CUDA).manual_seed(0)
    student = torch.randn(8, tokens, 1024, generator=gen, device=CUDA).bfloat16().requires_grad_()
    teacher = (torch.randn(8, tokens, 1024, generator=gen, device=CUDA) * 2 + 0.5).bfloat16()
    mean, std = torch.randn(1024, device=CUDA, generator=gen) * 0.1, torch.rand(1024, device=CUDA, generator=gen) + 0.5
    grad = torch.randn(8, device=CUDA, generator=gen)
    results = []
    for fn in (reference_distill_loss, triton_distill_loss):
        loss = fn(student, teacher, mean, std)
        (ds,) = torch.autograd.grad(loss, student, grad)
        results.append((loss.float(), ds.float()))
    (ref_loss, ref_grad), (loss, ds) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(ds, ref_grad, rtol=2e-2, atol=2e-2 * ref_grad.abs().max().item())


def _full_width_teacher(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A ViT-L-wide, 2-block teacher with trained-like weights and a 448-px (student grid) batch."""
    from dune_scale.teachers import build_teacher, get_teacher_spec
    from dune_scale.teachers.fidelity import make_trained_like

    generator = torch.Generator().manual_seed(0)
    teacher = build_teacher(name, depth=2).requires_grad_(False).eval()
    make_trained_like(teacher, generator)
    side = 448 // 14 * get_teacher_spec(name).patch_size
    return teacher.to(CUDA), torch.randn(8, 3, side, side, generator=generator).to(CUDA)


@pytest.mark.parametrize("name", ["dino2reg_vitlarge_14", "mast3r_vitlarge_16"])
def test_compiled_teachers_equal_eager(name: str) -> None:
    from dune_scale.teachers.precision import compile_frozen_blocks

    teacher, images = _full_width_teacher(name)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = teacher(images)["patch"].float()
        compile_frozen_blocks(teacher.blocks)
        for _ in range(2):  # compilation, then the compiled blocks
            compiled = teacher(images)["patch"].float()
    assert _cos_min(compiled, eager) > 0.999
    torch._dynamo.reset()


def test_fp8_teachers_against_bf16() -> None:
    """torchao float8 (per-row) linears: features close to bf16's, or refused with a clear message."""
    from dune_scale.config import ConfigError
    from dune_scale.teachers.fidelity import FP8_MODE, PRECISION_MODES, precision_errors
    from dune_scale.teachers.precision import check_fp8_supported

    try:
        check_fp8_supported(CUDA)
    except ConfigError as err:
        pytest.skip(str(err))
    teacher, images = _full_width_teacher("dino2reg_vitlarge_14")
    errors = precision_errors(teacher, images, {"fp32_residual": PRECISION_MODES["fp32_residual"], "fp8": FP8_MODE})
    assert errors["fp8"]["patch"]["cos_min"] > 0.99


class ListLoader:
    """Synthetic batches with a resumable position: what the trainer needs of a loader, no Streaming."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches, self.position = batches, 0

    def __iter__(self):
        while self.position < len(self.batches):
            self.position += 1
            yield self.batches[self.position - 1]
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


def tiny_bf16_trainer_run(
    tmp_path: Path, overrides: list[str], steps: int, resume: Path | None = None, save_at: int | None = None,
    device: str = "cuda",
) -> tuple[list[float], Path | None]:
    """tiny_cpu on ``device`` (the GPU) in bf16 with synthetic batches: per-step losses, and the
    checkpoint saved after step ``save_at``."""
    from dune_scale import distributed
    from dune_scale.cli.bench import synthetic_batches
    from dune_scale.config import load_config
    from dune_scale.engine.compose import build_trainer, check_run

    cfg = load_config(TINY_CPU, [
        f"run.device={device}", "train.precision=bf16", "teachers.dtype=bf16", "run.console=none",
        f"run.output_dir={tmp_path}", "checkpoint.every_steps=1000", *overrides,
    ])  # fmt: skip
    dist = distributed.init_distributed(device)
    plan = check_run(cfg, dist)
    batches = synthetic_batches(cfg, plan, torch.device(device), 0) * 3
    trainer = build_trainer(cfg, dist, plan, ListLoader(batches))
    if resume is not None:
        trainer.restore(resume)
    stream, losses, saved = trainer.batches(), [], None
    while trainer.state.step < steps:
        losses.append(float(trainer.train_step(stream)[""]["loss"]))
        if trainer.state.step == save_at:
            saved = trainer.save()
    return losses, saved


def test_short_bf16_training_run_resumes_bitwise(tmp_path: Path) -> None:
    """tiny_cpu on the GPU in bf16 (teachers compiled by default there, fused AdamW): 6 steps
    straight equal 3 steps, a checkpoint, a new trainer restored from it, and 3 more."""
    straight, folder = tiny_bf16_trainer_run(tmp_path, [], 6, save_at=3)
    resumed, _ = tiny_bf16_trainer_run(tmp_path, [], 6, resume=folder)
    assert torch.isfinite(torch.tensor(straight)).all()
    assert resumed == straight[3:]


def test_whole_student_compile_gives_the_same_steps(tmp_path: Path) -> None:
    eager, _ = tiny_bf16_trainer_run(tmp_path / "eager", ["teachers.compile=false"], 3)
    compiled, _ = tiny_bf16_trainer_run(
        tmp_path / "compiled", ["teachers.compile=false", "train.compile=true", "train.compile_scope=model"], 3
    )
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=2e-2, atol=1e-3)
