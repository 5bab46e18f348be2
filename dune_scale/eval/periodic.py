"""What the trainer runs between steps to show that the student learns: held-out validation, the k-NN
probe, the probes of ``eval.probes`` and feature pictures, each on its own schedule and at the end of
training. None of them draws from the training's random streams or leaves a module changed, so a run
with them trains exactly as one without.

The trainer calls :meth:`PeriodicEvaluation.run` after every step on every rank (the student's forward
is collective under sharded strategies) with every student it trains, and writes the records it
returns to each student's metrics sinks. Validation runs the teachers once for all students.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dune_scale.config import EvalConfig
from dune_scale.distributed import DistInfo, all_reduce_max
from dune_scale.eval.features import ENCODER, student_source
from dune_scale.eval.probes import ProbeResult, ProbeSettings
from dune_scale.eval.registry import KnnOptions, ProbeSpec
from dune_scale.eval.validation import Validator, eval_mode, preserved_rng

log = logging.getLogger(__name__)

# encoder, probe images (B, 3, H, W) → RGB pictures (B, h, w, 3) uint8, e.g. a PCA map of patch features.
FeaturePictures = Callable[[nn.Module, torch.Tensor], np.ndarray]
PICTURES_FOLDER = "pictures"
PROBE_IMAGES = 4


@contextlib.contextmanager
def whole_encoder(module: nn.Module) -> Iterator[nn.Module]:
    """The student's encoder, callable on its own: an FSDP2 root keeps the encoder's small leftovers
    (patch embedding, tokens, norm) sharded until its own forward, so gather them around the call."""
    unshard = getattr(module, "unshard", None)
    if unshard is not None:
        unshard()
    try:
        yield module.encoder
    finally:
        if unshard is not None:
            module.reshard()


@dataclass(frozen=True)
class EvaluatedStudent:
    """One student as evaluation sees it: its strategy (module, forward, autocast), its objective
    (teacher names, loss weights) and the folder its pictures go to."""

    strategy: Any
    objective: Any
    output_dir: Path


def knn_spec(eval_cfg: EvalConfig) -> ProbeSpec | None:
    """``eval.knn_*`` as the registry's ``knn`` probe (run on ``eval.knn_every_steps``), None unset."""
    if not (eval_cfg.knn_train and eval_cfg.knn_val):
        return None
    options = KnnOptions(eval_cfg.knn_train, eval_cfg.knn_val, eval_cfg.knn_k, eval_cfg.knn_temperature)
    return ProbeSpec("knn", options, batch_size=eval_cfg.knn_batch_size)


class PeriodicEvaluation:
    """The ``eval`` section's work during training: every kind of probe comes from the registry
    (``eval.probes``, and ``eval.knn_*`` as its ``knn`` kind)."""

    def __init__(
        self,
        eval_cfg: EvalConfig,
        image_size: int,
        dist: DistInfo,
        validator: Validator | None = None,
        feature_pictures: FeaturePictures | None = None,
        probes: list[ProbeSpec] | None = None,
    ) -> None:
        self.cfg = eval_cfg
        self.knn = knn_spec(eval_cfg)
        self.probes = probes or []
        self.image_size = image_size
        self.dist = dist
        self.validator = validator
        self.feature_pictures = feature_pictures
        self._probe: torch.Tensor | None = None

    @staticmethod
    def _due(every: int | None, step: int, final: bool) -> bool:
        return every is not None and (final or step % every == 0)

    def due(self, step: int, final: bool) -> bool:
        """Is anything to run after ``step``?"""
        validates = self.validator is not None and self._due(self.cfg.every_steps, step, final)
        return validates or self._probes_due(step, final) or self._due(self.cfg.knn_every_steps, step, final)

    def _probes_due(self, step: int, final: bool) -> bool:
        """``eval.probes`` run every ``eval.probe_every_steps`` (when set) and at the end."""
        every = self.cfg.probe_every_steps
        return bool(self.probes) and (final or (every is not None and step % every == 0))

    def run(
        self, students: Mapping[str, EvaluatedStudent], step: int, samples_seen: int, final: bool,
        stop_requested: Callable[[], bool],
    ) -> dict[str, list[dict[str, Any]]]:
        """Each student's records of what is due after ``step`` (nothing most steps); collective on
        every rank."""
        records: dict[str, list[dict[str, Any]]] = {name: [] for name in students}
        if self.validator is not None and self._due(self.cfg.every_steps, step, final):
            members = {name: (student.strategy, student.objective) for name, student in students.items()}
            for name, found in self.validator.run(members, step, samples_seen, stop_requested).items():
                records[name] += found
            if self.feature_pictures is not None and not self._any_rank_stopping(stop_requested):
                for name, student in students.items():
                    records[name].append(self._write_pictures(student, step, samples_seen))
        if self._due(self.cfg.knn_every_steps, step, final) and not self._any_rank_stopping(stop_requested):
            for name, student in students.items():
                records[name].append(self._knn(name, student.strategy, step, samples_seen))
        if self._probes_due(step, final) and not self._any_rank_stopping(stop_requested):
            for name, student in students.items():
                records[name] += [self._run_probe(spec, name, student.strategy, step, samples_seen) for spec in self.probes]
        return records

    def _any_rank_stopping(self, stop_requested: Callable[[], bool]) -> bool:
        """Agreed by every rank, since what follows runs collective forwards."""
        return bool(all_reduce_max(torch.tensor([float(stop_requested())], device=self.dist.device)).item())

    def _knn(self, name: str, strategy: Any, step: int, samples_seen: int) -> dict[str, Any]:
        """The ``eval.knn_*`` probe's record (named by the folder of ``eval.knn_val``)."""
        result = self._probe_result(self.knn, name, strategy)
        options = self.knn.options
        return {"step": step, "samples_seen": samples_seen, "kind": "knn", "dataset": Path(options.val).name,
                **result.metrics, "k": options.k, "temperature": options.temperature}

    def _probe_result(self, spec: ProbeSpec, name: str, strategy: Any) -> ProbeResult:
        """A probe on the student, spread over the ranks (collective)."""
        settings = ProbeSettings(self.image_size, self.dist.device, spec.batch_size, rank=self.dist.rank,
                                 world=self.dist.world_size)
        with eval_mode(strategy.module) as module, preserved_rng(self.dist.device), whole_encoder(module):
            return spec.run(student_source(module, spec.features, name or "student", strategy.autocast), settings)

    def _run_probe(self, spec: ProbeSpec, name: str, strategy: Any, step: int, samples_seen: int) -> dict[str, Any]:
        """One probe of ``eval.probes``' record."""
        result = self._probe_result(spec, name, strategy)
        dataset = spec.options.dataset if spec.features == ENCODER else f"{spec.options.dataset}.{spec.features}"
        return {"step": step, "samples_seen": samples_seen, "kind": spec.kind, "dataset": dataset, **result.metrics,
                "features": spec.features, "images": result.val_images, "train_images": result.train_images,
                "skipped": result.skipped_count}

    def _probe_images(self) -> torch.Tensor:
        """The first images of the first validation loader: the same pictures at every validation."""
        if self._probe is None:
            with preserved_rng(self.dist.device):
                batch = next(iter(self.validator.loaders[0]))
            self._probe = batch["images"][:PROBE_IMAGES].clone()
        return self._probe

    def _write_pictures(self, student: EvaluatedStudent, step: int, samples_seen: int) -> dict[str, Any]:
        """PNG files (main rank) and the record naming them, which image-aware sinks display."""
        probe = self._probe_images().to(self.dist.device)
        strategy = student.strategy
        with eval_mode(strategy.module) as module, torch.no_grad(), whole_encoder(module) as encoder, strategy.autocast():
            pictures = self.feature_pictures(encoder, probe)
        folder = student.output_dir / PICTURES_FOLDER
        paths = [folder / f"step_{step:09d}_{i}.png" for i in range(len(pictures))]
        if self.dist.is_main:
            from PIL import Image

            folder.mkdir(parents=True, exist_ok=True)
            for path, picture in zip(paths, np.asarray(pictures, dtype=np.uint8)):
                Image.fromarray(picture).save(path)
        return {"step": step, "samples_seen": samples_seen, "kind": "pictures", "dataset": "probe",
                "paths": [str(path.relative_to(student.output_dir)) for path in paths]}
