"""Reading a checkpoint's files, of every strategy, without running code from them.

A run folder is shared storage: anyone who can write there can plant a file. Our own files hold
tensors and plain containers (``weights_only``). FSDP's DCP folder has a metadata pickle, which
torch reads with full pickle, and values torch saved with pickle; DeepSpeed reads its files with
``weights_only=False``. Here each of them resolves only the classes its format needs, named one by
one (found by saving real checkpoints of every strategy), and anything else stops the load with a
:class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader

from dune_scale.safe_load import UnreadableCheckpoint, load_pickle, torch_load, torch_loads_restricted

# What a DCP ``.metadata`` pickle names besides containers: torch's metadata classes, the storage
# index of the file-system writer, tensor sizes, dtypes and layouts, and the checkpoint's path.
_DCP_METADATA_CLASSES = (
    "torch.distributed.checkpoint.metadata.Metadata",
    "torch.distributed.checkpoint.metadata.MetadataIndex",
    "torch.distributed.checkpoint.metadata.StorageMeta",
    "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
    "torch.distributed.checkpoint.metadata.TensorProperties",
    "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    "torch.serialization._get_layout",
    "torch.Size",
)
# Python 3.13 moved pathlib's classes into pathlib._local; files name either.
_PATH_NAMES = ("pathlib.PosixPath", "pathlib._local.PosixPath", "pathlib.PurePosixPath", "pathlib._local.PurePosixPath")
# What DeepSpeed's ZeRO-1/2/3 and universal files hold besides tensors and containers.
_DEEPSPEED_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from or read (named in the message)."""


def _found(names: tuple[str, ...]) -> dict[str, Any]:
    """Pickle name → object for the names this Python, torch and DeepSpeed have (a name missing
    here cannot be in a file they could read anyway)."""
    resolved = {}
    for qualified in names:
        module, _, name = qualified.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if obj is not None:
            resolved[qualified] = obj
    return resolved


def dcp_metadata_globals() -> dict[str, Any]:
    """Every global a DCP ``.metadata`` pickle may name: the metadata classes, every torch dtype."""
    dtypes = {f"torch.{name}": value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
    return {**_found(_DCP_METADATA_CLASSES), **_found(_PATH_NAMES), **dtypes}


def deepspeed_globals() -> dict[str, Any]:
    """The classes DeepSpeed's files hold besides tensors and containers."""
    return _found(_DEEPSPEED_CLASSES)


def read_torch_file(path: Path, map_location: Any = "cpu", mmap: bool | None = None) -> Any:
    """One of our checkpoint files (tensors and plain containers)."""
    try:
        return torch_load(path, map_location=map_location, mmap=mmap)
    except UnreadableCheckpoint as err:
        raise CheckpointError(f"{path}: {err}") from None


class RestrictedDCPReader(FileSystemReader):
    """DCP's file-system reader, its metadata unpickled with :func:`dcp_metadata_globals` only."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        path = Path(os.fspath(self.path)) / (".metadata" if rank is None else f"__{rank}.metadata")
        try:
            metadata = load_pickle(path, dcp_metadata_globals())
        except UnreadableCheckpoint as err:
            raise CheckpointError(f"{path}: {err}") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


@contextlib.contextmanager
def _dcp_errors(folder: Path) -> Iterator[None]:
    """Around DCP's reads: the non-tensor values it stored (``torch.load(weights_only=False)`` in
    DCP) load tensors and containers only; a refusal, which DCP reports wrapped with every rank's
    traceback (``CheckpointException``, a BaseException), is one :class:`CheckpointError`."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with torch_loads_restricted({}):
            yield
    except UnreadableCheckpoint as err:
        raise CheckpointError(f"{folder}: {err}") from None
    except CheckpointException as err:
        for failure, _ in err.failures.values():
            if isinstance(failure, (UnreadableCheckpoint, CheckpointError)):
                raise CheckpointError(f"{folder}: {failure}") from None
        raise


def load_dcp(state: dict[str, Any], folder: Path) -> None:
    """``dcp.load`` of ``folder`` into ``state`` (collective), nothing unpickled but what DCP's format
    needs. The metadata is read once up front: DCP would only log its error and go on."""
    import torch.distributed.checkpoint as dcp

    reader = RestrictedDCPReader(folder)
    reader.read_metadata()
    with _dcp_errors(folder):
        dcp.load(state, storage_reader=reader)


def read_dcp_keys(folder: Path, keys: set[str]) -> dict[str, Any]:
    """The entries ``keys`` of a DCP checkpoint, merged in this process (no process group needed)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    reader = RestrictedDCPReader(folder)
    reader.read_metadata()
    with _dcp_errors(folder), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        return _load_state_dict_from_keys(keys, storage_reader=reader)


@contextlib.contextmanager
def deepspeed_loads() -> Iterator[None]:
    """Around DeepSpeed calls that read ZeRO or universal checkpoint files: every file it loads
    resolves only :func:`deepspeed_globals` beyond tensors; a refused or unreadable file
    raises :class:`CheckpointError` naming it."""
    try:
        with torch_loads_restricted(deepspeed_globals()):
            yield
    except UnreadableCheckpoint as err:
        raise CheckpointError(str(err)) from None
