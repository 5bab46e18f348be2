"""Checkpoints in object storage (a real S3 server, SeaweedFS on 127.0.0.1) and async saves."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import REPO, TINY_CPU, free_port, launch_command, launcher_env, tiny_overrides
from conftest_data import SeaweedS3
from dune_scale.cli.train import main, train
from dune_scale.config import ConfigError, load_config
from dune_scale.engine.checkpointer import LATEST, MANIFEST
from dune_scale.engine.remote_checkpoints import RemoteCheckpoints
from dune_scale.telemetry.metrics import read_metrics


def _run(output: Path, shards: Path, *extra: str) -> None:
    train(load_config(TINY_CPU, tiny_overrides(output, shards, "run.log_samples=false", *extra)))


def _exported(output: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(output / "student.safetensors"))


def _remote_keys(server: SeaweedS3, prefix: str) -> dict[str, int]:
    listing = server.client().list_objects_v2(Bucket=server.bucket, Prefix=prefix + "/")
    return {obj["Key"][len(prefix) + 1 :]: obj["Size"] for obj in listing.get("Contents", [])}


def _copy_remote_folder(server: SeaweedS3, prefix: str, source: str, target: str, manifest: bool, damage: str | None) -> None:
    """Plant ``target`` as a copy of ``source``: with or without its manifest, one file damaged
    (same size, one byte changed) when ``damage`` names it."""
    client = server.client()
    for name in _remote_keys(server, f"{prefix}/{source}"):
        if name == MANIFEST and not manifest:
            continue
        body = bytearray(client.get_object(Bucket=server.bucket, Key=f"{prefix}/{source}/{name}")["Body"].read())
        if name == damage:
            body[len(body) // 2] ^= 0xFF
        client.put_object(Bucket=server.bucket, Key=f"{prefix}/{target}/{name}", Body=bytes(body))


def test_resume_from_s3_on_an_empty_disk_is_bitwise_skipping_broken_remote_checkpoints(
    s3_env: SeaweedS3, tmp_path: Path, demo_shards: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run uploads its checkpoints (remote keep_last applied); a newer remote checkpoint with a
    damaged file and an upload without its manifest are skipped; a job whose local disk is empty
    resumes from S3 (async save on) and ends with the weights of an uninterrupted run."""
    prefix = "runs/resume"
    remote = f"checkpoint.remote=s3://{s3_env.bucket}/{prefix}"
    _run(tmp_path / "straight", demo_shards, "train.max_steps=4", "checkpoint.every_steps=4")
    out = tmp_path / "preempted"
    _run(out, demo_shards, "train.max_steps=2", "checkpoint.every_steps=1", "checkpoint.keep_last=1", remote)

    stored = _remote_keys(s3_env, prefix)
    local = json.loads((out / "checkpoints" / "step_000000002" / MANIFEST).read_text())["files"]
    assert stored == {LATEST: len("step_000000002\n"), f"step_000000002/{MANIFEST}": stored[f"step_000000002/{MANIFEST}"],
                      **{f"step_000000002/{name}": entry["size"] for name, entry in local.items()}}  # step 1 pruned
    largest = max(local, key=lambda name: local[name]["size"])
    _copy_remote_folder(s3_env, prefix, "step_000000002", "step_000000003", manifest=True, damage=largest)
    _copy_remote_folder(s3_env, prefix, "step_000000002", "step_000000004", manifest=False, damage=None)
    s3_env.client().put_object(Bucket=s3_env.bucket, Key=f"{prefix}/{LATEST}", Body=b"step_000000003\n")

    shutil.rmtree(out / "checkpoints")  # a fresh node
    with caplog.at_level(logging.WARNING):
        _run(out, demo_shards, "train.max_steps=4", "checkpoint.every_steps=1", "checkpoint.keep_last=1", remote,
             "checkpoint.async_save=true")
    skipped = [r.getMessage() for r in caplog.records if "cannot be resumed from" in r.getMessage()]
    assert "step_000000003" in skipped[0] and "sha256" in skipped[0], skipped
    assert "step_000000004" in skipped[1] and f"no {MANIFEST}" in skipped[1], skipped

    straight, resumed = _exported(tmp_path / "straight"), _exported(out)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    stored = _remote_keys(s3_env, prefix)
    assert {key.split("/")[0] for key in stored} == {LATEST, "step_000000004"}  # the planted ones are gone too
    assert f"step_000000004/{MANIFEST}" in stored
    assert s3_env.client().get_object(Bucket=s3_env.bucket, Key=f"{prefix}/{LATEST}")["Body"].read() == b"step_000000004\n"


def test_remote_store_problems_are_one_line_with_exit_code_2(
    s3_env: SeaweedS3, tmp_path: Path, demo_shards: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    argv = ["--config", str(TINY_CPU), *tiny_overrides(tmp_path / "run", demo_shards, "train.max_steps=1")]
    with pytest.raises(ConfigError, match=r"checkpoint.remote: 'gs://bucket/x' is not allowed; it must be an s3://bucket/prefix URL"):
        load_config(TINY_CPU, ["checkpoint.remote=gs://bucket/x"])

    assert main([*argv, "checkpoint.remote=s3://no-such-bucket/x"]) == 2
    assert "s3://no-such-bucket/" in capsys.readouterr().err

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    assert main([*argv, f"checkpoint.remote=s3://{s3_env.bucket}/x"]) == 2
    err = capsys.readouterr().err
    assert f"s3://{s3_env.bucket}/" in err and "403" in err, err

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret)
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        dead = f"http://127.0.0.1:{silent.getsockname()[1]}"
        short = ["data.download_timeout=1", "data.download_retry=0", f"checkpoint.remote=s3://{s3_env.bucket}/x"]
        assert main([*argv, *short, f"data.s3_endpoint_url={dead}"]) == 2
        err = capsys.readouterr().err
        assert f"no answer from the object store (endpoint {dead}) within data.download_timeout=1 s" in err and err.count("\n") == 1, err

        # The store goes silent after the start-up check: the first upload names the key, the run
        # stops (exit 2) with its local checkpoint complete and the remote folder without a manifest.
        upload = RemoteCheckpoints.upload

        def upload_to_silent_store(self: RemoteCheckpoints, folder: Path, names: list[str]) -> None:
            self.endpoint = dead
            upload(self, folder, names)

        monkeypatch.setattr(RemoteCheckpoints, "upload", upload_to_silent_store)
        assert main([*argv, *short, f"data.s3_endpoint_url={s3_env.endpoint}"]) == 2
    err = capsys.readouterr().err
    assert f"uploading s3://{s3_env.bucket}/x/step_000000001/" in err and "no answer" in err and err.count("\n") == 1, err
    assert (tmp_path / "run" / "checkpoints" / LATEST).read_text() == "step_000000001\n"
    assert f"step_000000001/{MANIFEST}" not in _remote_keys(s3_env, "x")


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[Callable[[], None]]:
    """FSDP in this process: a one-rank gloo group (train() destroys it at its end)."""
    store = str(tmp_path / "store")

    def init() -> None:
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"file://{store}.{free_port()}", rank=0, world_size=1)

    yield init
    if dist.is_initialized():
        dist.destroy_process_group()


def _checkpoint_state(folder: Path) -> dict:
    """Model and optimizer state of an FSDP (DCP) checkpoint folder."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder / "fsdp", folder.parent / f"{folder.name}.pt")
    return torch.load(folder.parent / f"{folder.name}.pt", weights_only=True)


def _tensors_if_equal(a: object, b: object) -> int:
    """How many tensors two nested states hold, asserting they are equal value by value."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
        return 1
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        return sum(_tensors_if_equal(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        return sum(_tensors_if_equal(x, y) for x, y in zip(a, b))
    assert a == b
    return 0


def test_fsdp_async_save_equals_sync_save_by_value(
    tmp_path: Path, demo_shards: Path, one_rank_group: Callable[[], None]
) -> None:
    """DCP's async_save stages the state before training goes on: every checkpoint of an async run
    holds what a sync run saved at that step, and is complete (manifest, latest) when the run ends."""
    runs = {}
    for mode in ("false", "true"):
        one_rank_group()
        out = tmp_path / f"async_{mode}"
        _run(out, demo_shards, "strategy.name=fsdp", "train.max_steps=2", "checkpoint.every_steps=1",
             "checkpoint.keep_last=2", f"checkpoint.async_save={mode}")
        assert (out / "checkpoints" / LATEST).read_text() == "step_000000002\n"
        runs[mode] = out / "checkpoints"
    for step in ("step_000000001", "step_000000002"):  # the first one was written during step 2
        assert _tensors_if_equal(_checkpoint_state(runs["false"] / step), _checkpoint_state(runs["true"] / step)) > 10, step


@pytest.mark.distributed
def test_two_ranks_upload_their_shares_and_a_fresh_node_resumes_from_s3(s3_env: SeaweedS3, tmp_path: Path, demo_shards: Path) -> None:
    """2 FSDP ranks, async saves: every rank's shard files reach the store with the manifest; a
    second job with an empty output folder (a fresh node) downloads them and continues at step 3.
    Two launches, as a cluster runs two jobs (re-initialising the process group inside one torchrun
    launch is not what this tests, and can hang on the launcher's store)."""
    prefix = "runs/two_ranks"
    for folder, steps in (("first", 2), ("second", 4)):
        command = launch_command(
            "torchrun", 2, REPO / "launch" / "train.py", "--config", str(TINY_CPU),
            *tiny_overrides(tmp_path / folder, demo_shards, "run.log_samples=false"), "strategy.name=fsdp",
            f"train.max_steps={steps}", "checkpoint.every_steps=2", "checkpoint.async_save=true",
            f"checkpoint.remote=s3://{s3_env.bucket}/{prefix}",
        )
        done = subprocess.run(command, env=launcher_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    stored = _remote_keys(s3_env, prefix)
    assert {"step_000000004/fsdp/__0_0.distcp", "step_000000004/fsdp/__1_0.distcp", f"step_000000004/{MANIFEST}"} <= stored.keys()
    assert {key.split("/")[0] for key in stored} == {LATEST, "step_000000002", "step_000000004"}
    assert "downloaded checkpoint" in done.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "second" / "metrics.jsonl")] == [3, 4]
