"""The output formats: :data:`FORMATS` is the one table of them, which ``launch/export.py`` (its
``--format`` choices, switches and help), :func:`write` and the reader of exported folders use.
A new format is one module defining an :class:`ExportFormat` and one line here."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dune_scale.engine.export.formats import dune, hf, onnx, timm
from dune_scale.engine.export.formats.base import FOLDER_CONFIG, FOLDER_WEIGHTS, ExportFormat
from dune_scale.engine.export.weights import StudentFileError, StudentWeights

__all__ = ["FOLDER_CONFIG", "FOLDER_WEIGHTS", "FORMATS", "ExportFormat", "export_format", "refuse_existing", "write"]

FORMATS: dict[str, ExportFormat] = {fmt.name: fmt for fmt in (dune.FORMAT, timm.FORMAT, hf.FORMAT, onnx.FORMAT)}


def export_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise StudentFileError(f"format {name!r} is unknown; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def refuse_existing(out: Path, force: bool) -> None:
    """Nothing is overwritten unless asked: an existing ``out`` needs ``force``."""
    if (out.exists() or out.is_symlink()) and not force:
        kind = "folder" if out.is_dir() else "file"
        raise StudentFileError(f"--out {out}: a {kind} of that name exists; give another --out, or --force to replace it")


def write(weights: StudentWeights, fmt: ExportFormat, out: Path, resolution: tuple[int, int] | None = None,
          force: bool = False, **options: bool) -> Path:
    """``weights`` written as ``fmt`` to ``out``. The format writes beside it first; only a complete
    result takes the place of ``out`` (an existing one only with ``force``), so a failed export
    leaves what was there."""
    refuse_existing(out, force)
    unknown = sorted(set(options) - set(fmt.options))
    if unknown:
        raise StudentFileError(f"format {fmt.name} has no option {unknown[0]!r}; its options: {', '.join(fmt.options) or 'none'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    _remove(partial)
    try:
        fmt.write(weights, partial, resolution=resolution, **options)
        _remove(out)
        os.replace(partial, out)
    finally:
        _remove(partial)
    return out


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
