"""The model card of an exported student (the ``README.md`` of an hf folder): what the run folder
tells about it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dune_scale.engine.export.weights import StudentWeights
from dune_scale.engine.run_files import METRICS
from dune_scale.eval.results import run_results_lines
from dune_scale.files import sha256_file


def model_card(weights: StudentWeights) -> str:
    """Markdown: architecture, recipe, data mixture with sizes, teachers with checkpoint hashes,
    steps, the last validation numbers of ``metrics.jsonl`` and the probe results table of the run
    (what the run folder tells)."""
    spec, config = weights.spec, weights.config or {}
    lines = [
        f"# DUNE student: {spec.arch} (patch {spec.patch_size}, {spec.image_size} px)",
        "",
        "Multi-teacher distilled vision encoder, trained with dune_scale.",
        "",
        "## Architecture",
        f"- width {spec.embed_dim}, {spec.depth} blocks, {spec.num_heads} heads, {spec.num_register_tokens} registers",
        "- projectors: " + ", ".join(f"{t} → {d} ({'+'.join(spec.teacher_tokens[t])})" for t, d in spec.teacher_dims.items()),
        f"- steps trained: {weights.step if weights.step is not None else 'unknown'}",
        *([f"- input size {spec.image_size} px: positional embedding resampled at export from the {weights.resampled_from} px "
           "it was trained at (as the encoder resamples it at that size)"] if weights.resampled_from else []),
        "",
        "## Recipe",
    ]
    train, optim = config.get("train", {}), config.get("optim", {})
    if train:
        lines.append(f"- stage {train.get('stage')}, {train.get('image_size')} px, {train.get('epochs')} epochs of "
                     f"{train.get('epoch_size')} images, batch {train.get('batch_size_per_rank')} per rank, precision {train.get('precision')}")
        lines.append(f"- AdamW base lr {optim.get('base_lr')} (per {optim.get('lr_reference_batch')} images), weight decay "
                     f"{optim.get('weight_decay')}, teacher dropping {config.get('distill', {}).get('teacher_drop')}")
    else:
        lines.append(f"- unknown (exported from {weights.source}, no run config beside it)")
    lines += ["", "## Data mixture", *_mixture_lines(config), "", "## Teachers", *_teacher_lines(config, weights.run_dir)]
    lines += ["", "## Last validation", *_validation_lines(weights.run_dir)]
    lines += ["", "## Probes on frozen features", *run_results_lines(weights.run_dir)]
    lines += ["", "## Use", "```python", "from dune_scale import load_encoder", "encoder = load_encoder(\"THIS_FOLDER\")",
              "features = encoder.forward_features(encoder.preprocess(image_uint8_chw)[None])  # cls, patch (before the final norm)",
              "```", ""]
    return "\n".join(lines)


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


def _validation_lines(run_dir: Path | None) -> list[str]:
    metrics = run_dir / METRICS if run_dir else None
    if metrics is None or not metrics.is_file():
        return ["- none recorded"]
    from dune_scale.telemetry.metrics import read_metrics

    last = [r for r in read_metrics(metrics) if any(k.startswith("val") for k in r)]
    if not last:
        return ["- none recorded"]
    record = last[-1]
    return [f"- step {record.get('step')}"] + [f"- {k}: {v}" for k, v in sorted(record.items()) if k.startswith("val")]
