"""Reading pickle-based files (torch checkpoints, pickled metadata and image lists) without running code.

Unpickling can call any importable function, so a file planted in a run or data folder could run
its payload. Every reader here resolves only the globals a format needs, named one by one (never a
whole module: numpy's namespace also holds functions that call ``eval``), and refuses anything else
with :class:`RefusedGlobal`, naming the global. Callers name the file in their own error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

# numpy's pickle reconstruction globals: arrays, scalars and the dtypes of numbers, booleans and
# strings (object and void dtypes could carry anything). numpy 2 names, and the numpy 1.x names
# that older files carry for the same objects.
_NUMPY_RECONSTRUCTORS = ("numpy._core.multiarray._reconstruct", "numpy._core.multiarray.scalar", "numpy.ndarray", "numpy.dtype")
_NUMPY_1_ALIASES = {
    "numpy.core.multiarray._reconstruct": "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar": "numpy._core.multiarray.scalar",
}
_NUMPY_DTYPE_CLASSES = (
    "BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt8DType", "UInt16DType",
    "UInt32DType", "UInt64DType", "Float16DType", "Float32DType", "Float64DType", "Complex64DType",
    "Complex128DType", "StrDType", "BytesDType",
)  # fmt: skip
_REFUSED = re.compile(r"GLOBAL (\S+)")
_LISTED_AT_MOST = 8  # a refusal names the allowed globals when they are this few
# torch's own loader, also while :func:`torch_loads_restricted` stands in for ``torch.load``.
_TORCH_LOAD = torch.load
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch's switch, read at every load


class UnreadableCheckpoint(ValueError):
    """A file that cannot be read safely (the message says why; the caller names the file)."""


class RefusedGlobal(UnreadableCheckpoint):
    """A pickle that names a global outside the reader's allow-list: nothing in it was run."""

    def __init__(self, name: str, allowed: Iterable[str]) -> None:
        self.name = name
        listed = ", ".join(sorted(allowed)) if len(allowed) <= _LISTED_AT_MOST else f"the {len(allowed)} names its format needs"
        super().__init__(
            f"it holds a pickled Python object of class {name}, which is not allow-listed "
            f"(only {listed}); refusing to unpickle it"
        )


def _resolve(qualified: str) -> Any:
    module, _, name = qualified.rpartition(".")
    return getattr(importlib.import_module(module), name)


def numpy_globals() -> dict[str, Any]:
    """Pickle name → object for numpy arrays and scalars, under numpy 2 and numpy 1.x names."""
    found = {name: _resolve(name) for name in _NUMPY_RECONSTRUCTORS}
    found.update({old: found[new] for old, new in _NUMPY_1_ALIASES.items()})
    dtypes = importlib.import_module("numpy.dtypes")
    found.update({f"numpy.dtypes.{cls}": getattr(dtypes, cls) for cls in _NUMPY_DTYPE_CLASSES})
    return found


def plain_globals() -> dict[str, Any]:
    """What a pickle of containers, strings and numbers needs beyond opcodes (protocol-2 bytes)."""
    return {"_codecs.encode": _resolve("_codecs.encode"), "builtins.set": set, "builtins.frozenset": frozenset}


def official_training_globals() -> dict[str, Any]:
    """Objects official teacher and DUNE files hold besides tensors: the ``args`` namespace with its
    numpy schedules, numpy scalars (optimizer learning rates)."""
    return {"argparse.Namespace": argparse.Namespace, **numpy_globals()}


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, allowed: Mapping[str, Any]) -> None:
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified not in self.allowed:
            raise RefusedGlobal(qualified, self.allowed)
        return self.allowed[qualified]

    def persistent_load(self, pid: Any) -> Any:
        raise UnreadableCheckpoint(f"it refers to external storage {pid!r}; a plain pickle was expected")


def load_pickle(path: Path, allowed: Mapping[str, Any]) -> Any:
    """Unpickle ``path`` resolving only ``allowed`` (pickle name → object); any failure is one
    :class:`UnreadableCheckpoint` (:class:`RefusedGlobal` for a global outside the list)."""
    try:
        with open(path, "rb") as file:
            return _AllowListUnpickler(file, allowed).load()
    except UnreadableCheckpoint:
        raise
    except Exception as err:  # noqa: BLE001 - truncated file, bad opcode, not a pickle …
        raise UnreadableCheckpoint(f"cannot be read (truncated or corrupt file?): {err}") from None


def torch_load(
    source: Path | IO[bytes], allowed: Mapping[str, Any] | None = None, mmap: bool | None = None, map_location: Any = "cpu"
) -> Any:
    """``torch.load(weights_only=True)`` (on CPU unless ``map_location`` says otherwise) of a file
    or a binary stream, with ``allowed`` (pickle name → object) added to torch's tensor-only
    allow-list; any failure is one :class:`UnreadableCheckpoint` saying why and never a hint to load
    unsafely. ``mmap`` defaults to "where the file is a zip archive"."""
    allowed = dict(allowed or {})
    extra = [(obj, name) for name, obj in allowed.items()]
    try:
        if mmap is None:
            mmap = isinstance(source, (str, os.PathLike)) and zipfile.is_zipfile(source)
        with torch.serialization.safe_globals(extra), warnings.catch_warnings():
            # A pickle not written by torch: its protocol is named in the error if it matters.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return _TORCH_LOAD(source, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        refused = _REFUSED.search(str(err))
        if refused:
            raise RefusedGlobal(refused.group(1), allowed) from None
        raise UnreadableCheckpoint(f"cannot be read (truncated or corrupt file?): {_torch_reason(err)}") from None
    except Exception as err:  # noqa: BLE001 - truncated zip, bad header, not a checkpoint …
        raise UnreadableCheckpoint(f"cannot be read (truncated or corrupt file?): {_torch_reason(err)}") from None


@contextlib.contextmanager
def torch_loads_restricted(allowed: Mapping[str, Any]) -> Iterator[None]:
    """Within the block, every ``torch.load`` of this process reads like :func:`torch_load` with
    ``allowed``, whatever its caller asks: libraries that load their own files with
    ``weights_only=False`` (DeepSpeed, DCP's non-tensor values) then cannot run code from them. A
    refused or unreadable file raises :class:`UnreadableCheckpoint` naming it. Processes forked
    inside the block inherit it; other child processes get ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``.
    Process-wide while it lasts: for loading phases, not while other threads may load."""

    def restricted(f: Any, map_location: Any = None, pickle_module: Any = None, *, weights_only: Any = None,
                   mmap: bool | None = None, **kwargs: Any) -> Any:
        try:
            return torch_load(f, allowed, mmap=mmap, map_location=map_location)
        except UnreadableCheckpoint as err:
            name = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "an object stored in one of its files")
            raise UnreadableCheckpoint(f"{name}: {err}") from None

    previous, forced = torch.load, os.environ.get(_FORCE_WEIGHTS_ONLY)
    torch.load, os.environ[_FORCE_WEIGHTS_ONLY] = restricted, "1"
    try:
        yield
    finally:
        torch.load = previous
        if forced is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = forced


def _torch_reason(err: BaseException) -> str:
    """Why torch could not read a file, in one line, without its advice to retry with
    ``weights_only=False``: the unpickler's own reason where torch gives one, else the first line
    of the message, named by the exception's type when that says more than the message."""
    text = str(err).strip()
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
    if unpickler:
        return unpickler.group(1).splitlines()[0]
    first = next((line for line in text.splitlines() if line.strip() and "weights_only" not in line), "")
    return first if isinstance(err, (pickle.UnpicklingError, RuntimeError)) and first else f"{type(err).__name__}: {first}".rstrip(": ")
