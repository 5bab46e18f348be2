"""What every recipe does and most tests do not: train in bf16, and change the global batch on resume."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from conftest import TINY_CPU, tiny_overrides
from dune_scale.cli.train import train
from dune_scale.config import load_config
from dune_scale.telemetry.metrics import read_metrics

BF16 = ("train.precision=bf16", "teachers.dtype=bf16")


def _run(output: Path, shards: Path, *extra: str) -> list[dict]:
    train(load_config(TINY_CPU, tiny_overrides(output, shards, *extra)))
    return read_metrics(output / "metrics.jsonl")


def test_bf16_training_learns_and_resumes_bitwise(tmp_path: Path, demo_shards: Path) -> None:
    """bf16 autocast for the student and bf16 teachers, as the recipes train: the loss falls and a
    resumed run repeats the uninterrupted one exactly."""
    straight = _run(tmp_path / "straight", demo_shards, *BF16, "train.max_steps=12", "checkpoint.every_steps=6")
    assert all(math.isfinite(r["loss"]) for r in straight)
    assert sum(r["loss"] for r in straight[-3:]) < 0.95 * sum(r["loss"] for r in straight[:3])
    out = tmp_path / "resumed"
    _run(out, demo_shards, *BF16, "train.max_steps=6", "checkpoint.every_steps=6")
    resumed = _run(out, demo_shards, *BF16, "train.max_steps=12", "checkpoint.every_steps=6")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight]


def test_global_batch_change_on_resume_continues_from_the_samples_seen(
    tmp_path: Path, demo_shards: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Resuming with another global batch is allowed (a cluster job may get fewer nodes): it says so,
    keeps the sample count, and the learning rate follows the new batch (linear scaling rule)."""
    out = tmp_path / "run"
    first = _run(out, demo_shards, "train.max_steps=4", "checkpoint.every_steps=4")
    with caplog.at_level(logging.WARNING):
        second = _run(out, demo_shards, "train.max_steps=6", "train.batch_size_per_rank=6", "checkpoint.every_steps=4")
    assert "the global batch changed from 12 to 6" in caplog.text
    assert second[:4] == first
    assert [r["samples_seen"] for r in second[4:]] == [48 + 6, 48 + 12]
    cfg_small = load_config(TINY_CPU, tiny_overrides(out, demo_shards, "train.batch_size_per_rank=6"))
    cfg_large = load_config(TINY_CPU, tiny_overrides(out, demo_shards))
    assert cfg_small.peak_lr(1) == pytest.approx(cfg_large.peak_lr(1) / 2)
