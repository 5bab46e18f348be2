"""Gradient accumulation, activation checkpointing and per-block compile change memory or speed, not the step."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import TINY_CPU
from dune_scale.config import load_config
from dune_scale.distributed import DistInfo
from dune_scale.engine.compose import build_trainer, check_run


def _batches(images: torch.Tensor, names: list[str], size: int):
    while True:
        for start in range(0, len(images), size):
            yield {"images": images[start : start + size], "dataset": names[start : start + size],
                   "index": torch.arange(start, start + size)}


def _one_step(tmp_path: Path, batch: int, accum: int, *extra: str) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = load_config(TINY_CPU, [f"run.output_dir={tmp_path}", f"data.remote_root={tmp_path}", "distill.teacher_drop=none",
                                 f"train.batch_size_per_rank={batch}", f"train.grad_accum_steps={accum}",
                                 # eps 1e-6: Adam's first step would blow the float noise of exactly-zero
                                 # gradients (the key bias) up to ±lr with the recipe's 1e-15.
                                 "optim.lr_reference_batch=24", "optim.eps=1e-6", *extra])
    trainer = build_trainer(cfg, DistInfo(), check_run(cfg, DistInfo()), loader=None)
    images = torch.randn(24, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    trainer.state.step = 20  # past warm-up: a non-zero learning rate
    metrics = trainer.train_step(_batches(images, ["synth_dino2"] * 24, batch))[""]
    return metrics, {k: v.detach().clone() for k, v in trainer.students[0].strategy.module.state_dict().items()}


def test_accumulated_micro_batches_equal_one_large_batch(tmp_path: Path) -> None:
    large, large_weights = _one_step(tmp_path, 24, 1)
    accumulated, accumulated_weights = _one_step(tmp_path, 12, 2)
    torch.testing.assert_close(accumulated["loss"], large["loss"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(accumulated["grad_norm"], large["grad_norm"], rtol=1e-5, atol=1e-7)
    # atol: Adam's first step divides by |g| + eps, so float noise in a near-zero gradient element
    # shows as ~1e-6 here (the fused AdamW rounds differently from the for-loop one).
    for key, value in large_weights.items():  # includes the teacher norms' running statistics
        torch.testing.assert_close(accumulated_weights[key], value, rtol=1e-5, atol=5e-6, msg=key)


def test_activation_checkpointing_gives_the_same_step(tmp_path: Path) -> None:
    plain, plain_weights = _one_step(tmp_path, 12, 1)
    checkpointed, checkpointed_weights = _one_step(tmp_path, 12, 1, "train.activation_checkpointing=true")
    assert torch.equal(checkpointed["loss"], plain["loss"]) and torch.equal(checkpointed["grad_norm"], plain["grad_norm"])
    assert checkpointed_weights.keys() == plain_weights.keys()  # parameter names unchanged by the wrapper
    for key, value in plain_weights.items():
        assert torch.equal(checkpointed_weights[key], value), key


def test_compiled_blocks_give_the_same_step(tmp_path: Path) -> None:
    plain, plain_weights = _one_step(tmp_path, 12, 1)
    compiled, compiled_weights = _one_step(tmp_path, 12, 1, "train.compile=true")
    torch.testing.assert_close(compiled["loss"], plain["loss"], rtol=1e-5, atol=1e-6)
    assert compiled_weights.keys() == plain_weights.keys()  # Module.compile keeps parameter names
    for key, value in plain_weights.items():
        torch.testing.assert_close(compiled_weights[key], value, rtol=1e-4, atol=1e-5, msg=key)
