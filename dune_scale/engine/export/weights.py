"""A student read from any source, in our layout (``DuneStudent.state_dict()``): its weights, the
architecture worked out from them (:class:`StudentSpec`), the modules rebuilt from both
(:class:`DuneEncoder`, :func:`build_student_from`), and the one resampling export may apply
(:func:`at_resolution`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dune_scale.data.transforms import ValTransform
from dune_scale.distill.student import DuneStudent
from dune_scale.models.vit import NAMED_ARCHS, VisionTransformer, pos_embed_for_grid


class StudentFileError(ValueError):
    """A source that is not a usable DUNE student, or a format it cannot be written to (named)."""


@dataclass(frozen=True)
class StudentSpec:
    """Everything needed to rebuild the student from its weights (recorded in exported folders)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    num_register_tokens: int
    image_size: int
    layerscale_init: float
    teacher_dims: dict[str, int]
    teacher_tokens: dict[str, list[str]]
    projector_depth: int
    projector_mlp_ratio: float

    @property
    def arch(self) -> str:
        """``vit_small`` / ``vit_base`` / ``vit_large`` when the shapes are those, else ``custom``."""
        for name, shape in NAMED_ARCHS.items():
            if shape == (self.embed_dim, self.depth, self.num_heads):
                return name
        return "custom"

    def build_encoder(self) -> VisionTransformer:
        return VisionTransformer(
            img_size=self.image_size, patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
            num_heads=self.num_heads, num_register_tokens=self.num_register_tokens, layerscale_init=self.layerscale_init,
        )

    def build_student(self) -> DuneStudent:
        return DuneStudent(
            self.build_encoder(), self.teacher_dims, self.teacher_tokens,
            projector_depth=self.projector_depth, projector_mlp_ratio=self.projector_mlp_ratio,
            projector_layerscale_init=self.layerscale_init,
        )


@dataclass
class StudentWeights:
    """A student read from any source: weights in our layout and where they came from. The spec is
    worked out on first use (stage-2 initialisation needs the weights only)."""

    state: dict[str, torch.Tensor]
    source: Path
    step: int | None = None
    config: dict[str, Any] | None = None  # the student's resolved run config, when the source has one
    run_dir: Path | None = None
    num_heads: int | None = None
    recorded_spec: StudentSpec | None = None  # as an exported folder records it
    resampled_from: int | None = None  # the training size, when the table was resampled at export
    name: str = ""  # which student of a run of several ("" for the only one)

    @functools.cached_property
    def spec(self) -> StudentSpec:
        if self.recorded_spec is not None:
            return self.recorded_spec
        return spec_from_state(self.state, self.num_heads or _heads_from_config(self.config), self.source)


def spec_from_state(state: dict[str, torch.Tensor], num_heads: int | None, source: Path) -> StudentSpec:
    """Read the architecture off the weights; only the head count needs ``num_heads`` (or a named width)."""
    for key in ("encoder.pos_embed", "encoder.patch_embed.proj.weight", "encoder.blocks.0.norm1.weight"):
        if key not in state:
            raise StudentFileError(f"{source}: no {key} in its weights; expected a DUNE student (ViT encoder + projectors)")
    embed_dim = state["encoder.pos_embed"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.blocks\.(\d+)\.", k)))
    if num_heads is None:
        named = [heads for dim, d, heads in NAMED_ARCHS.values() if (dim, d) == (embed_dim, depth)]
        if not named:
            raise StudentFileError(
                f"{source}: a custom architecture (width {embed_dim}, {depth} blocks) whose head count is not recorded; "
                "export it from its run folder (config.yaml) or a checkpoint folder"
            )
        num_heads = named[0]
    patch = state["encoder.patch_embed.proj.weight"].shape[-1]
    grid = state["encoder.pos_embed"].shape[1] - 1
    teachers = sorted({k.split(".")[1] for k in state if k.startswith("projectors.")})
    mlp = state.get(f"projectors.{teachers[0]}.blocks.0.mlp.fc1.weight") if teachers else None
    return StudentSpec(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        patch_size=patch,
        num_register_tokens=state["encoder.register_tokens"].shape[1] if "encoder.register_tokens" in state else 0,
        image_size=round(grid**0.5) * patch,
        layerscale_init=1e-4,  # only decides that layer scales exist; their values are in the weights
        teacher_dims={t: state[f"projectors.{t}.head.weight"].shape[0] for t in teachers},
        teacher_tokens={t: [tok for tok in ("cls", "patch") if f"teacher_norms.{t}.{tok}.running_mean" in state] for t in teachers},
        projector_depth=len({k.split(".")[3] for k in state if k.startswith(f"projectors.{teachers[0]}.blocks.")}) if teachers else 1,
        projector_mlp_ratio=mlp.shape[0] / embed_dim if mlp is not None else 4.0,
    )


def _heads_from_config(config: dict[str, Any] | None) -> int | None:
    student = (config or {}).get("student", {})
    if student.get("arch") in NAMED_ARCHS:
        return NAMED_ARCHS[student["arch"]][2]
    return student.get("num_heads")


class DuneEncoder(nn.Module):
    """The encoder as DUNE trains and releases it, for downstream use.

    ``forward_features`` (ImageNet-normalised images) gives ``cls`` (B, D), ``patch`` (B, N, D) and
    ``reg`` (B, R, D) *before* the final LayerNorm, exactly DUNE's ``get_encoder_output``; the norm
    stays available as ``vit.norm``. ``preprocess`` maps a uint8 (3, H, W) image to the model input
    (shorter side resized to ``image_size``, centre crop, ImageNet normalisation: DUNE's evaluation).
    """

    def __init__(self, vit: VisionTransformer, image_size: int) -> None:
        super().__init__()
        self.vit = vit
        self.image_size = image_size
        self.patch_size = vit.patch_size
        self.embed_dim = vit.embed_dim
        self.preprocess = ValTransform(image_size)

    @classmethod
    def from_weights(cls, weights: StudentWeights) -> DuneEncoder:
        vit = weights.spec.build_encoder()
        encoder_state = {k[len("encoder.") :]: v for k, v in weights.state.items() if k.startswith("encoder.")}
        _load_strict(vit, encoder_state, weights.source)
        return cls(vit, weights.spec.image_size).eval()

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        tokens = self.vit.forward_tokens(images)
        prefix = self.vit.num_prefix_tokens
        return {"cls": tokens[:, 0], "patch": tokens[:, prefix:], "reg": tokens[:, 1:prefix] if prefix > 1 else None}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return self.forward_features(images)


def build_student_from(weights: StudentWeights) -> nn.Module:
    """The full student (encoder, projectors, teacher norms) with its weights, strictly."""
    student = weights.spec.build_student()
    _load_strict(student, weights.state, weights.source)
    return student.eval()


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        problem = (f"lacks {missing[0]}" if missing else f"has unexpected {unexpected[0]}" if unexpected
                   else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}")
        raise StudentFileError(f"{source}: does not fit the architecture its weights describe: {problem}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def check_resolution(resolution: tuple[int, int], patch_size: int) -> tuple[int, int]:
    height, width = resolution
    if min(height, width) < 1 or height % patch_size or width % patch_size:
        raise StudentFileError(f"--resolution {height}x{width}: each side must be a positive multiple of the patch size {patch_size}")
    return height, width


def at_resolution(weights: StudentWeights, resolution: tuple[int, int] | None) -> StudentWeights:
    """``weights`` made for ``resolution`` (H, W) inputs: the positional table resampled once, by
    the rule the encoder applies at that size, and that size recorded as the student's. The
    formats that store a square table (dune, timm, hf) take square sizes only."""
    spec = weights.spec
    if resolution is None or resolution == (spec.image_size, spec.image_size):
        return weights
    height, width = check_resolution(resolution, spec.patch_size)
    if height != width:
        raise StudentFileError(f"--resolution {height}x{width}: this format stores a square positional table; "
                               "a non-square size is for --format onnx")
    with torch.device("meta"):
        vit = spec.build_encoder()  # for its resampling settings only
    grid = height // spec.patch_size
    state = dict(weights.state)
    state["encoder.pos_embed"] = pos_embed_for_grid(state["encoder.pos_embed"], grid, grid, vit.interpolate_offset,
                                                    vit.interpolate_antialias)
    return dataclasses.replace(weights, state=state, recorded_spec=dataclasses.replace(spec, image_size=height),
                               resampled_from=spec.image_size)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file of student weights (a converted teacher, recognised
    by the JSON beside it, is named as such)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = path.with_suffix(".json")
    if meta.is_file():
        try:
            teacher = json.loads(meta.read_text()).get("teacher")
        except (ValueError, AttributeError):
            teacher = None
        if teacher:
            raise StudentFileError(f"{path}: this is a converted {teacher} teacher checkpoint ({meta.name}), not a DUNE student")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise StudentFileError(f"{path}: cannot be read (truncated or corrupt safetensors?): {err}") from None
