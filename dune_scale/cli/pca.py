"""PCA feature maps: ``python launch/pca.py --student X --images a.jpg b.jpg ... [--teachers] --out grid.png``.

One row per image: the (resized, centre-cropped) image, the student's patch features on their first
3 principal components fitted jointly over the images, and with ``--teachers`` each teacher's (the
teachers the student's run config names, on the student's token grid). Features are final-normed,
as DINOv2 and DUNE's PCA figures show them. Bad input exits with code 2 and one message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


class PcaInputError(ValueError):
    """An image or teacher set-up that cannot be used (named in the message)."""


def read_images(paths: list[str], preprocess) -> torch.Tensor:
    from dune_scale.data.transforms import CorruptImageError, decode_image

    batch = []
    for name in paths:
        path = Path(name)
        try:
            batch.append(preprocess(decode_image(path.read_bytes())))
        except (OSError, CorruptImageError) as err:
            raise PcaInputError(f"image {path}: {err}") from None
    return torch.stack(batch)


def teacher_patch_features(config: dict | None, images: torch.Tensor, student_patch: int, source: Path) -> dict[str, torch.Tensor]:
    """Each teacher of the run config, fp32 on the CPU, on the student's token grid."""
    from dune_scale.config import TeacherConfig
    from dune_scale.teachers import TeacherEnsemble, build_teacher

    models = (config or {}).get("teachers", {}).get("models")
    if not models:
        raise PcaInputError(f"--teachers: {source} has no run config (config.yaml) naming the teachers; give a run or checkpoint folder")
    teachers = {}
    for entry in models:
        teacher = TeacherConfig(**entry)
        if teacher.checkpoint is None and not teacher.random_init:
            raise PcaInputError(f"--teachers: teacher {teacher.name} has no checkpoint in {source}'s config")
        teachers[teacher.name] = build_teacher(teacher.name, teacher.checkpoint, **teacher.arch)
    ensemble = TeacherEnsemble(teachers, {name: ("patch",) for name in teachers}, student_patch)
    return {name: out["patch"] for name, out in ensemble(images).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="run folder, checkpoint, student.safetensors, DUNE .pth or exported folder")
    parser.add_argument("--images", required=True, nargs="+", help="image files")
    parser.add_argument("--teachers", action="store_true", help="add each teacher's map (teachers of the student's run config)")
    parser.add_argument("--size", type=int, default=None, help="input side in pixels (default: the student's training size)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    from dune_scale.data.transforms import ValTransform
    from dune_scale.engine.export import DuneEncoder, StudentFileError, read_student
    from dune_scale.eval.pca import denormalize, pca_grid, pca_maps, save_png
    from dune_scale.teachers import TeacherCheckpointError

    try:
        weights = read_student(args.student)
        encoder = DuneEncoder.from_weights(weights)
        size = args.size or encoder.image_size
        if size % encoder.patch_size:
            raise PcaInputError(f"--size {size} is not a multiple of the student's patch size {encoder.patch_size}")
        images = read_images(args.images, ValTransform(size))
        grid = (size // encoder.patch_size,) * 2
        with torch.no_grad():
            maps = {"student": pca_maps(encoder.vit.forward_features(images)["patch"], grid)}
            if args.teachers:
                for name, patch in teacher_patch_features(weights.config, images, encoder.patch_size, weights.source).items():
                    maps[name] = pca_maps(patch, grid)
    except (StudentFileError, PcaInputError, TeacherCheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = save_png(pca_grid(denormalize(images), maps), args.out)
    print(f"wrote {path} (columns: image, {', '.join(maps)})")
    return 0
