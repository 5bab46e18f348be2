"""``launch/eval.py``: evaluate a trained student's encoder.

``knn``: the DINO weighted k-NN probe (k = 20, T = 0.07) on class tokens, between two labelled sets
(ImageFolder trees, or MDS shards with ``jpeg`` and ``label``); prints one line with ``top1`` and
``top5`` as fractions. ``--checkpoint`` is a run folder (its ``student.safetensors``, else its latest
checkpoint) or a weights file inside a run folder (the architecture comes from the run's
``config.yaml``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from dune_scale.config import ConfigError, config_from_dict
from dune_scale.distributed import pick_device
from dune_scale.engine.compose import build_encoder
from dune_scale.engine.export import STUDENT_WEIGHTS
from dune_scale.engine.pretrained import PretrainedError, read_state_dict
from dune_scale.eval.knn import DEFAULT_K, DEFAULT_TEMPERATURE, class_token, knn_probe
from dune_scale.models.vit import VisionTransformer

CONFIG_FILE = "config.yaml"


class EvalInputError(ValueError):
    """A checkpoint or folder the evaluation cannot use."""


def _run_folder_of(path: Path) -> Path:
    for folder in [path, *path.parents] if path.is_dir() else path.parents:
        if (folder / CONFIG_FILE).is_file():
            return folder
    raise EvalInputError(f"{path}: no {CONFIG_FILE} in it or above it (give a run folder or a file inside one)")


def _weights_source(path: Path) -> Path:
    """A run folder's final weights, else its checkpoints (the latest complete one)."""
    if path.is_dir() and (path / STUDENT_WEIGHTS).is_file():
        return path / STUDENT_WEIGHTS
    if path.is_dir() and (path / "checkpoints").is_dir():
        return path / "checkpoints"
    return path


def load_student_encoder(checkpoint: str | Path, device: torch.device) -> tuple[VisionTransformer, int]:
    """The encoder of a run folder or weights file, in eval mode, and the run's training image size.

    A minimal private loader over the stage-2 weight reader (single-process checkpoints and
    safetensors); the export issue's ``dune_scale.load_encoder`` replaces it."""
    path = Path(checkpoint)
    if not path.exists():
        raise EvalInputError(f"--checkpoint {path} does not exist")
    cfg = config_from_dict(yaml.safe_load((_run_folder_of(path) / CONFIG_FILE).read_text()))
    state = read_state_dict(_weights_source(path))
    encoder_state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    encoder = build_encoder(cfg)
    try:
        encoder.load_state_dict(encoder_state)
    except RuntimeError as err:
        raise EvalInputError(f"{path}: the weights do not fit the run's student ({str(err).splitlines()[0]})") from None
    return encoder.to(device).eval(), cfg.train.image_size


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a trained dune_scale student")
    commands = parser.add_subparsers(dest="command", required=True)
    knn = commands.add_parser("knn", help="weighted k-NN probe on class tokens (DINO protocol)")
    knn.add_argument("--checkpoint", required=True, help="run folder, or a weights file inside one")
    knn.add_argument("--train", required=True, help="labelled neighbours: ImageFolder tree or MDS shards (jpeg, label)")
    knn.add_argument("--val", required=True, help="the queries, with the same classes, in either form")
    knn.add_argument("--k", type=int, default=DEFAULT_K)
    knn.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    knn.add_argument("--batch-size", type=int, default=64)
    knn.add_argument("--image-size", type=int, default=None, help="default: the run's train.image_size")
    knn.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("train", "val"):
        if not Path(getattr(args, name)).is_dir():
            print(f"error: --{name} {getattr(args, name)} is not a folder (an ImageFolder tree or MDS shards are expected)", file=sys.stderr)
            return 2
    if args.k < 1 or args.temperature <= 0 or args.batch_size < 1:
        print("error: --k and --batch-size must be at least 1, --temperature positive", file=sys.stderr)
        return 2
    device = pick_device(args.device)
    try:
        encoder, image_size = load_student_encoder(args.checkpoint, device)
        result = knn_probe(
            class_token(encoder), args.train, args.val, args.image_size or image_size, device,
            k=args.k, temperature=args.temperature, batch_size=args.batch_size,
        )
    except (EvalInputError, ConfigError, PretrainedError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"knn top1 {result.top1:.4f} top5 {result.top5:.4f} "
        f"(k={result.k}, T={result.temperature}, {result.train_images} train / {result.val_images} val images)"
    )
    return 0
