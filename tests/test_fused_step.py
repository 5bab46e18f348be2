"""The fused Triton loss inside a real training step (CPU interpreter): the step with the kernels
equals the step with the torch reference — loss, gradient norm and every updated weight."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from conftest import TINY_CPU
from dune_scale.config import load_config
from dune_scale.distributed import DistInfo
from dune_scale.engine.compose import build_trainer, check_run


def _batches(images: torch.Tensor, names: list[str]):
    while True:
        yield {"images": images, "dataset": names, "index": torch.arange(len(names))}


def _step(tmp_path: Path, fused: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    cfg = load_config(TINY_CPU, [f"run.output_dir={tmp_path}", f"data.remote_root={tmp_path}",
                                 "train.batch_size_per_rank=3", "distill.teacher_drop=lowest_loss",
                                 # eps 1e-6: Adam's first step would blow the float noise of exactly-zero
                                 # gradients (the key bias) up to ±lr with the recipe's 1e-15.
                                 "optim.eps=1e-6"])
    trainer = build_trainer(cfg, DistInfo(), check_run(cfg, DistInfo()), loader=None)
    if fused:
        from kernels.distill_loss import triton_distill_loss

        student = trainer.students[0]
        student.objective = dataclasses.replace(student.objective, loss_fn=triton_distill_loss)
    trainer.state.step = 20  # past warm-up: a non-zero learning rate
    images = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    metrics = trainer.train_step(_batches(images, ["synth_dino2", "synth_mast3r", "synth_multihmr"]))[""]
    return metrics, {k: v.detach().clone() for k, v in trainer.students[0].strategy.module.state_dict().items()}


def test_fused_kernels_in_a_training_step_equal_the_reference(tmp_path: Path) -> None:
    import triton

    assert not isinstance(triton.language.sum, triton.runtime.JITFunction), "conftest sets TRITON_INTERPRET=1 first"
    reference, reference_weights = _step(tmp_path, fused=False)
    fused, fused_weights = _step(tmp_path, fused=True)
    torch.testing.assert_close(fused["loss"], reference["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused["teachers"], reference["teachers"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused["grad_norm"], reference["grad_norm"], rtol=1e-4, atol=1e-6)
    for key, value in reference_weights.items():
        torch.testing.assert_close(fused_weights[key], value, rtol=1e-4, atol=5e-6, msg=key)
