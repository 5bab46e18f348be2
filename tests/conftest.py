"""Shared fixtures: a private TMPDIR per test session, tiny configs, synthetic demo shards."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Data-side fixtures (S3 server, per-test TMPDIR) and the per-test outcome log (make gpu-check) live
# beside this file; loaded for every test module.
pytest_plugins = ("conftest_data", "outcome_log")

REPO = Path(__file__).resolve().parents[1]
TINY_CPU = REPO / "configs" / "tiny_cpu.yaml"

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Triton kernels run on CPU tensors in the interpreter; it must be set before anything imports triton
# (Streaming does, through torch), so the kernel tests run in this process.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def private_tmpdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Streaming leaves lock files in TMPDIR: keep them out of other runs' way."""
    path = tmp_path_factory.mktemp("tmpdir")
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = None
    yield path
    if old is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old
    tempfile.tempdir = None


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dune_scale.data import write_demo_shards

    root = tmp_path_factory.mktemp("demo_shards")
    write_demo_shards(root)
    return root


def tiny_overrides(output_dir: Path, shards: Path, *extra: str) -> list[str]:
    """tiny_cpu pointed at test folders, quiet console, no loader workers (fast start-up)."""
    return [
        f"run.output_dir={output_dir}",
        f"data.remote_root={shards}",
        "run.console=none",
        "data.num_workers=0",
        *extra,
    ]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_env(tmp: Path) -> dict[str, str]:
    """Environment for multi-process runs: loopback only, one thread per rank, private TMPDIR."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        TMPDIR=str(tmp),
        DS_ACCELERATOR="cpu",
        PYTHONPATH=str(REPO),
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dune_scale" / "torch_extensions"))
    return env


def launch_command(launcher: str, nproc: int, script: Path, *args: str) -> list[str]:
    """``python`` (1 process), ``torchrun`` or ``deepspeed`` with ``nproc`` ranks on 127.0.0.1."""
    import sys

    port = str(free_port())
    if launcher == "python":
        return [sys.executable, str(script), *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", port, str(script), *args]
    if launcher == "deepspeed":
        return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", port, str(script), *args]
    raise ValueError(launcher)


def global_batches(out: Path) -> list[list[str]]:
    """Per step, the sorted sample ids of the whole global batch (all ranks' sample logs)."""
    from dune_scale.telemetry.metrics import read_metrics

    steps: dict[int, list[str]] = {}
    for path in sorted((out / "samples").glob("rank_*.jsonl")):
        for record in read_metrics(path):
            steps.setdefault(record["step"], []).extend(record["samples"])
    return [sorted(steps[s]) for s in sorted(steps)]


@pytest.fixture(autouse=True)
def release_streaming_shared_memory(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close the shared memory of every dataset a test builds in this process, as training does at
    its end: Streaming keeps it until exit and each new dataset re-opens all earlier ones, which
    would take the suite past the file-descriptor limit. Without Streaming (the GPU machine) no
    dataset can be built: nothing to track."""
    if importlib.util.find_spec("streaming") is None:
        yield
        return
    from dune_scale.data.dataset import MixtureDataset

    built: list[MixtureDataset] = []
    original = MixtureDataset.__init__

    def tracked(self: MixtureDataset, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(MixtureDataset, "__init__", tracked)
    yield
    for dataset in built:
        dataset.release_shared_memory()
