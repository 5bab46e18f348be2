"""The output formats: :data:`FORMATS` is the one table of them, which ``launch/export.py`` (its
``--format`` choices, switches and help), :func:`write` and the reader of exported folders use.
A new format is one module defining an :class:`ExportFormat` and one line here."""

from __future__ import annotations

from pathlib import Path

from dune_scale.engine.export.formats import dune, hf, onnx, timm
from dune_scale.engine.export.formats.base import FOLDER_CONFIG, FOLDER_WEIGHTS, ExportFormat
from dune_scale.engine.export.weights import StudentFileError, StudentWeights

__all__ = ["FOLDER_CONFIG", "FOLDER_WEIGHTS", "FORMATS", "ExportFormat", "export_format", "write"]

FORMATS: dict[str, ExportFormat] = {fmt.name: fmt for fmt in (dune.FORMAT, timm.FORMAT, hf.FORMAT, onnx.FORMAT)}


def export_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise StudentFileError(f"format {name!r} is unknown; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def write(weights: StudentWeights, fmt: ExportFormat, out: Path, resolution: tuple[int, int] | None = None,
          **options: bool) -> Path:
    """``weights`` written as ``fmt`` to ``out``."""
    unknown = sorted(set(options) - set(fmt.options))
    if unknown:
        raise StudentFileError(f"format {fmt.name} has no option {unknown[0]!r}; its options: {', '.join(fmt.options) or 'none'}")
    return fmt.write(weights, out, resolution=resolution, **options)
