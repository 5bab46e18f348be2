"""Held-out validation: the distillation loss per dataset and teacher on data the student never trains on.

As in DUNE's evaluation loop, the student runs in eval mode, every teacher counts (no teacher
dropping) and teacher features are standardised with the *running* statistics, so the numbers depend
only on the weights and the data: a resumed run reports the same values as an uninterrupted one.
Validation draws no random numbers from the training streams (the global RNGs are restored after it).

Several students trained on one teacher pass are validated on one teacher pass too: each batch's
teacher features are computed once and every student's forward and losses follow.

Input is a list of re-iterable loaders yielding training-style batches (``images``, ``dataset``);
samples are grouped by their own ``dataset`` name, so one loader per dataset and one mixed loader
work alike. Every rank runs the same number of batches (the ranks agree before each one, which also
lets a stop signal abandon a validation at the next batch), and per-dataset sums are reduced over
ranks once at the end.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from dune_scale.distill.loss_terms import loss_terms, split_fields, term_keys
from dune_scale.distributed import all_reduce_max, all_reduce_sum

Batch = Mapping[str, Any]
# A student to validate: (strategy, objective). The strategy gives ``module``, ``forward``, ``autocast``;
# the objective the teacher names and loss weights.
Member = tuple[Any, Any]
# Name of the record that sums every dataset (weighted by images).
ALL_DATASETS = "all"


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Leave python, numpy and torch (CPU + ``device``) random streams as they were: a validation
    loader's iterator draws its seed from torch's global generator."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode (no dropout, running teacher statistics), restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def lockstep_batches(
    loaders: Sequence[Iterable[Batch]], max_batches: int | None, stop_requested: Callable[[], bool], device: torch.device
) -> Iterator[Batch]:
    """The loaders' batches one after another, ``max_batches`` at most from each, while *every* rank
    still has one and no rank was asked to stop (one small max-reduction per batch)."""
    for loader in loaders:
        iterator = iter(loader)
        taken = 0
        while max_batches is None or taken < max_batches:
            batch = next(iterator, None)
            flags = torch.tensor([float(batch is None), float(stop_requested())], device=device)
            exhausted, stop = all_reduce_max(flags).tolist()
            if stop:
                raise ValidationAbandoned
            if exhausted:
                break
            taken += 1
            yield batch


class ValidationAbandoned(Exception):
    """A rank was asked to stop (preemption): the validation is dropped so that saving starts now."""


class Validator:
    """Validation loss per dataset and teacher: loss, weighted cosine / smooth-L1 parts, cls / patch."""

    def __init__(
        self,
        loaders: Sequence[Iterable[Batch]],
        dataset_names: Sequence[str],
        teachers: nn.Module,
        device: torch.device,
        max_batches: int | None = None,
    ) -> None:
        if not dataset_names:
            raise ValueError("validation needs the names of the datasets its loaders hold")
        self.loaders = list(loaders)
        self.dataset_names = list(dataset_names)
        self.index = {name: i for i, name in enumerate(self.dataset_names)}
        self.teachers = teachers
        self.device = device
        self.max_batches = max_batches

    def run(
        self, members: Mapping[str, Member], step: int, samples_seen: int, stop_requested: Callable[[], bool] = lambda: False
    ) -> dict[str, list[dict[str, Any]]]:
        """Collective on every rank; per student (by name), one record per dataset seen plus the ``all``
        record, or nothing when a stop signal abandoned the validation."""
        start = time.perf_counter()
        try:
            with contextlib.ExitStack() as modes:
                for strategy, _ in members.values():
                    modes.enter_context(eval_mode(strategy.module))
                modes.enter_context(preserved_rng(self.device))
                modes.enter_context(torch.no_grad())
                sums = self._accumulate(members, stop_requested)
        except ValidationAbandoned:
            return {name: [] for name in members}
        seconds = time.perf_counter() - start
        return {
            name: self._records(members[name][1], keys, totals, counts, step, samples_seen, seconds)
            for name, (keys, totals, counts) in sums.items()
        }

    def _accumulate(
        self, members: Mapping[str, Member], stop_requested: Callable[[], bool]
    ) -> dict[str, tuple[list[tuple[str, str]], torch.Tensor, torch.Tensor]]:
        """Per student: (term keys, per-dataset sums [datasets, keys, 2], images per dataset), over ranks."""
        keys = {name: term_keys(strategy.module.teacher_tokens, objective.teacher_names) for name, (strategy, objective) in members.items()}
        sums = {name: torch.zeros(len(self.dataset_names), len(keys[name]), 2, device=self.device, dtype=torch.float64) for name in members}
        counts = torch.zeros(len(self.dataset_names), device=self.device, dtype=torch.float64)
        for batch in lockstep_batches(self.loaders, self.max_batches, stop_requested, self.device):
            images = batch["images"].to(self.device, non_blocking=True)
            teacher_out = self.teachers(images)  # once for every student
            membership = self._membership(batch["dataset"])  # [datasets, B]
            for name, (strategy, objective) in members.items():
                # Eval-mode teacher norms return their running statistics (no update, no collective).
                stats = objective.teacher_statistics([teacher_out], strategy.module.teacher_norms, 0.0)
                with strategy.autocast():
                    student_out = strategy.forward(images)
                terms = loss_terms(student_out, teacher_out, stats, objective).double()  # [K, 2, B]
                sums[name] += torch.einsum("db,kpb->dkp", membership, terms)
            counts += membership.sum(dim=1)
        reduced = {}
        for name, totals in sums.items():
            flat = all_reduce_sum(torch.cat([totals.flatten(), counts]))
            reduced[name] = (keys[name], flat[: totals.numel()].view_as(totals), flat[totals.numel():])
        return reduced

    def _membership(self, names: Sequence[str]) -> torch.Tensor:
        unknown = sorted(set(names) - set(self.index))
        if unknown:
            raise ValueError(f"validation batch holds dataset(s) {unknown} not in {self.dataset_names}")
        rows = torch.zeros(len(self.dataset_names), len(names), dtype=torch.float64)
        rows[[self.index[n] for n in names], torch.arange(len(names))] = 1.0
        return rows.to(self.device)

    def _records(
        self, objective: Any, keys: list[tuple[str, str]], sums: torch.Tensor, counts: torch.Tensor, step: int,
        samples_seen: int, seconds: float,
    ) -> list[dict[str, Any]]:
        counts_list = counts.tolist()
        if not sum(counts_list):  # empty validation loaders
            return []
        groups = [(name, sums[i], counts_list[i]) for i, name in enumerate(self.dataset_names) if counts_list[i] > 0]
        groups.append((ALL_DATASETS, sums.sum(dim=0), sum(counts_list)))
        records = []
        for name, total, images in groups:
            means = (total / images).tolist()
            fields = split_fields(keys, means)
            teachers = {t: fields[f"loss_{t}_cos"] + fields[f"loss_{t}_sl1"] for t in objective.teacher_names}
            record: dict[str, Any] = {"step": step, "samples_seen": samples_seen, "kind": "val", "dataset": name,
                                      "images": int(images), "loss": sum(teachers.values()) / len(teachers)}
            record.update({f"loss_{t}": value for t, value in teachers.items()})
            record.update(fields)
            records.append(record)
        records[-1]["seconds"] = seconds
        return records
