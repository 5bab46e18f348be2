"""``launch/eval.py``: evaluate a trained student's encoder.

``knn``: the DINO weighted k-NN probe (k = 20, T = 0.07) on class tokens, between two labelled sets
(ImageFolder trees, or MDS shards with ``jpeg`` and ``label``); prints one line with ``top1`` and
``top5`` as fractions. ``--checkpoint`` is any student source ``launch/export.py`` reads (a run
folder, a checkpoint folder, ``student.safetensors``, an official DUNE ``.pth``, an exported folder);
``--student NAME`` picks one student of a run of several.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dune_scale.distributed import pick_device
from dune_scale.engine.export import load_encoder
from dune_scale.eval.knn import DEFAULT_K, DEFAULT_TEMPERATURE, class_token, knn_probe


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a trained dune_scale student")
    commands = parser.add_subparsers(dest="command", required=True)
    knn = commands.add_parser("knn", help="weighted k-NN probe on class tokens (DINO protocol)")
    knn.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder, weights file or exported folder")
    knn.add_argument("--student", default=None, help="which student of a run of several")
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
        encoder = load_encoder(args.checkpoint, args.student)
        # DINO's protocol: the final-normed class token (the ViT's own forward_features).
        result = knn_probe(
            class_token(encoder.vit.to(device)), args.train, args.val, args.image_size or encoder.image_size, device,
            k=args.k, temperature=args.temperature, batch_size=args.batch_size,
        )
    except (ValueError, FileNotFoundError) as err:  # incl. StudentFileError: a source that is no student
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"knn top1 {result.top1:.4f} top5 {result.top5:.4f} "
        f"(k={result.k}, T={result.temperature}, {result.train_images} train / {result.val_images} val images)"
    )
    return 0
