"""Probe results on disk and the table that puts a student beside its teachers.

Each probe run writes one JSON file into ``RUN/eval/`` (a student of several: ``RUN/students/NAME/
eval/``): what ran (probe, data, options, features, resolution, seed), on what (the source, the
SHA-256 of its weights file where there is one, its step) and what came out (metrics, images used,
files skipped). A later run of the same probe on the same source and features replaces its file.
:func:`results_table` renders every result of a run as one Markdown table, a row per model and
features, a column per metric; ``launch/eval.py report RUN`` prints it and the exported model card
carries it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

from dune_scale.config import STUDENTS_FOLDER
from dune_scale.eval.probes import ProbeResult
from dune_scale.eval.registry import EVAL_KINDS, ProbeSpec
from dune_scale.files import atomic_write

RESULTS_FOLDER = "eval"


def result_record(spec: ProbeSpec, result: ProbeResult, source: dict[str, Any], image_size: int) -> dict[str, Any]:
    """The JSON object of one probe run; ``source``: ``kind`` (student | teacher), ``name``, ``path``,
    ``sha256`` (or None), ``step`` (or None)."""
    return {
        "probe": spec.kind,
        "dataset": spec.options.dataset,
        "options": dataclasses.asdict(spec.options),
        "features": spec.features,
        "metrics": result.metrics,
        "images": {"train": result.train_images, "val": result.val_images},
        "skipped_count": result.skipped_count,
        "skipped": [{"path": item.path, "reason": item.reason} for item in result.skipped],
        "seed": spec.seed,
        "image_size": image_size,
        "source": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_result(folder: Path, record: dict[str, Any]) -> Path:
    """``folder/<probe>_<dataset>_<source>_<features>.json``, written atomically."""
    parts = (record["probe"], record["dataset"], record["source"]["name"], record["features"])
    path = Path(folder) / ("_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", part) for part in parts) + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return path


def read_results(run: Path) -> list[dict[str, Any]]:
    """Every result of a run: its own ``eval/`` and each student's of a run of several."""
    files = [*sorted((run / RESULTS_FOLDER).glob("*.json")), *sorted(run.glob(f"{STUDENTS_FOLDER}/*/{RESULTS_FOLDER}/*.json"))]
    results = []
    for path in files:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # not ours, or being written: the report shows what is readable
        if isinstance(record, dict) and record.get("probe") in EVAL_KINDS:
            results.append(record)
    return results


def results_table(results: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: one row per (model, features), one column per (probe, dataset, metric); the
    newest result of each cell; ↑ / ↓ say which way is better."""
    latest: dict[tuple[str, str, str, str, str], dict[str, Any]] = {}
    for record in sorted(results, key=lambda r: r.get("created", "")):
        source = record["source"]
        latest[(source["kind"], source["name"], record["features"], record["probe"], record["dataset"])] = record
    columns = sorted({key[3:] for key in latest}, key=lambda c: (list(EVAL_KINDS).index(c[0]), c[1]))
    rows = sorted({key[:3] for key in latest})  # students before teachers
    header = ["model", "features"]
    for probe, dataset in columns:
        header += [f"{probe} {dataset} {m.label} {'↑' if m.higher_is_better else '↓'}" for m in EVAL_KINDS[probe].metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind, name, features in rows:
        cells = [name if kind == "student" else f"{name} (teacher)", features]
        for probe, dataset in columns:
            record = latest.get((kind, name, features, probe, dataset))
            for metric in EVAL_KINDS[probe].metrics:
                value = record["metrics"].get(metric.key) if record else None
                cells.append(metric.show(value) if isinstance(value, (int, float)) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def run_results_lines(run: Path | None) -> list[str]:
    """The run's results table, or a line saying there is none (for the model card)."""
    results = read_results(run) if run is not None else []
    if not results:
        return ["- none recorded (`launch/eval.py KIND --checkpoint RUN` writes them to RUN/eval/)"]
    return results_table(results)
