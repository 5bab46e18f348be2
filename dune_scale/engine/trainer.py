"""The training loop: batch → teacher features → student → loss → strategy step → metrics/checkpoints.

The loop syncs with the host only at log steps (metrics are accumulated on the device) and at
checkpoint steps. Everything that determines the future of the run is in ``state`` (global) and
``rank_state`` (per rank), which the checkpointer writes and restores.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dune_scale.config import Config, parse_step_range
from dune_scale.distill.objective import DistillObjective
from dune_scale.distributed import DistInfo, all_reduce_sum, rank_seed
from dune_scale.engine.checkpointer import Checkpointer
from dune_scale.engine.nonfinite import NonFiniteGuard, nonfinite_loss_flags
from dune_scale.engine.preemption import PreemptionWatcher
from dune_scale.engine.schedules import Schedules
from dune_scale.engine.step_metrics import StepDiagnostics
from dune_scale.engine.strategies import Strategy
from dune_scale.eval.periodic import PeriodicEvaluation
from dune_scale.telemetry.metrics import ConsoleReporter, MetricsFile, Throughput, WandbSink, finite_or_none
from dune_scale.telemetry.phases import NullPhaseTimer
from dune_scale.telemetry.profiler import StepProfiler
from dune_scale.telemetry.tensorboard import TensorBoardSink, tensorboard_available

log = logging.getLogger(__name__)


@dataclass
class TrainerState:
    step: int = 0
    samples_seen: int = 0


class Trainer:
    def __init__(
        self,
        cfg: Config,
        dist: DistInfo,
        strategy: Strategy,
        teachers: nn.Module,
        objective: DistillObjective,
        loader: Any,
        domain_of: Callable[[str], str],
        schedules: Schedules,
        checkpointer: Checkpointer,
        output_dir: Path,
        phases: NullPhaseTimer | None = None,
        evaluation: PeriodicEvaluation | None = None,
    ) -> None:
        self.cfg = cfg
        self.dist = dist
        self.strategy = strategy
        self.teachers = teachers
        self.objective = objective
        self.loader = loader
        self.domain_of = domain_of
        self.schedules = schedules
        self.checkpointer = checkpointer
        self.metrics = MetricsFile(output_dir / "metrics.jsonl")
        self.sample_log = MetricsFile(output_dir / "samples" / f"rank_{dist.rank:05d}.jsonl") if cfg.run.log_samples else None
        self.state = TrainerState()
        self.global_batch = cfg.global_batch_size(dist.world_size)
        self.drop_generator = torch.Generator(device=dist.device)
        self.drop_generator.manual_seed(rank_seed(cfg.run.seed, dist.rank))
        self.phases = phases or NullPhaseTimer()
        self.stop_step = min(schedules.total_steps, cfg.train.max_steps or schedules.total_steps)
        self.evaluation = evaluation
        self.diagnostics = StepDiagnostics(objective, strategy.module)
        profile_steps = parse_step_range(cfg.run.profile_steps) if cfg.run.profile_steps else None
        self.profiler = StepProfiler(profile_steps, output_dir, dist.rank, dist.device)
        self.nonfinite = NonFiniteGuard(cfg.train.nonfinite, cfg.train.max_nonfinite_skips, objective.teacher_names)

    # ------------------------------------------------------------------ state
    def rank_state(self) -> dict[str, Any]:
        numpy_state = np.random.get_state(legacy=False)
        state: dict[str, Any] = {
            "python_rng": list(random.getstate()[1]),
            "numpy_rng": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "numpy_rng_pos": int(numpy_state["state"]["pos"]),
            "torch_rng": torch.get_rng_state(),
            "drop_rng": self.drop_generator.get_state(),
        }
        if self.dist.device.type == "cuda":  # a CPU run on a GPU machine has no CUDA device to ask
            state["cuda_rng"] = torch.cuda.get_rng_state(self.dist.device)
        return state

    def load_rank_state(self, state: dict[str, Any]) -> None:
        if not state:
            log.warning("rank %d has no saved RNG state (more ranks than at save time): fresh RNG streams", self.dist.rank)
            return
        random.setstate((3, tuple(state["python_rng"]), None))
        numpy_state = np.random.get_state(legacy=False)
        numpy_state["state"] = {"key": state["numpy_rng"].numpy().astype(np.uint64), "pos": state["numpy_rng_pos"]}
        np.random.set_state(numpy_state)
        torch.set_rng_state(state["torch_rng"])
        self.drop_generator.set_state(state["drop_rng"])
        if "cuda_rng" in state and self.dist.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.dist.device)

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.state.step,
            "samples_seen": self.state.samples_seen,
            "global_batch": self.global_batch,
            "world_size": self.dist.world_size,
            "layout": self.strategy.checkpoint_layout(),
            # The loader's position is global (samples of the epoch consumed by all ranks), so every
            # rank restores it, including ranks that did not exist at save time.
            "loader": self.loader.state_dict(),
            "config": self.cfg.to_dict(),
            "nonfinite": self.nonfinite.state_dict(),
        }

    def restore(self, folder: Path) -> None:
        trainer_state, rank_state = self.checkpointer.load(folder, self.strategy)
        self.state = TrainerState(step=int(trainer_state["step"]), samples_seen=int(trainer_state["samples_seen"]))
        self.load_rank_state(rank_state)
        self.loader.load_state_dict(trainer_state["loader"])
        self.nonfinite.load_state_dict(trainer_state.get("nonfinite", {}))
        saved_batch = int(trainer_state.get("global_batch", self.global_batch))
        if saved_batch != self.global_batch:
            log.warning(
                "the global batch changed from %d to %d: training continues from sample %d with the new batch "
                "(the schedules are recomputed for it; the data order from here on differs from an unchanged run)",
                saved_batch, self.global_batch, self.state.samples_seen,
            )
        log.info("resumed from %s at step %d (%d samples seen)", folder, self.state.step, self.state.samples_seen)

    def save(self) -> Path:
        self.nonfinite.check()  # never save past a step the policy refuses
        folder = self.checkpointer.save(self.state.step, self.strategy, self.trainer_state(), self.rank_state())
        log.info("saved checkpoint %s", folder)
        return folder

    def export_student(self, path: Path) -> None:
        """Full student weights as one safetensors file (collective: sharded strategies gather), for
        stage 2 (``student.pretrained``) and downstream use, whatever strategy trained it."""
        state = self.strategy.model_state_dict()
        if self.dist.is_main:
            from safetensors.torch import save_file

            tmp = path.with_name(f".{path.name}.tmp")
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
            tmp.replace(path)

    # ------------------------------------------------------------------ loop
    def batches(self) -> Iterator[dict[str, Any]]:
        """Endless iteration: each pass over the loader is one data epoch."""
        while True:
            empty = True
            for batch in self.loader:
                empty = False
                yield batch
            if empty:
                raise RuntimeError("the data loader produced no batch: check data.remote_root and data.mixture")

    def train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns device-side metrics."""
        step = self.state.step
        momentum = self.schedules.norm_momentum(step)
        accum = self.cfg.train.grad_accum_steps
        loss_sum = torch.zeros((), device=self.dist.device)
        teacher_sum = torch.zeros(len(self.objective.teacher_names), device=self.dist.device)
        drop_sum = torch.zeros(len(self.objective.teacher_names), device=self.dist.device)
        phases = self.phases
        micro_batches, teacher_outs = [], []
        corrupt = 0
        # Teachers first, for every micro-batch: the standardisation statistics are those of the
        # whole step (as one large batch would have), at the cost of holding accum× teacher features.
        for _ in range(accum):
            with phases.phase("data"):
                batch = next(batches)
                images = batch["images"].to(self.dist.device, non_blocking=True)
                corrupt += int(batch.get("corrupt", 0))
            if self.sample_log is not None:
                ids = [f"{name}/{index}" for name, index in zip(batch["dataset"], batch["index"].tolist())]
                self.sample_log.write({"step": step + 1, "samples": ids})
            with phases.phase("teacher_forward"):
                teacher_outs.append(self.teachers(images))
            micro_batches.append((images, [self.domain_of(name) for name in batch["dataset"]]))
        norm_buffers = list(self.strategy.module.teacher_norms.buffers())
        norm_before = [b.clone() for b in norm_buffers]
        with phases.phase("loss"):
            stats = self.objective.teacher_statistics(teacher_outs, self.strategy.module.teacher_norms, momentum)
        for (images, domains), teacher_out in zip(micro_batches, teacher_outs):
            with phases.phase("student_forward"), self.strategy.autocast():
                student_out = self.strategy.forward(images)
            with phases.phase("loss"):
                out = self.objective(student_out, teacher_out, stats, domains, self.drop_generator)
            with phases.phase("backward"):
                self.strategy.backward(out.loss / accum)
            loss_sum += out.loss.detach()
            teacher_sum += out.per_teacher()
            drop_sum += out.coefficients.sum(dim=1)
        diagnostics: dict[str, torch.Tensor] = {}
        if self._logs_at(step + 1):  # costly diagnostics only where they are read
            diagnostics["loss_split"] = self.diagnostics.loss_split(student_out, teacher_out, stats)
            diagnostics["group_grad_norms"] = self.diagnostics.grad_norms(self.strategy.module)
        with phases.phase("optimizer"):
            loss_flags = nonfinite_loss_flags(teacher_sum, loss_sum)
            grad_norm = self.strategy.step(self.schedules.lr(step), self.schedules.weight_decay_at(step), loss_flags.any())
            skipped = loss_flags.any() | ~torch.isfinite(grad_norm.detach().float())
            # A skipped step leaves the running teacher statistics as they were, too.
            for buffer, before in zip(norm_buffers, norm_before):
                buffer.copy_(torch.where(skipped, before, buffer))
        self.nonfinite.record(step + 1, loss_flags, skipped)
        self.state.step += 1
        self.state.samples_seen += self.global_batch
        return {
            "loss": loss_sum / accum,
            "teachers": teacher_sum / accum,
            "grad_norm": grad_norm.detach().float(),
            "corrupt": torch.full((), float(corrupt), device=self.dist.device),  # no host→device sync
            "drop_weights": drop_sum / accum,
            **diagnostics,
        }

    def _logs_at(self, step: int) -> bool:
        return step % self.cfg.run.log_every == 0 or step == self.stop_step

    def fit(self) -> bool:
        """Train to ``stop_step``; returns False when a stop signal ended the run early (after saving)."""
        cfg = self.cfg
        console = ConsoleReporter(cfg.run.console if self.dist.is_main else "none", self.stop_step, self.state.step)
        sinks = [self.metrics]
        if self.dist.is_main:
            self.metrics.truncate_after(self.state.step)
            if cfg.run.wandb_project:
                sinks.append(WandbSink(cfg.run.wandb_project, self.metrics.path.parent, cfg.to_dict()))
            if cfg.run.tensorboard or (cfg.run.tensorboard is None and tensorboard_available()):
                sinks.append(TensorBoardSink(self.metrics.path.parent))
        if self.sample_log is not None:
            self.sample_log.path.parent.mkdir(parents=True, exist_ok=True)
            self.sample_log.truncate_after(self.state.step)
        throughput = Throughput()
        throughput.reset(self.state.samples_seen)
        pending: list[dict[str, torch.Tensor]] = []
        batches = self.batches()
        self.strategy.module.train()
        preemption = PreemptionWatcher()
        preemption.install()
        try:
            while self.state.step < self.stop_step:
                with self.profiler.around(self.state.step + 1):
                    pending.append(self.train_step(batches))
                step = self.state.step
                if self._logs_at(step):
                    self.nonfinite.check()
                    record = self._log_record(pending, throughput.rate(self.state.samples_seen))
                    # Updates skipped for a non-finite loss or grad norm since the previous record.
                    record["nonfinite_skips"] = self.nonfinite.take_skip_count()
                    pending = []
                    if self.dist.is_main:
                        for sink in sinks:
                            sink.write(record)
                    console.update(record)
                if self.evaluation is not None and self._evaluate(sinks, preemption):
                    throughput.reset(self.state.samples_seen)  # img_per_s stays a training rate
                saved = step % cfg.checkpoint.every_steps == 0 or step == self.stop_step
                if saved:
                    self.save()
                    throughput.reset(self.state.samples_seen)
                if preemption.should_stop():
                    if not saved:
                        self.save()
                    preemption.mark_saved()
                    console.message(f"stopped by a signal after step {step}; checkpoint saved")
                    return False
            return True
        finally:
            self.profiler.finish()
            preemption.uninstall()
            console.close()
            for sink in sinks[1:]:
                sink.close()

    def _evaluate(self, sinks: list[Any], preemption: PreemptionWatcher) -> bool:
        """Validation, k-NN, pictures when due after this step (all ranks); True when any ran."""
        step = self.state.step

        def stop_requested() -> bool:
            return preemption.signalled is not None

        ran = self.evaluation.due(step, step == self.stop_step)
        if ran:
            for record in self.evaluation.run(self.strategy, step, self.state.samples_seen, step == self.stop_step, stop_requested):
                if self.dist.is_main:
                    for sink in sinks:
                        sink.write(record)
        return ran

    def _log_record(self, pending: list[dict[str, torch.Tensor]], img_per_s: float) -> dict[str, Any]:
        """The one host sync of a logging interval: average what the interval accumulated, over
        steps and ranks (each rank's loss is its share of the global-batch loss)."""
        step = self.state.step - 1  # schedules of the step just taken
        losses = torch.stack([torch.cat([m["loss"].reshape(1), m["teachers"]]) for m in pending]).mean(dim=0)
        corrupt = torch.stack([m["corrupt"] for m in pending]).sum().reshape(1)
        summed = all_reduce_sum(torch.cat([losses / self.dist.world_size, corrupt]))
        *averaged, corrupt_samples = summed.tolist()
        loss, *teachers = averaged
        grad_norm = torch.stack([m["grad_norm"] for m in pending]).mean().item()
        record: dict[str, Any] = {
            "step": self.state.step,
            "samples_seen": self.state.samples_seen,
            "kind": "train",
            "loss": finite_or_none(loss),
        }
        for name, value in zip(self.objective.teacher_names, teachers):
            record[f"loss_{name}"] = finite_or_none(value)
        record.update(
            lr=self.schedules.lr(step),
            weight_decay=self.schedules.weight_decay_at(step),
            norm_momentum=self.schedules.norm_momentum(step),
            grad_norm=finite_or_none(grad_norm),
            img_per_s=img_per_s,
            # Undecodable images replaced (deterministically) since the previous record, all ranks.
            corrupt_samples=int(corrupt_samples),
        )
        record.update(self.diagnostics.fields(pending, self.strategy.module, self.dist.world_size))
        return record
