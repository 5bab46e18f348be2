"""Where step metrics go: ``metrics.jsonl`` (one JSON object per logged step) and the console."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class MetricsFile:
    """Append-only JSON lines; a resumed run truncates lines past its restored step first."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps > ``step`` (written after the checkpoint a run resumes from), and a
        last line cut short by a kill."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, allow_nan=True) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class ConsoleReporter:
    """A rich progress bar (``rich``), one line per logged step (``plain``), or nothing (``none``)."""

    def __init__(self, mode: str, total_steps: int, start_step: int) -> None:
        self.mode = mode
        self.console = Console(stderr=True)
        self._last_print = 0.0
        self.progress: Progress | None = None
        if mode == "rich":
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
            self.progress.start()

    def update(self, records: dict[str, dict[str, Any]]) -> None:
        """One logged step: each student's training record by name ("" for the only student)."""
        parts = []
        for name, record in records.items():
            loss = "nan" if record["loss"] is None else f"{record['loss']:.4f}"  # None: not finite
            parts.append(f"{name + ': ' if name else ''}loss {loss}  lr {record['lr']:.2e}")
        first = next(iter(records.values()))
        status = f"{' | '.join(parts)}  {first['img_per_s']:.1f} img/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=first["step"], status=status)
        elif self.mode == "plain":
            self.console.print(f"step {first['step']:>7}  {status}", highlight=False)

    def message(self, text: str) -> None:
        if self.mode != "none":
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def scalar_tags(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers for dashboards: training records under their own names (``loss``), the
    others under ``<kind>/<dataset>/`` (``val/<dataset>/loss_<teacher>``, ``knn/<dataset>/top1``);
    ``step``, text fields and missing (non-finite) values are left out."""
    kind = record.get("kind", "train")
    prefix = "" if kind == "train" else f"{kind}/{record['dataset']}/"
    return {
        f"{prefix}{key}": float(value)
        for key, value in record.items()
        if key not in ("step", "kind", "dataset") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class Throughput:
    """Images per second between two logged steps (wall clock; the step syncs at log points)."""

    def __init__(self) -> None:
        self._time = time.perf_counter()
        self._samples = 0

    def rate(self, samples_seen: int) -> float:
        now = time.perf_counter()
        rate = (samples_seen - self._samples) / max(now - self._time, 1e-9)
        self._time, self._samples = now, samples_seen
        return rate

    def reset(self, samples_seen: int) -> None:
        self._time, self._samples = time.perf_counter(), samples_seen


class WandbSink:
    """Mirror each metrics record to Weights & Biases (rank 0, optional ``wandb`` extra).

    The run id is kept in the output folder, so a resumed job continues the same W&B run.
    """

    def __init__(self, project: str, output_dir: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise RuntimeError("run.wandb_project is set but wandb is not installed: pip install -e '.[wandb]'") from None
        self.output_dir = Path(output_dir)
        id_file = self.output_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=project, id=run_id, resume="allow", dir=str(output_dir), config=config)

    def write(self, record: dict[str, Any]) -> None:
        data: dict[str, Any] = dict(scalar_tags(record))
        if record.get("paths"):  # feature pictures (PNG files under the output folder)
            import wandb

            data[record.get("tag", record["kind"])] = [wandb.Image(str(self.output_dir / path)) for path in record["paths"]]
        self.run.log(data, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class StudentView:
    """A run-level sink (the run's one W&B run) as one student of several writes to it: numbers
    under ``<name>/``, picture paths under the student's folder. Closing is the run's business."""

    _KEPT = ("step", "kind", "dataset", "paths")

    def __init__(self, sink: Any, name: str, subdir: str) -> None:
        self.sink, self.name, self.subdir = sink, name, subdir

    def write(self, record: dict[str, Any]) -> None:
        renamed = {key if key in self._KEPT else f"{self.name}/{key}": value for key, value in record.items()}
        if record.get("paths"):
            renamed["paths"] = [f"{self.subdir}/{path}" for path in record["paths"]]
            renamed["tag"] = f"{self.name}/{record['kind']}"
        self.sink.write(renamed)
