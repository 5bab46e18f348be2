"""``--format timm``: a timm local folder, ``timm.create_model("local-dir:OUT", pretrained=True)``,
as timm's ``vit_*_patch14_reg4_dinov2`` (a custom shape keeps the ``vit_small`` name with its
sizes in ``model_args``). The model takes other input sizes (``dynamic_img_size``): timm then
resamples the positional table its own way, which differs a little from the encoder's rule
(``--resolution`` bakes in the encoder's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dune_scale.engine.export.formats.base import FOLDER_CONFIG, FOLDER_WEIGHTS, ExportFormat
from dune_scale.engine.export.layouts import from_timm, to_timm
from dune_scale.engine.export.weights import StudentFileError, StudentWeights, at_resolution, read_safetensors
from dune_scale.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from dune_scale.models.vit import NAMED_ARCHS

TIMM_NAMES = {
    "vit_small": "vit_small_patch14_reg4_dinov2",
    "vit_base": "vit_base_patch14_reg4_dinov2",
    "vit_large": "vit_large_patch14_reg4_dinov2",
}


def timm_config(weights: StudentWeights) -> dict[str, Any]:
    """timm's ``config.json`` of the student: architecture, constructor arguments, preprocessing."""
    spec = weights.spec
    arch = spec.arch if spec.arch != "custom" else "vit_small"
    model_args: dict[str, Any] = {"img_size": spec.image_size, "dynamic_img_size": True}
    if NAMED_ARCHS[arch] != (spec.embed_dim, spec.depth, spec.num_heads):
        model_args.update(embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads)
    if spec.num_register_tokens != 4:
        model_args["reg_tokens"] = spec.num_register_tokens
    if spec.patch_size != 14:
        model_args["patch_size"] = spec.patch_size
    return {
        "architecture": TIMM_NAMES[arch],
        "num_classes": 0,
        "num_features": spec.embed_dim,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, spec.image_size, spec.image_size],
            "interpolation": "bicubic",
            "crop_pct": 1.0,  # the shorter side is resized to the input size itself, as DUNE evaluates
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "num_classes": 0,
        },
    }


def write_timm(weights: StudentWeights, out: Path, resolution: tuple[int, int] | None = None) -> Path:
    from safetensors.torch import save_file

    weights = at_resolution(weights, resolution)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in to_timm(weights.state).items()}, str(out / FOLDER_WEIGHTS))
    (out / FOLDER_CONFIG).write_text(json.dumps(timm_config(weights), indent=2))
    return out


def read_timm(folder: Path, config: dict[str, Any]) -> StudentWeights | None:
    """A folder :func:`write_timm` wrote (its config names a timm ``architecture``), back in our layout."""
    if "architecture" not in config:
        return None
    arch = next((arch for arch, name in TIMM_NAMES.items() if name == config["architecture"]), None)
    if arch is None:
        raise StudentFileError(f"{folder / FOLDER_CONFIG}: architecture {config['architecture']!r} is unknown; "
                               f"known: {', '.join(TIMM_NAMES.values())}")
    weights = folder / FOLDER_WEIGHTS
    heads = config.get("model_args", {}).get("num_heads") or NAMED_ARCHS[arch][2]
    return StudentWeights(from_timm(read_safetensors(weights)), weights, num_heads=heads)


FORMAT = ExportFormat("timm", "a timm folder: timm.create_model('local-dir:PATH', pretrained=True), any input size",
                      write_timm, read=read_timm)
