"""One filter function per foreign key layout of the student's weights (as timm keeps one per
checkpoint family): to and from the official DUNE model state and timm's ``vit_*_reg4_dinov2``,
and the wrapper prefixes training may leave in key names."""

from __future__ import annotations

import re

import torch

# Wrappers that training may leave in key names (DDP/DeepSpeed, torch.compile, activation checkpointing).
_WRAPPER_PARTS = re.compile(r"(^|\.)(module|_orig_mod|_checkpoint_wrapped_module)\.")


def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` / ``_orig_mod.`` / ``_checkpoint_wrapped_module.`` wherever they sit in a key."""
    return {_WRAPPER_PARTS.sub(r"\1", k): v for k, v in state.items()}


def from_official_dune(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DUNE model state (``BlockChunk`` ``encoder.blocks.<chunk>.<i>.``, ``mask_token``,
    ``projectors.<t>.linear``, ``teacher_norms.<t>.normalizers.<tok>.mean/std``) → our layout."""
    out: dict[str, torch.Tensor] = {}
    scales = {k.split(".")[1]: v for k, v in state.items() if re.fullmatch(r"projectors\.[^.]+\.scale", k)}
    for key, value in state.items():
        if key == "encoder.mask_token" or key in (f"projectors.{t}.scale" for t in scales):
            continue
        key = re.sub(r"^encoder\.blocks\.\d+\.(\d+)\.", r"encoder.blocks.\1.", key)
        projector = re.match(r"projectors\.([^.]+)\.linear\.(weight|bias)$", key)
        if projector:
            name, part = projector.groups()
            key = f"projectors.{name}.head.{part}"
            if name in scales:  # a learnt output scale (projector scale=0): folded into the linear map
                value = value * scales[name].to(value.dtype)
        key = re.sub(r"^teacher_norms\.([^.]+)\.normalizers\.([^.]+)\.mean$", r"teacher_norms.\1.\2.running_mean", key)
        key = re.sub(r"^teacher_norms\.([^.]+)\.normalizers\.([^.]+)\.std$", r"teacher_norms.\1.\2.running_std", key)
        out[key] = value
    return out


def to_official_dune(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our layout → the official DUNE model state (one ``BlockChunk``, a zero ``mask_token``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = re.sub(r"^encoder\.blocks\.(\d+)\.", r"encoder.blocks.0.\1.", key)
        key = re.sub(r"^projectors\.([^.]+)\.head\.", r"projectors.\1.linear.", key)
        key = re.sub(r"^teacher_norms\.([^.]+)\.([^.]+)\.running_mean$", r"teacher_norms.\1.normalizers.\2.mean", key)
        key = re.sub(r"^teacher_norms\.([^.]+)\.([^.]+)\.running_std$", r"teacher_norms.\1.normalizers.\2.std", key)
        out[key] = value
    width = state["encoder.pos_embed"].shape[-1]
    out["encoder.mask_token"] = torch.zeros(1, width, dtype=state["encoder.pos_embed"].dtype)
    return out


def to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our encoder → timm's ``vit_*_patch14_reg4_dinov2`` (``no_embed_class``: the class position is
    folded into ``cls_token``, registers become ``reg_token``, ``pos_embed`` covers patches only)."""
    encoder = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    pos = encoder.pop("pos_embed")
    out = {"cls_token": encoder.pop("cls_token") + pos[:, :1], "pos_embed": pos[:, 1:].contiguous()}
    if "register_tokens" in encoder:
        out["reg_token"] = encoder.pop("register_tokens")
    out.update(encoder)
    return out


def from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's ``vit_*_reg4_dinov2`` weights → our encoder (a zero class position keeps the features)."""
    encoder = dict(state)
    pos = encoder.pop("pos_embed")
    out = {"encoder.pos_embed": torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1), "encoder.cls_token": encoder.pop("cls_token")}
    if "reg_token" in encoder:
        out["encoder.register_tokens"] = encoder.pop("reg_token")
    out.update({f"encoder.{k}": v for k, v in encoder.items() if not k.startswith("head.")})
    return out
