"""``launch/eval.py``: judge frozen features, a student's or one of its teachers', with the probes of
``dune_scale.eval.registry`` (``knn``, ``linear-seg``, ``depth``), and print the results table.

``KIND --checkpoint SOURCE`` probes a student (any source ``launch/export.py`` reads; ``--student
NAME`` for one of several); ``KIND --teacher NAME --config RUN`` probes one of the run's teachers
(``RUN``: a run folder, its ``config.yaml`` or a recipe) with the same protocol. ``--features
encoder|projector:NAME`` picks the tokens. The result is printed and written as JSON to
``RUN/eval/`` (``--out DIR`` elsewhere); ``report RUN`` prints the Markdown table of all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dune_scale.cli.common import EXIT_USER_ERROR, USER_ERRORS
from dune_scale.config import STUDENTS_FOLDER, load_config, student_subdir
from dune_scale.distributed import pick_device
from dune_scale.engine.export import build_student_from, read_student, sha256_file
from dune_scale.engine.run_files import CONFIG
from dune_scale.eval.features import ENCODER, FeatureSource, student_source, teacher_source
from dune_scale.eval.probes import ProbeSettings
from dune_scale.eval.registry import EVAL_KINDS, ProbeSpec, parse_probe
from dune_scale.eval.results import RESULTS_FOLDER, read_results, result_record, results_table, write_result
from dune_scale.teachers import build_teacher

REPORT = "report"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate frozen features: a dune_scale student or one of its teachers")
    commands = parser.add_subparsers(dest="command", required=True)
    for kind in EVAL_KINDS.values():
        sub = commands.add_parser(kind.name, help=kind.help)
        source = sub.add_argument_group("what to probe")
        source.add_argument("--checkpoint", help="a student: run folder, checkpoint folder, weights file or exported folder")
        source.add_argument("--student", default=None, help="which student of a run of several")
        source.add_argument("--teacher", default=None, help="one of the run's teachers instead (needs --config)")
        source.add_argument("--config", default=None, help="with --teacher: the run folder, its config.yaml or a recipe")
        source.add_argument("--features", default=ENCODER, help="encoder (default) or projector:TEACHER")
        options = sub.add_argument_group(f"{kind.name} settings")
        for spec_field in dataclasses.fields(kind.options):
            required = spec_field.default is dataclasses.MISSING
            default = "" if required else f" (default {spec_field.default})"
            options.add_argument(_flag(spec_field.name), dest=spec_field.name, required=required, default=None,
                                 type={"int": int, "float": float}.get(str(spec_field.type), str),
                                 help=spec_field.metadata["help"] + default)
        how = sub.add_argument_group("how")
        how.add_argument("--seed", type=int, default=0, help="the head's initialisation and minibatch order")
        how.add_argument("--batch-size", type=int, default=64, help="images per feature-extraction batch")
        how.add_argument("--image-size", type=int, default=None, help="default: the training resolution")
        how.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        how.add_argument("--workers", type=int, default=4, help="image-decoding processes (linear-seg, depth)")
        how.add_argument("--cache-dir", default=None, help="where the feature cache goes (default: the system's temp folder)")
        how.add_argument("--out", default=None, help=f"folder for the result JSON (default: RUN/{RESULTS_FOLDER}/)")
        how.add_argument("--no-progress", action="store_true", help="no progress bar")
    report = commands.add_parser(REPORT, help="print the Markdown table of a run's probe results")
    report.add_argument("run", help=f"run folder (its {RESULTS_FOLDER}/ and each student's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _report(Path(args.run)) if args.command == REPORT else _probe(args)
    except (*USER_ERRORS, ValueError, FileNotFoundError) as err:  # StudentFileError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


def _report(run: Path) -> int:
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: not a run folder")
    results = read_results(run)
    if not results:
        raise FileNotFoundError(f"{run}: no probe results in {RESULTS_FOLDER}/ (run launch/eval.py KIND first)")
    print("\n".join(results_table(results)))
    return 0


def _spec(args: argparse.Namespace) -> ProbeSpec:
    kind = EVAL_KINDS[args.command]
    raw: dict[str, Any] = {"kind": kind.name, "features": args.features, "seed": args.seed, "batch_size": args.batch_size}
    raw.update({f.name: getattr(args, f.name) for f in dataclasses.fields(kind.options) if getattr(args, f.name) is not None})
    return parse_probe(raw, _flag)


@dataclasses.dataclass
class Probed:
    """What the probe runs on and where its result goes."""

    source: FeatureSource
    image_size: int
    record: dict[str, Any]  # the result's "source" entry
    out: Path | None


def _probe(args: argparse.Namespace) -> int:
    if (args.checkpoint is None) == (args.teacher is None):
        raise ValueError("give either --checkpoint SOURCE (a student) or --teacher NAME --config RUN")
    if args.workers < 0:
        raise ValueError(f"--workers: {args.workers} is not allowed; it must be at least 0")
    spec = _spec(args)
    spec.options.check_data()  # before any model is loaded
    device = pick_device(args.device)
    probed = _teacher(args, device) if args.teacher else _student(args, device)
    if probed.image_size < 1 or probed.image_size % probed.source.patch_size:
        raise ValueError(f"--image-size: {probed.image_size} is not allowed; it must be a multiple of the patch size "
                         f"{probed.source.patch_size}")
    settings = ProbeSettings(probed.image_size, device, spec.batch_size, args.workers, not args.no_progress, args.cache_dir)
    result = spec.run(probed.source, settings)
    metrics = " ".join(f"{key} {value:.4f}" for key, value in result.metrics.items())
    print(f"{spec.kind} {metrics} ({result.train_images} train / {result.val_images} val images, "
          f"{result.skipped_count} skipped; {probed.source.label}, features {spec.features}, {probed.image_size} px)")
    for item in result.skipped[:20]:
        print(f"  skipped {item.path}: {item.reason}")
    out = Path(args.out) if args.out else probed.out
    if out is None:
        print(f"note: {args.checkpoint} is not inside a run folder; give --out DIR to keep the result", file=sys.stderr)
        return 0
    print(f"result: {write_result(out, result_record(spec, result, probed.record, probed.image_size))}")
    return 0


def _autocast(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 on CUDA (fp32 weights, as in training), none on the CPU."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _student(args: argparse.Namespace, device: torch.device) -> Probed:
    weights = read_student(args.checkpoint, args.student)
    path = Path(args.checkpoint)
    name = args.student or (path.name if path.parent.name == STUDENTS_FOLDER else "")
    student = build_student_from(weights).to(device)
    source = student_source(student, args.features, name or "student", _autocast(device))
    record = {"kind": "student", "name": source.label, "path": str(weights.source),
              "sha256": sha256_file(weights.source) if weights.source.is_file() else None, "step": weights.step}
    out = weights.run_dir / student_subdir(name) / RESULTS_FOLDER if weights.run_dir is not None else None
    return Probed(source, args.image_size or weights.spec.image_size, record, out)


def _teacher(args: argparse.Namespace, device: torch.device) -> Probed:
    if args.config is None:
        raise ValueError("--teacher needs --config: the run folder (or its config.yaml, or a recipe) naming the teacher's checkpoint")
    if args.features != ENCODER:
        raise ValueError(f"--features {args.features}: a teacher has no projectors; probe it with --features {ENCODER}")
    config_path = Path(args.config)
    config_path = config_path / CONFIG if config_path.is_dir() else config_path
    cfg = load_config(config_path)
    entries = {entry.name: entry for entry in cfg.teachers.models}
    if args.teacher not in entries:
        raise ValueError(f"--teacher {args.teacher}: not a teacher of {config_path}; its teachers: {', '.join(entries)}")
    entry = entries[args.teacher]
    if entry.checkpoint is None and not entry.random_init:
        raise ValueError(f"--teacher {args.teacher}: {config_path} gives no checkpoint for it")
    torch.manual_seed(cfg.run.seed)  # a random-init (test) teacher: the same weights every time
    teacher = build_teacher(entry.name, entry.checkpoint, cfg.teachers.attention, **entry.arch).to(device).eval()
    source = teacher_source(teacher, entry.name, cfg.student.patch_size, _autocast(device))
    checkpoint = Path(entry.checkpoint) if entry.checkpoint else None
    record = {"kind": "teacher", "name": entry.name, "path": str(checkpoint) if checkpoint else "random init",
              "sha256": sha256_file(checkpoint) if checkpoint and checkpoint.is_file() else None, "step": None}
    run = config_path.parent if config_path.name == CONFIG else Path(cfg.run.output_dir)
    return Probed(source, args.image_size or cfg.train.image_size, record, run / RESULTS_FOLDER)
