"""The trained student in the formats people load, and back.

Our layout (``DuneStudent.state_dict()``) is the hub: every source is read into it and every
format is written from it.

- ``sources``: finding and reading a source (:func:`read_student`, :func:`load_encoder`); a
  checkpoint is read by the strategy that wrote it (``engine/strategies``), an exported folder by
  the format that wrote it.
- ``weights``: the student read (:class:`StudentWeights`), its architecture (:class:`StudentSpec`),
  the encoder for downstream use (:class:`DuneEncoder`), the resampling ``--resolution`` applies.
- ``layouts``: one filter function per foreign key layout (official DUNE, timm).
- ``formats``: the one table of output formats (:data:`FORMATS`), one module each (dune, timm,
  hf, onnx); ``card``: the model card of the hf folder; ``onnx_graph``: the ONNX graph (an extra).
"""

from __future__ import annotations

from pathlib import Path

from dune_scale.engine.export.card import model_card
from dune_scale.engine.export.formats import FORMATS, export_format, refuse_existing, write
from dune_scale.engine.export.formats.hf import write_hf
from dune_scale.engine.export.layouts import to_official_dune
from dune_scale.engine.export.sources import load_encoder, read_student
from dune_scale.engine.export.weights import DuneEncoder, StudentFileError, StudentSpec, StudentWeights, build_student_from
from dune_scale.files import sha256_file

# The names programs, tests and users import from here.
__all__ = [
    "FORMATS", "DuneEncoder", "StudentFileError", "StudentSpec", "StudentWeights", "build_student_from", "export",
    "load_encoder", "model_card", "read_student", "sha256_file", "to_official_dune", "write_hf",
]


def export(source: str | Path, fmt: str, out: str | Path, student: str | None = None,
           resolution: tuple[int, int] | None = None, force: bool = False, **options: bool) -> Path:
    """Read ``source`` (``student``: one of several students of a run) and write it as ``fmt`` (one
    of :data:`FORMATS`) to ``out``, at ``resolution`` (H, W; default the training size). An
    existing ``out`` is refused unless ``force``; ``options``: the format's own switches
    (``dynamic`` for onnx; ``with_onnx``, ``dynamic`` for hf)."""
    target, out = export_format(fmt), Path(out)
    refuse_existing(out, force)  # before the source is read: a refusal costs nothing
    return write(read_student(source, student), target, out, resolution, force, **options)
