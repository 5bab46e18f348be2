"""The model card of an exported student (the ``README.md`` of an hf folder): what the run folder
tells about it. The numbers are what the run did (its trainer state and ``metrics.jsonl``: steps,
images, the last validation before the exported step), the recipe's only where it says what was
asked (stage, resolution, optimizer, the schedule's length)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dune_scale.config import ConfigError, config_from_dict
from dune_scale.engine.export.weights import StudentWeights
from dune_scale.engine.run_files import METRICS, student_subdir
from dune_scale.eval.results import run_results_lines
from dune_scale.files import sha256_file
from dune_scale.telemetry.metrics import read_metrics


def model_card(weights: StudentWeights) -> str:
    """Markdown: architecture, training (what the run did, and its recipe), data mixture with
    sizes, teachers with checkpoint hashes, the last validation and the probe results table."""
    spec, config = weights.spec, weights.config or {}
    records = _run_records(weights)
    lines = [
        f"# DUNE student: {spec.arch} (patch {spec.patch_size}, {spec.image_size} px)",
        "",
        "Multi-teacher distilled vision encoder, trained with dune_scale.",
        "",
        "## Architecture",
        f"- width {spec.embed_dim}, {spec.depth} blocks, {spec.num_heads} heads, {spec.num_register_tokens} registers",
        "- projectors: " + ", ".join(f"{t} → {d} ({'+'.join(spec.teacher_tokens[t])})" for t, d in spec.teacher_dims.items()),
        *([f"- input size {spec.image_size} px: positional embedding resampled at export from the {weights.resampled_from} px "
           "it was trained at (as the encoder resamples it at that size)"] if weights.resampled_from else []),
        "",
        "## Training",
        *_training_lines(weights, config, records),
    ]
    lines += ["", "## Data mixture", *_mixture_lines(config), "", "## Teachers", *_teacher_lines(config, weights.run_dir)]
    lines += ["", "## Last validation", *_validation_lines(records, list(spec.teacher_dims))]
    lines += ["", "## Probes on frozen features", *run_results_lines(weights.run_dir)]
    lines += ["", "## Use", "```python", "from dune_scale import load_encoder", "encoder = load_encoder(\"THIS_FOLDER\")",
              "features = encoder.forward_features(encoder.preprocess(image_uint8_chw)[None])  # cls, patch (before the final norm)",
              "```", ""]
    return "\n".join(lines)


def _run_records(weights: StudentWeights) -> list[dict[str, Any]]:
    """The student's ``metrics.jsonl`` records up to the exported step (all, when it is unknown)."""
    path = weights.run_dir / student_subdir(weights.name) / METRICS if weights.run_dir else None
    if path is None or not path.is_file():
        return []
    return [r for r in read_metrics(path) if weights.step is None or r.get("step", 0) <= weights.step]


def _training_lines(weights: StudentWeights, config: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    """Steps and images the exported weights were trained for, against the schedule the run
    followed; then the recipe's settings."""
    trained = [r for r in records if r.get("kind", "train") == "train" and r.get("step") and r.get("samples_seen")]
    step = weights.step if weights.step is not None else (trained[-1]["step"] if trained else None)
    if step is None:
        return [f"- unknown (exported from {weights.source}, no run records beside it)"]
    global_batch = trained[-1]["samples_seen"] // trained[-1]["step"] if trained else None
    done = f"- trained {step:,} steps" + (f", {step * global_batch:,} images (global batch {global_batch:,})" if global_batch else "")
    schedule = _schedule(config, global_batch)
    if schedule is not None:
        total, how = schedule
        done += f", of a {total:,}-step schedule ({how})" + ("; stopped before its end" if step < total else "")
    lines = [done]
    train, optim = config.get("train", {}), config.get("optim", {})
    if train:
        lines.append(f"- stage {train.get('stage')}, {train.get('image_size')} px, batch {train.get('batch_size_per_rank')} "
                     f"per rank, precision {train.get('precision')}")
        lines.append(f"- AdamW base lr {optim.get('base_lr')} (per {optim.get('lr_reference_batch')} images), weight decay "
                     f"{optim.get('weight_decay')}, teacher dropping {config.get('distill', {}).get('teacher_drop')}")
    return lines


def _schedule(config: dict[str, Any], global_batch: int | None) -> tuple[int, str] | None:
    """(length, how it was set) of the run's schedules, as the trainer computed it; None when the
    config or the global batch is unknown."""
    if not config or not global_batch:
        return None
    try:
        cfg = config_from_dict(config)
    except ConfigError:
        return None
    per_rank = cfg.train.batch_size_per_rank * cfg.train.grad_accum_steps
    total = cfg.total_steps(global_batch // per_rank)
    if cfg.train.total_steps is not None:
        return total, "train.total_steps"
    return total, f"{cfg.train.epochs:g} epochs of {cfg.train.epoch_size:,} images"


def _mixture_lines(config: dict[str, Any]) -> list[str]:
    data = config.get("data")
    if not data:
        return ["- unknown"]
    from dune_scale.data.mixture import MixtureError, resolve_mixture

    try:
        mixture = resolve_mixture(data["mixture"], data["balance"], data["remote_root"])
    except (MixtureError, KeyError, OSError) as err:
        return [f"- {data.get('mixture')} (sizes unavailable: {err})"]
    lines = [f"- `{data['mixture'] if isinstance(data['mixture'], str) else 'custom'}`, balance {mixture.balance}", "",
             "| dataset | domain | images | share of each batch |", "|---|---|---|---|"]
    for stream in mixture.streams:
        size = stream.size if stream.size is not None else _local_dataset_size(data["remote_root"], stream.name)
        size = f"{size:,}" if size is not None else "?"
        lines.append(f"| {stream.name} | {stream.domain} | {size} | {stream.proportion:.3f} |")
    return lines


def _local_dataset_size(remote_root: str, name: str) -> int | None:
    from dune_scale.data.mixture import MixtureError, _size_from_index

    try:
        return _size_from_index(remote_root, name)
    except (MixtureError, OSError, ValueError):
        return None


def _teacher_lines(config: dict[str, Any], run_dir: Path | None) -> list[str]:
    models = config.get("teachers", {}).get("models", [])
    if not models:
        return ["- unknown"]
    lines = []
    for teacher in models:
        checkpoint = teacher.get("checkpoint")
        if teacher.get("random_init") or not checkpoint:
            origin = "random init"
        else:
            path = Path(checkpoint)
            path = path if path.is_absolute() or path.is_file() or run_dir is None else run_dir / path
            origin = f"`{checkpoint}` sha256 {sha256_file(path)}" if path.is_file() else f"`{checkpoint}` (not found at export time)"
        lines.append(f"- {teacher['name']}: {origin}")
    return lines


def _validation_lines(records: list[dict[str, Any]], teachers: list[str]) -> list[str]:
    """The last validation's records (``"kind": "val"``: one per dataset, and ``all``)."""
    validations = [r for r in records if r.get("kind") == "val"]
    if not validations:
        return ["- none recorded"]
    step = validations[-1]["step"]
    lines = [f"- step {step:,}", "", "| dataset | images | loss | " + " | ".join(teachers) + " |",
             "|---" * (3 + len(teachers)) + "|"]
    for record in (r for r in validations if r["step"] == step):
        per_teacher = " | ".join(f"{record[f'loss_{t}']:.4f}" if f"loss_{t}" in record else "-" for t in teachers)
        lines.append(f"| {record.get('dataset')} | {record.get('images')} | {record['loss']:.4f} | {per_teacher} |")
    return lines
