"""A toy evaluation kind, complete in this one file: its options, its metric and the function that
runs it. Registering it is one line, ``EVAL_KINDS[TOY.name] = TOY`` (tests do it through
``monkeypatch.setitem``); then ``launch/eval.py toy``, ``eval.probes: [{kind: toy}]`` during
training and ``launch/eval.py report`` all know it.

It reports the first channel of the class token, averaged over a few seeded noise images: a
number a test can recompute from the model's weights alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dune_scale.eval.features import FeatureSource
from dune_scale.eval.probes import ProbeResult, ProbeSettings
from dune_scale.eval.registry import EvalKind, Metric


@dataclass(frozen=True)
class ToyOptions:
    images: int = field(default=4, metadata={"help": "seeded noise images the mean is taken over"})
    offset: float = field(default=0.0, metadata={"help": "added to the reported mean"})

    def problems(self) -> list[tuple[str, Any, str]]:
        return [("images", self.images, "at least 1")] if self.images < 1 else []

    def check_data(self) -> None:
        """No data to check: the images are generated."""

    @property
    def dataset(self) -> str:
        return f"noise{self.images}"


def toy_images(options: ToyOptions, seed: int, image_size: int) -> torch.Tensor:
    return torch.randn(options.images, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def run_toy(options: ToyOptions, seed: int, source: FeatureSource, settings: ProbeSettings) -> ProbeResult:
    images = toy_images(options, seed, settings.image_size).to(settings.device)
    with torch.no_grad(), source.autocast():
        cls = source.tokens(images)["cls"].float()
    return ProbeResult({"cls0": float(cls[:, 0].mean()) + options.offset}, train_images=0, val_images=options.images)


TOY = EvalKind("toy", "class token's first channel over seeded noise images (a test kind)", ToyOptions,
               (Metric("cls0", "cls[0] mean", percent=False),), run_toy)


def expected_cls0(run: Path, options: ToyOptions, seed: int = 0) -> float:
    """What the toy kind must report for the student of the run folder ``run``, recomputed from its
    ``config.yaml`` and ``student.safetensors`` alone (the encoder's weights, its own forward)."""
    from safetensors.torch import load_file

    from dune_scale.config import load_config
    from dune_scale.engine.compose import build_encoder

    cfg = load_config(run / "config.yaml")
    encoder = build_encoder(cfg)
    weights = load_file(str(run / "student.safetensors"))
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")})
    with torch.no_grad():
        cls = encoder.eval().forward_features(toy_images(options, seed, cfg.train.image_size))["cls"]
    return float(cls[:, 0].mean()) + options.offset
