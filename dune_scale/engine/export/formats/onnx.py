"""``--format onnx``: the encoder as an ONNX graph (images → cls and patch tokens). The graph is
made by :mod:`dune_scale.engine.export.onnx_graph`, imported only here, when one is written: its
packages (onnx, onnxscript, onnxruntime) are the ``onnx`` extra."""

from __future__ import annotations

from pathlib import Path

from dune_scale.engine.export.formats.base import ExportFormat
from dune_scale.engine.export.weights import StudentFileError, StudentWeights

DYNAMIC_HELP = "is for ONNX graphs: one that takes any input size (multiples of the patch)"


def write_onnx(weights: StudentWeights, out: Path, resolution: tuple[int, int] | None = None, dynamic: bool = False) -> Path:
    """``out`` (a ``.onnx`` file): the encoder at ``resolution`` (H, W; default the training size)
    or, ``dynamic``, at any size."""
    try:
        from dune_scale.engine.export import onnx_graph
    except ImportError as err:
        raise StudentFileError(f"format onnx needs the onnx extra (pip install 'dune_scale[onnx]'): {err}") from None
    return onnx_graph.write_onnx(weights, out, resolution, dynamic)


FORMAT = ExportFormat("onnx", "the encoder as ONNX (images -> cls, patch tokens), opset 18; needs the onnx extra",
                      write_onnx, options={"dynamic": DYNAMIC_HELP})
