"""The encoder as an ONNX graph: ``--format onnx``, and ``model.onnx`` of ``--format hf --with-onnx``.

The graph maps ImageNet-normalised images (B, 3, H, W) to ``cls`` (B, D) and ``patch`` (B, N, D),
the pre-norm tokens of :meth:`~dune_scale.engine.export.weights.DuneEncoder.forward_features`; torch's
ONNX exporter (dynamo) writes it at opset :data:`OPSET`, any batch size.

At a fixed size the positional table is computed once, at export, by the encoder's own rule
(:func:`~dune_scale.models.vit.pos_embed_for_grid`) and stored in the graph. A ``dynamic`` graph
takes any H, W (multiples of the patch) and computes the table at run time. A plain trace would
bake the traced size into that computation (torch.export fixes the scale factors and the
native-grid branch), so the exported copy computes it through one custom op whose ONNX translation
is a Resize with scale factors taken from the input shape, (H/p + offset)/M as
``F.interpolate(scale_factor=…)`` uses them, and scale 1 (the stored table) at the native square
grid. Before a dynamic graph is written, that translation is run by ONNX Runtime at three grids
and compared with the training rule; a difference above :data:`TOLERANCE` refuses ``dynamic``.

Needs the ``onnx`` extra (onnx, onnxscript, onnxruntime): imported by ``formats/onnx.py`` only
when a graph is written.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnxruntime
import torch
from onnxscript import BOOL, FLOAT, INT64
from onnxscript import opset18 as op
from torch import nn

from dune_scale.engine.export.weights import DuneEncoder, StudentFileError, StudentWeights, check_resolution
from dune_scale.models.vit import VisionTransformer, pos_embed_for_grid

OPSET = 18
# Largest absolute difference allowed between ONNX Runtime's run-time table and the training rule's.
TOLERANCE = 1e-4
INPUT, OUTPUTS = "images", ("cls", "patch")


@torch.library.custom_op("dune_scale::pos_embed_for_grid", mutates_args=())
def _pos_embed_op(pos_embed: torch.Tensor, rows: int, cols: int, offset: float) -> torch.Tensor:
    """:func:`pos_embed_for_grid` as one graph node (a copy: an op's output may not be its input)."""
    return pos_embed_for_grid(pos_embed, rows, cols, offset).clone()


@_pos_embed_op.register_fake
def _pos_embed_shape(pos_embed: torch.Tensor, rows: int, cols: int, offset: float) -> torch.Tensor:
    return pos_embed.new_empty((1, 1 + rows * cols, pos_embed.shape[2]))


def _pos_embed_onnx(pos_embed: FLOAT, rows: INT64, cols: INT64, offset: float) -> FLOAT:
    """The op's ONNX translation: Resize (cubic, a = −0.75, half-pixel, edges clamped: torch's
    bicubic) by scale factors computed from ``rows`` and ``cols``; 1 at the native square grid."""
    side, dim = math.isqrt(pos_embed.shape[1] - 1), pos_embed.shape[2]

    def ints(*values: int) -> INT64:
        return op.Constant(value_ints=list(values))

    cls = op.Slice(pos_embed, ints(0), ints(1), ints(1))
    grid = op.Slice(pos_embed, ints(1), ints(1 + side * side), ints(1))
    grid = op.Transpose(op.Reshape(grid, ints(1, side, side, dim)), perm=[0, 3, 1, 2])
    size = op.Concat(op.Reshape(rows, ints(1)), op.Reshape(cols, ints(1)), axis=0)
    native = op.Cast(op.ReduceMin(op.Cast(op.Equal(size, ints(side, side)), to=INT64.dtype), keepdims=1), to=BOOL.dtype)
    scales = op.Div(op.Add(op.Cast(size, to=FLOAT.dtype), op.Constant(value_float=offset)), op.Constant(value_float=float(side)))
    scales = op.Concat(op.Constant(value_floats=[1.0, 1.0]), op.Where(native, op.Constant(value_floats=[1.0, 1.0]), scales), axis=0)
    grid = op.Resize(grid, None, scales, None, mode="cubic", coordinate_transformation_mode="half_pixel",
                     cubic_coeff_a=-0.75, exclude_outside=0)
    grid = op.Reshape(op.Transpose(grid, perm=[0, 2, 3, 1]), ints(1, -1, dim))
    return op.Concat(cls, grid, axis=1)


class OnnxEncoder(nn.Module):
    """What the graph computes: ``forward_features``' cls and patch tokens, the positional table
    fixed for ``size`` (computed here, once, by the encoder's rule) or, without a size, the run-time op.

    Give it an encoder of its own: it replaces that encoder's ``interpolate_pos_encoding`` (the one
    step where the exported computation differs from the module's)."""

    def __init__(self, encoder: DuneEncoder, size: tuple[int, int] | None) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        vit = encoder.vit
        if size is None:
            vit.interpolate_pos_encoding = lambda num_patches, height, width: _pos_embed_op(
                vit.pos_embed, height // vit.patch_size, width // vit.patch_size, vit.interpolate_offset
            )
        else:
            self.register_buffer("pos_table", vit.interpolate_pos_encoding(0, *size).detach().clone())
            vit.interpolate_pos_encoding = lambda num_patches, height, width: self.pos_table

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder.forward_features(images)
        return features["cls"], features["patch"]


class _PosEmbedProbe(nn.Module):
    """The run-time table alone, for an input's size: what :func:`check_dynamic_resampling` runs."""

    def __init__(self, pos_embed: torch.Tensor, patch_size: int, offset: float) -> None:
        super().__init__()
        self.register_buffer("pos_embed", pos_embed.detach().clone())
        self.patch_size, self.offset = patch_size, offset

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rows, cols = images.shape[2] // self.patch_size, images.shape[3] // self.patch_size
        return _pos_embed_op(self.pos_embed, rows, cols, self.offset)


def _export(module: nn.Module, example: torch.Tensor, patch_size: int, dynamic: bool, out: Path | None,
            output_names: tuple[str, ...]) -> torch.onnx.ONNXProgram:
    """``module`` traced on ``example``; any batch size, and any multiple of the patch as H and W when ``dynamic``."""
    dims: dict[int, object] = {0: torch.export.Dim("batch", min=1)}
    if dynamic:
        dims |= {2: patch_size * torch.export.Dim("rows", min=1), 3: patch_size * torch.export.Dim("cols", min=1)}
    return torch.onnx.export(
        module.eval(), (example,), None if out is None else str(out), dynamo=True, opset_version=OPSET, verbose=False,
        external_data=False, input_names=[INPUT], output_names=list(output_names), dynamic_shapes=(dims,),
        custom_translation_table={torch.ops.dune_scale.pos_embed_for_grid.default: _pos_embed_onnx},
    )


def check_grids(side: int) -> tuple[tuple[int, int], ...]:
    """Three token grids for a table of ``side`` × ``side``: its own, a smaller non-square one, a larger one."""
    return (side, side), (max(1, side - 1), side + 3), (2 * side + 1, 2 * side)


def check_dynamic_resampling(vit: VisionTransformer) -> None:
    """Run the dynamic graph's resampling in ONNX Runtime at :func:`check_grids` and compare it with
    the training rule (``vit.interpolate_pos_encoding``); StudentFileError with the reason when
    they differ by more than :data:`TOLERANCE` or the graph cannot be made."""
    patch, side = vit.patch_size, math.isqrt(vit.pos_embed.shape[1] - 1)
    try:
        probe = _PosEmbedProbe(vit.pos_embed, patch, vit.interpolate_offset)
        program = _export(probe, torch.zeros(1, 3, side * patch, side * patch), patch, True, None, ("pos_embed",))
        session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
        for rows, cols in check_grids(side):
            images = torch.zeros(1, 3, rows * patch, cols * patch)
            (table,) = session.run(None, {INPUT: images.numpy()})
            with torch.no_grad():
                expected = vit.interpolate_pos_encoding(rows * cols, rows * patch, cols * patch)
            difference = (torch.from_numpy(table) - expected).abs().max().item()
            if not difference <= TOLERANCE:
                raise ValueError(f"at a {rows}x{cols} token grid it differs from the training rule by {difference:.1e} (allowed {TOLERANCE:g})")
    except Exception as err:  # noqa: BLE001 - whatever stops the check is the reason for refusing
        raise StudentFileError(
            f"--dynamic refused: the ONNX graph cannot compute the positional embedding as training does ({err}); "
            "export at a fixed --resolution instead"
        ) from None


def write_onnx(weights: StudentWeights, out: Path, resolution: tuple[int, int] | None = None, dynamic: bool = False) -> Path:
    """``out`` (a ``.onnx`` file): the encoder at ``resolution`` (H, W; default the training size)
    or, ``dynamic``, at any size."""
    spec = weights.spec
    if dynamic and resolution is not None:
        raise StudentFileError("--dynamic takes any input size and --resolution fixes one: give one of them")
    height, width = check_resolution(resolution or (spec.image_size, spec.image_size), spec.patch_size)
    encoder = DuneEncoder.from_weights(weights)
    if dynamic:
        check_dynamic_resampling(encoder.vit)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = OnnxEncoder(encoder, None if dynamic else (height, width))
    _export(module, torch.randn(2, 3, height, width), spec.patch_size, dynamic, out, OUTPUTS)
    return out
