"""The training loop: batch → teacher pass → for each student: student pass → update → logging → saving.

Several students may train on one teacher pass (``students:``): the teachers' forward and their
standardisation statistics are computed once per step, and each student then takes its own step
on the same batch, with its own optimizer, schedules, dropping stream and non-finite guard. Every
rank trains every student (see :class:`StudentRun`).

The loop syncs with the host only at log steps (metrics are accumulated on the device) and at
checkpoint steps. Everything that determines the future of the run is a Stateful component the
checkpointer writes and restores: ``progress`` (step, samples), the loader's position, the
non-finite guard and, per rank, every RNG stream. The schedules are pure functions of the step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dune_scale.config import Config, parse_step_range, student_subdir
from dune_scale.data.errors import CorruptSampleBudget
from dune_scale.distill.objective import DistillObjective, Stats, batch_statistics, update_running_statistics
from dune_scale.distributed import DistInfo, all_reduce_sum
from dune_scale.engine.checkpointer import Checkpointer, Stateful
from dune_scale.engine.nonfinite import NonFiniteGuard, nonfinite_loss_flags
from dune_scale.engine.preemption import PreemptionWatcher
from dune_scale.engine.rng import RankRandomState
from dune_scale.engine.run_files import METRICS, STUDENT_WEIGHTS
from dune_scale.engine.schedules import Schedules
from dune_scale.engine.step_metrics import StepDiagnostics
from dune_scale.engine.strategies import Strategy
from dune_scale.engine.watchdog import StallWatchdog
from dune_scale.eval.periodic import EvaluatedStudent, PeriodicEvaluation
from dune_scale.files import atomic_write
from dune_scale.telemetry.metrics import ConsoleReporter, MetricsFile, StudentView, Throughput, WandbSink, finite_or_none
from dune_scale.telemetry.phases import NullPhaseTimer
from dune_scale.telemetry.profiler import StepProfiler
from dune_scale.telemetry.tensorboard import TensorBoardSink, tensorboard_available

log = logging.getLogger(__name__)


@dataclass
class TrainProgress:
    """Where the run is: optimizer steps taken and samples consumed by all ranks."""

    global_batch: int
    step: int = 0
    samples_seen: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "samples_seen": self.samples_seen, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        saved_batch = int(state["global_batch"])
        if saved_batch != self.global_batch:
            log.warning(
                "the global batch changed from %d to %d: training continues from sample %d with the new batch "
                "(the schedules are recomputed for it; the data order from here on differs from an unchanged run)",
                saved_batch, self.global_batch, self.samples_seen,
            )


@dataclass
class TeacherPass:
    """One step's micro-batches on the device with their sample domains, and the teachers' features."""

    inputs: list[tuple[torch.Tensor, list[str]]] = field(default_factory=list)
    features: list[dict[str, dict[str, torch.Tensor]]] = field(default_factory=list)
    corrupt: int = 0  # undecodable images the loader replaced


@dataclass
class StudentPass:
    """Device-side sums over a step's micro-batches, and the last student output (diagnostics)."""

    loss_sum: torch.Tensor
    teacher_sum: torch.Tensor
    drop_sum: torch.Tensor
    last_output: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass
class RunRecord:
    """What wrote the checkpoint (resolved config, strategy layout, rank count): read by the resume
    checks before anything is restored and by export; restoring it changes nothing."""

    config: dict[str, Any]
    layout: dict[str, Any]
    world_size: int

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config, "layout": self.layout, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checked by ``compat.check_resume_compatible`` before the restore; nothing to take over."""


@dataclass
class StudentRun:
    """One student trained on the shared teacher pass, with everything that is its own: its resolved
    configuration, strategy (model + optimizer), objective, schedules, output folder, non-finite
    guard and metrics. ``name`` is "" for the one student of a config without
    ``students:`` (outputs in the run folder, as before several students existed).

    Every rank trains every student: the teacher pass (the bulk of a step) is then done once per
    batch with no extra traffic, where students on rank sub-groups would need every teacher feature
    broadcast to them (3 teachers × 1025 tokens × 1024 channels in bf16 ≈ 6.3 MB per image at 448)."""

    name: str
    cfg: Config
    strategy: Strategy
    objective: DistillObjective
    schedules: Schedules
    output_dir: Path
    seed: int  # of its initial weights and its dropping stream (``rng.student_seed``)
    nonfinite: NonFiniteGuard = field(init=False)
    diagnostics: StepDiagnostics = field(init=False)
    metrics: MetricsFile = field(init=False)

    def __post_init__(self) -> None:
        train = self.cfg.train
        self.nonfinite = NonFiniteGuard(train.nonfinite, train.max_nonfinite_skips, list(self.objective.teacher_names))
        self.diagnostics = StepDiagnostics(self.objective, self.strategy.module)
        self.metrics = MetricsFile(self.output_dir / METRICS)

    @property
    def subdir(self) -> str:
        """Its folder inside the run folder and inside each checkpoint ("" for the only student)."""
        return student_subdir(self.name)

    def scoped(self, key: str) -> str:
        """``key`` (a phase, a checkpoint component) as this student's own."""
        return f"{self.subdir}/{key}" if self.name else key


class Trainer:
    def __init__(
        self,
        cfg: Config,
        dist: DistInfo,
        students: list[StudentRun],
        teachers: nn.Module,
        loader: Any,
        domain_of: Callable[[str], str],
        checkpointer: Checkpointer,
        output_dir: Path,
        phases: NullPhaseTimer | None = None,
        evaluation: PeriodicEvaluation | None = None,
    ) -> None:
        self.cfg = cfg
        self.dist = dist
        self.students = students
        self.teachers = teachers
        self.loader = loader
        self.domain_of = domain_of
        self.checkpointer = checkpointer
        self.output_dir = output_dir
        self.sample_log = MetricsFile(output_dir / "samples" / f"rank_{dist.rank:05d}.jsonl") if cfg.run.log_samples else None
        self.state = TrainProgress(cfg.global_batch_size(dist.world_size))
        self.rng = RankRandomState({s.name: s.seed for s in students}, dist)
        self.phases = phases or NullPhaseTimer()
        self.evaluation = evaluation
        total_steps = cfg.total_steps(dist.world_size)
        self.stop_step = min(total_steps, cfg.train.max_steps or total_steps)
        profile_steps = parse_step_range(cfg.run.profile_steps) if cfg.run.profile_steps else None
        self.profiler = StepProfiler(profile_steps, output_dir, dist.rank, dist.device)
        dataset_samples = getattr(getattr(loader, "dataset", None), "num_samples", None)  # the shards' samples
        self.corrupt_budget = CorruptSampleBudget(cfg.data.max_corrupt_fraction, dataset_samples)
        self.corrupt_shards: set[str] = set()  # this rank's shards that held undecodable images
        self.watchdog = StallWatchdog(cfg.train.stall_timeout_s, output_dir / f"stall_rank{dist.rank}.txt", dist.rank)

    # ------------------------------------------------------------------ state
    def components(self) -> dict[str, Stateful]:
        """The global Stateful parts of the run (rank 0 writes them; every rank restores them)."""
        layout = self.students[0].strategy.checkpoint_layout()  # one strategy setting for all students
        record = RunRecord(self.cfg.to_dict(), layout, self.dist.world_size)
        # The loader's position is global (samples of the epoch consumed by all ranks), so every
        # rank restores it, including ranks that did not exist at save time.
        components: dict[str, Stateful] = {"progress": self.state, "run": record, "loader": self.loader}
        components.update({s.scoped("nonfinite"): s.nonfinite for s in self.students})
        return components

    def rank_components(self) -> dict[str, Stateful]:
        return {"rng": self.rng}

    def strategies(self) -> dict[str, Strategy]:
        """Each student's strategy by the checkpoint sub-folder its files go to."""
        return {s.subdir: s.strategy for s in self.students}

    def restore(self, folder: Path) -> None:
        self.checkpointer.load(folder, self.strategies(), self.components(), self.rank_components())
        log.info("resumed from %s at step %d (%d samples seen)", folder, self.state.step, self.state.samples_seen)

    def save(self) -> Path:
        for student in self.students:
            student.nonfinite.check()  # never save past a step the policy refuses
        folder = self.checkpointer.save(self.state.step, self.strategies(), self.components(), self.rank_components())
        log.info("saved checkpoint %s", folder)
        return folder

    def export_students(self) -> None:
        """Each student's full weights as ``student.safetensors`` in its folder (collective: sharded
        strategies gather), for stage 2 (``student.pretrained``) and downstream use, whatever
        strategy trained it."""
        for student in self.students:
            state = student.strategy.model_state_dict()
            if self.dist.is_main:
                from safetensors.torch import save_file

                with atomic_write(student.output_dir / STUDENT_WEIGHTS) as tmp:
                    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))

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

    def train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        """One optimizer step of every student over ``grad_accum_steps`` micro-batches, on one teacher
        pass; returns each student's device-side metrics by name."""
        step = self.state.step
        teachers = self._teacher_pass(batches, step)
        with self.phases.phase("loss"):
            stats = batch_statistics(teachers.features)
        metrics = {student.name: self._train_student(student, step, teachers, stats) for student in self.students}
        self.state.step += 1
        self.state.samples_seen += self.state.global_batch
        return metrics

    def _train_student(self, run: StudentRun, step: int, teachers: TeacherPass, stats: Stats) -> dict[str, torch.Tensor]:
        module = run.strategy.module
        # The running teacher statistics as they were, in case the update is skipped (non-finite).
        norm_buffers = list(module.teacher_norms.buffers())
        norm_before = [buffer.clone() for buffer in norm_buffers]
        update_running_statistics(module.teacher_norms, stats, run.schedules.norm_momentum(step))
        student = self._student_pass(run, teachers, stats)
        diagnostics: dict[str, torch.Tensor] = {}
        if self._logs_at(step + 1):  # costly diagnostics only where they are read
            diagnostics["loss_split"] = run.diagnostics.loss_split(student.last_output, teachers.features[-1], stats)
            diagnostics["group_grad_norms"] = run.diagnostics.grad_norms(module)
        grad_norm = self._update(run, step, student, list(zip(norm_buffers, norm_before)))
        accum = len(teachers.features)
        return {
            "loss": student.loss_sum / accum,
            "teachers": student.teacher_sum / accum,
            "grad_norm": grad_norm.detach().float(),
            "corrupt": torch.full((), float(teachers.corrupt), device=self.dist.device),  # no host→device sync
            "drop_weights": student.drop_sum / accum,
            **diagnostics,
        }

    def _teacher_pass(self, batches: Iterator[dict[str, Any]], step: int) -> TeacherPass:
        """Teachers first, for every micro-batch: the standardisation statistics are those of the
        whole step (as one large batch would have), at the cost of holding accum× teacher features."""
        done = TeacherPass()
        for _ in range(self.cfg.train.grad_accum_steps):
            with self.phases.phase("data"):
                batch = next(batches)
                self.watchdog.beat()
                images = batch["images"].to(self.dist.device, non_blocking=True)
                done.corrupt += int(batch.get("corrupt", 0))
                self.corrupt_shards.update(batch.get("corrupt_shards", ()))
            if self.sample_log is not None:
                ids = [f"{name}/{index}" for name, index in zip(batch["dataset"], batch["index"].tolist())]
                self.sample_log.write({"step": step + 1, "samples": ids})
            with self.phases.phase("teacher_forward"):
                done.features.append(self.teachers(images, lambda name: self.phases.phase(f"teacher_forward/{name}")))
            done.inputs.append((images, [self.domain_of(name) for name in batch["dataset"]]))
        return done

    def _student_pass(self, run: StudentRun, teachers: TeacherPass, stats: Stats) -> StudentPass:
        """Student forward, loss and backward of every micro-batch (gradients accumulate)."""
        accum = len(teachers.features)
        names = run.objective.teacher_names
        done = StudentPass(
            loss_sum=torch.zeros((), device=self.dist.device),
            teacher_sum=torch.zeros(len(names), device=self.dist.device),
            drop_sum=torch.zeros(len(names), device=self.dist.device),
        )
        drop_generator = self.rng.drop_generators[run.name]
        for (images, domains), teacher_out in zip(teachers.inputs, teachers.features):
            with self.phases.phase(run.scoped("student_forward")), run.strategy.autocast():
                done.last_output = run.strategy.forward(images)
            with self.phases.phase(run.scoped("loss")):
                out = run.objective(done.last_output, teacher_out, stats, domains, drop_generator)
            with self.phases.phase(run.scoped("backward")):
                run.strategy.backward(out.loss / accum)
            done.loss_sum += out.loss.detach()
            done.teacher_sum += out.per_teacher()
            done.drop_sum += out.coefficients.sum(dim=1)
        return done

    def _update(
        self, run: StudentRun, step: int, student: StudentPass, norm_buffers: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """Clip and apply the accumulated gradients, unless the loss or the gradient norm is not
        finite (decided on the device); a skipped step leaves the student's running teacher
        statistics as they were, too. Returns the pre-clip gradient norm."""
        with self.phases.phase(run.scoped("optimizer")):
            loss_flags = nonfinite_loss_flags(student.teacher_sum, student.loss_sum)
            grad_norm = run.strategy.step(run.schedules.lr(step), run.schedules.weight_decay_at(step), loss_flags.any())
            skipped = loss_flags.any() | ~torch.isfinite(grad_norm.detach().float())
            for buffer, before in norm_buffers:
                buffer.copy_(torch.where(skipped, before, buffer))
        run.nonfinite.record(step + 1, loss_flags, skipped)
        return grad_norm

    def _logs_at(self, step: int) -> bool:
        return step % self.cfg.run.log_every == 0 or step == self.stop_step

    def fit(self, preemption: PreemptionWatcher) -> bool:
        """Train to ``stop_step``; returns False when a stop signal (``preemption``, installed by the
        caller) ended the run early, after saving. The stall watchdog runs meanwhile."""
        console = ConsoleReporter(self.cfg.run.console if self.dist.is_main else "none", self.stop_step, self.state.step)
        sinks, closing = self._open_sinks()
        throughput = Throughput()
        throughput.reset(self.state.samples_seen)
        pending: list[dict[str, dict[str, torch.Tensor]]] = []
        batches = self.batches()
        for student in self.students:
            student.strategy.module.train()
        self.watchdog.start()
        try:
            while self.state.step < self.stop_step:
                with self.profiler.around(self.state.step + 1):
                    pending.append(self.train_step(batches))
                step = self.state.step
                self.watchdog.beat(step)
                if self._logs_at(step):
                    self._log(pending, throughput.rate(self.state.samples_seen), sinks, console)
                    pending = []
                if self.evaluation is not None and self._evaluate(sinks, preemption):
                    throughput.reset(self.state.samples_seen)  # img_per_s stays a training rate
                saved = self.checkpointer.due(step, final=step == self.stop_step)
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
            self.watchdog.stop()
            self.checkpointer.finish()  # a save still in flight (checkpoint.async_save) completes first
            self.profiler.finish()
            console.close()
            for sink in closing:
                sink.close()

    def _open_sinks(self) -> tuple[dict[str, list[Any]], list[Any]]:
        """Each student's sinks by name: its metrics.jsonl (cut back to the resumed step) and, on the
        main rank, TensorBoard in its folder and the run's one W&B run (a student of several seen
        under its name); and the sinks to close at the end."""
        cfg = self.cfg
        wandb = WandbSink(cfg.run.wandb_project, self.output_dir, cfg.to_dict()) if self.dist.is_main and cfg.run.wandb_project else None
        closing: list[Any] = [wandb] if wandb is not None else []
        sinks: dict[str, list[Any]] = {}
        for student in self.students:
            own: list[Any] = [student.metrics]
            if self.dist.is_main:
                student.output_dir.mkdir(parents=True, exist_ok=True)
                student.metrics.truncate_after(self.state.step)
                if wandb is not None:
                    own.append(StudentView(wandb, student.name, student.subdir) if student.name else wandb)
                if cfg.run.tensorboard or (cfg.run.tensorboard is None and tensorboard_available()):
                    own.append(TensorBoardSink(student.output_dir))
                    closing.append(own[-1])
            sinks[student.name] = own
        if self.sample_log is not None:
            self.sample_log.path.parent.mkdir(parents=True, exist_ok=True)
            self.sample_log.truncate_after(self.state.step)
        return sinks, closing

    def _log(
        self, pending: list[dict[str, dict[str, torch.Tensor]]], img_per_s: float, sinks: dict[str, list[Any]],
        console: ConsoleReporter,
    ) -> None:
        """A log step: the non-finite policies first, then one record per student for the interval
        to each of its sinks. ``img_per_s`` is the images every student trained on per second."""
        records = {}
        for student in self.students:
            student.nonfinite.check()
            record = self._log_record(student, [metrics[student.name] for metrics in pending], img_per_s)
            # Updates skipped for a non-finite loss or grad norm since the previous record.
            record["nonfinite_skips"] = student.nonfinite.take_skip_count()
            if self.dist.is_main:
                for sink in sinks[student.name]:
                    sink.write(record)
            records[student.name] = record
        # Every student trained on the same batches: their corrupt counts are one (all-reduced) number.
        if self.corrupt_budget.record(records[self.students[0].name]["corrupt_samples"], len(pending) * self.state.global_batch):
            raise self.corrupt_budget.error(self._all_corrupt_shards())
        console.update(records)

    def _all_corrupt_shards(self) -> list[str]:
        """The shards that held undecodable images, on any rank (collective)."""
        found = [sorted(self.corrupt_shards)]
        if self.dist.world_size > 1 and torch.distributed.is_initialized():
            found = [[] for _ in range(self.dist.world_size)]
            torch.distributed.all_gather_object(found, sorted(self.corrupt_shards))
        return sorted({shard for shards in found for shard in shards})

    def _evaluate(self, sinks: dict[str, list[Any]], preemption: PreemptionWatcher) -> bool:
        """Validation, k-NN, pictures when due after this step (all ranks, every student); True when
        any ran."""
        step = self.state.step

        def stop_requested() -> bool:  # asked once per validation batch: progress, too
            self.watchdog.beat()
            return preemption.signalled is not None

        ran = self.evaluation.due(step, step == self.stop_step)
        if ran:
            students = {s.name: EvaluatedStudent(s.strategy, s.objective, s.output_dir) for s in self.students}
            found = self.evaluation.run(students, step, self.state.samples_seen, step == self.stop_step, stop_requested)
            if self.dist.is_main:
                for name, records in found.items():
                    for record in records:
                        for sink in sinks[name]:
                            sink.write(record)
        return ran

    def _log_record(self, run: StudentRun, pending: list[dict[str, torch.Tensor]], img_per_s: float) -> dict[str, Any]:
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
        for name, value in zip(run.objective.teacher_names, teachers):
            record[f"loss_{name}"] = finite_or_none(value)
        schedules = run.schedules
        record.update(
            lr=schedules.lr(step),
            weight_decay=schedules.weight_decay_at(step),
            norm_momentum=schedules.norm_momentum(step),
            grad_norm=finite_or_none(grad_norm),
            img_per_s=img_per_s,
            # Undecodable images replaced (deterministically) since the previous record, all ranks.
            corrupt_samples=int(corrupt_samples),
        )
        record.update(run.diagnostics.fields(pending, run.strategy.module, self.dist.world_size))
        return record
