"""Hardening (issue 24): nothing runs code from a run folder, nothing waits forever, nothing silently
starts over, and bad input is one error line with exit code 2."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_safe_load import _Payload

from conftest import REPO, TINY_CPU, launch_command, launcher_env, tiny_overrides
from dune_scale.cli.train import main as train_main
from dune_scale.engine.checkpointer import LATEST, MANIFEST, Checkpointer, CheckpointError, verify
from dune_scale.engine.preemption import EXIT_PREEMPTED
from dune_scale.engine.watchdog import EXIT_STALLED, StallWatchdog
from dune_scale.telemetry.metrics import read_metrics

TRAIN = REPO / "launch" / "train.py"


def _rehash(folder: Path, name: str) -> None:
    """Record ``name``'s current size and sha256 in the checkpoint's manifest, as someone who can
    write the run folder could: the manifest does not protect against a planted file."""
    manifest = json.loads((folder / MANIFEST).read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def plant_payload(folder: Path, name: str, marker: Path) -> None:
    """Replace checkpoint file ``name`` by one whose unpickling would create ``marker``: a pickle for
    DCP's ``.metadata``, else the same torch file with the payload added."""
    path = folder / name
    if path.name.endswith(".metadata"):
        path.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        content = torch.load(path, map_location="cpu", weights_only=False)  # test-only: our own, trusted file
        content["evil"] = _Payload(marker)
        torch.save(content, path)
    _rehash(folder, name)


def assert_planted_payload_refused(checkpoint: Path, name: str, tmp_path: Path, *export_args: str) -> None:
    """A payload planted in ``name`` of (a copy of) ``checkpoint`` never runs: reading the
    checkpoint stops with exit code 2 and one line naming the file (export; for ZeRO files also the
    universal conversion, which DeepSpeed's own code reads). Used on test_distributed's real
    checkpoints of every strategy."""
    from dune_scale.cli.convert_checkpoint import main as convert_main
    from dune_scale.cli.export import main as export_main

    copy = tmp_path / "planted" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    marker = tmp_path / "payload_ran"
    plant_payload(copy, name, marker)
    programs = [lambda: export_main([str(copy), "--format", "hf", "--out", str(tmp_path / "planted_hf"), *export_args])]
    if "/deepspeed/" in f"/{name}":
        shutil.rmtree(copy / Path(name).parent.parent / "deepspeed_universal", ignore_errors=True)
        programs.append(lambda: convert_main([str(copy), "--workers", "1"]))
    for program in programs:
        with contextlib.redirect_stderr(io.StringIO()) as stderr:
            assert program() == 2
        err = stderr.getvalue()
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert str(copy / name) in err and "not allow-listed" in err, err
    assert not marker.exists()


# ------------------------------------------------------------------------------- code execution


def test_dcp_checkpoints_unpickle_only_what_their_format_needs(tmp_path: Path) -> None:
    """FSDP's DCP folder, as the FSDP strategy resumes it and export reads it: a real one loads; a
    planted ``.metadata`` or a planted non-tensor value never runs, and the file is named."""
    import torch.distributed.checkpoint as dcp

    from dune_scale.engine.checkpoint_files import load_dcp, read_dcp_keys

    state = {"model": {"w": torch.arange(4.0)}, "optim": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["w"]}]}}
    marker = tmp_path / "payload_ran"
    for name, saved in (("good", state), ("value", {**state, "evil": _Payload(marker)})):
        dcp.save(saved, checkpoint_id=str(tmp_path / name))
    target = {"model": {"w": torch.zeros(4)}, "optim": {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0), "params": []}]}}
    load_dcp(target, tmp_path / "good")
    assert torch.equal(target["model"]["w"], torch.arange(4.0)) and target["optim"] == state["optim"]
    assert torch.equal(read_dcp_keys(tmp_path / "good", {"model"})["model"]["w"], torch.arange(4.0))

    shutil.copytree(tmp_path / "good", tmp_path / "metadata")
    (tmp_path / "metadata" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'metadata' / '.metadata'}: .*posix.system, which is not allow-listed"):
        load_dcp({"model": {"w": torch.zeros(4)}}, tmp_path / "metadata")
    with pytest.raises(CheckpointError, match=r"\.metadata: .*not allow-listed"):
        read_dcp_keys(tmp_path / "metadata", {"model"})
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'value'}: .*posix.system, which is not allow-listed"):
        load_dcp({**target, "evil": None}, tmp_path / "value")
    assert not marker.exists()


def test_our_own_checkpoint_files_refuse_objects_naming_the_file(tmp_path: Path) -> None:
    from dune_scale.engine.checkpointer import TRAINER_STATE, read_trainer_state

    marker = tmp_path / "payload_ran"
    torch.save({"progress": {"step": 1}, "evil": _Payload(marker)}, tmp_path / TRAINER_STATE)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / TRAINER_STATE}: .*not allow-listed"):
        read_trainer_state(tmp_path)
    assert not marker.exists()


def test_latest_and_manifest_names_outside_the_checkpoints_folder_are_refused(tmp_path: Path) -> None:
    from dune_scale.distributed import DistInfo

    root = tmp_path / "checkpoints"
    (root / "step_000000002").mkdir(parents=True)
    (tmp_path / "elsewhere" / "step_000000009").mkdir(parents=True)
    checkpointer = Checkpointer(root, 1, 1, DistInfo())
    for pointer in ("../elsewhere/step_000000009", str(tmp_path / "elsewhere" / "step_000000009")):
        (root / LATEST).write_text(pointer + "\n")
        with pytest.raises(CheckpointError, match=rf"{root / LATEST}: `latest` points to '{pointer}', outside {root}"):
            checkpointer.find_latest()
    (root / LATEST).unlink()
    (root / LATEST).symlink_to(tmp_path / "elsewhere" / "step_000000009")
    with pytest.raises(CheckpointError, match=rf"`latest` is a symbolic link to {tmp_path / 'elsewhere'}"):
        checkpointer.find_latest()
    (root / LATEST).unlink()
    (root / "step_000000001").symlink_to(tmp_path / "elsewhere" / "step_000000009")  # a folder name leading out
    (root / LATEST).write_text("step_000000001\n")
    with pytest.raises(CheckpointError, match="outside"):
        checkpointer.find_latest()
    (root / "step_000000002" / MANIFEST).write_text(json.dumps({"step": 2, "files": {"../../secret": {"size": 1, "sha256": ""}}}))
    assert verify(root / "step_000000002", DistInfo()) == [
        "step_000000002: its COMPLETE manifest lists '../../secret', a path outside the checkpoint folder"
    ]


def test_names_that_become_paths_are_refused_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from dune_scale.cli.convert_data import main as convert_main
    from dune_scale.data.errors import DataError
    from dune_scale.data.mixture import MixtureError, resolve_mixture
    from dune_scale.data.schema import index_shards

    source = tmp_path / "images"
    source.mkdir()
    Image.new("RGB", (8, 8)).save(source / "a.jpg")
    out = tmp_path / "a" / "b" / "out"
    for name in ("../../x", "..", "/abs"):
        assert convert_main([str(source), str(out), "--name", name, "--no-progress", "--workers", "1"]) == 2
        assert "must be a folder name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # nothing written anywhere
    with pytest.raises(MixtureError, match="needs a name"):
        resolve_mixture([{"name": "..", "domain": "dino2", "size": 1}], "teacher_domains", str(tmp_path))
    (tmp_path / "d").mkdir()
    entry = {"samples": 1, "raw_data": {"basename": "../../etc/passwd", "bytes": 1}, "zip_data": None}
    (tmp_path / "d" / "index.json").write_text(json.dumps({"shards": [entry]}))
    with pytest.raises(DataError, match=r"raw_data.basename '../../etc/passwd' leads outside"):
        index_shards(tmp_path / "d" / "index.json", "d")


# ------------------------------------------------------------------------------- waiting forever


def test_the_watchdog_counts_from_the_first_step_and_dumps_every_stack(tmp_path: Path) -> None:
    ended: list[int] = []
    watchdog = StallWatchdog(0.3, tmp_path / "stall_rank3.txt", 3, end=ended.append)
    watchdog.start()
    time.sleep(0.8)  # start-up (compilation, teachers) takes as long as it takes
    assert not ended
    for step in range(1, 5):
        watchdog.beat(step)
        time.sleep(0.1)
        watchdog.beat()
    assert not ended
    deadline = time.monotonic() + 5
    while not ended and time.monotonic() < deadline:
        time.sleep(0.05)
    watchdog.stop()
    assert ended == [EXIT_STALLED]
    dump = (tmp_path / "stall_rank3.txt").read_text()
    assert dump.startswith("rank 3: nothing completed for") and "after step 4" in dump
    assert f"Thread 0x{threading.main_thread().ident:016x}" in dump and "File " in dump  # every thread's stack


def _loader_workers(rank: psutil.Process) -> list[psutil.Process]:
    """DataLoader workers: forked, so they carry their training process's command line (unlike
    multiprocessing's resource tracker, also a child)."""
    return [child for child in rank.children() if child.cmdline() == rank.cmdline()]


def _wait_logged(out: Path, steps: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        path = out / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {steps} logged steps: {proc.communicate(timeout=30)[1][-3000:] if proc.poll() is not None else 'timeout'}")


def _gone(pids: list[int], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def test_a_stopped_loader_worker_ends_the_run_with_the_stacks_and_no_orphans(tmp_path: Path, demo_shards: Path) -> None:
    out = tmp_path / "run"
    overrides = tiny_overrides(out, demo_shards, "data.num_workers=1", "train.max_steps=500", "train.stall_timeout_s=3")
    proc = subprocess.Popen(launch_command("python", 1, TRAIN, "--config", str(TINY_CPU), *overrides), env=launcher_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        _wait_logged(out, 2, proc)
        process = psutil.Process(proc.pid)
        workers = _loader_workers(process)
        children = [child.pid for child in process.children(recursive=True)]
        assert len(workers) == 1
        workers[0].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_STALLED, err[-3000:]
    assert time.monotonic() - stopped < 3 + 120
    assert "error: rank 0 stalled: no batch and no optimizer step completed" in err and str(out / "stall_rank0.txt") in err
    assert "Thread" in (out / "stall_rank0.txt").read_text()
    assert _gone(children), "orphaned loader workers"


@pytest.mark.distributed
def test_a_stopped_rank_ends_the_whole_job(tmp_path: Path, demo_shards: Path) -> None:
    """SIGSTOP on one of 2 ranks: the other one's watchdog ends the job, torchrun ends the stopped
    one, and no loader worker is left behind."""
    out = tmp_path / "run"
    overrides = tiny_overrides(out, demo_shards, "strategy.name=fsdp", "train.batch_size_per_rank=6", "data.num_workers=1",
                               "train.max_steps=500", "train.stall_timeout_s=3")
    env = {**launcher_env(tmp_path), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "2"}  # torchrun's grace before SIGKILL
    proc = subprocess.Popen(launch_command("torchrun", 2, TRAIN, "--config", str(TINY_CPU), *overrides), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        _wait_logged(out, 2, proc, timeout=240)
        ranks = [p for p in psutil.Process(proc.pid).children() if str(TRAIN) in " ".join(p.cmdline())]
        children = [c.pid for rank in ranks for c in rank.children(recursive=True)]
        assert len(ranks) == 2 and all(len(_loader_workers(rank)) == 1 for rank in ranks)
        rank_one = next(p for p in ranks if p.environ().get("RANK") == "1")
        rank_one.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and time.monotonic() - stopped < 3 + 120
    assert "rank 0 stalled" in output and (out / "stall_rank0.txt").is_file(), output[-3000:]
    assert _gone([r.pid for r in ranks] + children), "orphaned processes"


def test_collective_timeout_reaches_the_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime

    from dune_scale import distributed

    seen: list[object] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, timeout: seen.append(timeout))
    for timeout_s in (42.0, None):
        distributed.init_distributed("cpu", timeout_s)
    assert seen == [datetime.timedelta(seconds=42), None]


def test_a_stop_signal_while_the_program_imports_exits_with_the_requeue_code(tmp_path: Path, demo_shards: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(launch_command("python", 1, TRAIN, "--config", str(TINY_CPU), *tiny_overrides(out, demo_shards)),
                            env=launcher_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "received SIGTERM" in err and "stopped by a signal during the run check, before training" in err
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written


def test_a_stop_signal_during_loader_construction_stops_before_training(
    tmp_path: Path, demo_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dune_scale.cli.train import train
    from dune_scale.config import load_config
    from dune_scale.data import loader

    build = loader.build_train_loader

    def signalled_meanwhile(*args: object, **kwargs: object) -> object:
        os.kill(os.getpid(), signal.SIGUSR1)  # handled by the training program, not the default (138)
        return build(*args, **kwargs)

    monkeypatch.setattr(loader, "build_train_loader", signalled_meanwhile)
    out = tmp_path / "run"
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        assert train(load_config(TINY_CPU, tiny_overrides(out, demo_shards, "train.max_steps=2"))) is False
    finally:  # a stopped program keeps its handlers (a further signal exits at once): not this test process
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert sorted(p.name for p in out.iterdir()) == []  # no step trained, nothing written


# ------------------------------------------------------------------------------- starting over


def test_a_full_disk_then_lost_checkpoints_never_cost_the_earlier_run(
    tmp_path: Path, demo_shards: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A save that meets a full disk names the folder and the file and keeps the previous
    checkpoint; with every checkpoint then gone, resume=auto refuses to start over; resume=never
    starts over with the earlier files moved aside. Streaming's lock files go with each run."""
    from dune_scale.distributed import DistInfo

    out = tmp_path / "run"
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr("tempfile.tempdir", None)
    (tmp_path / "tmp").mkdir()
    save = torch.save

    def full_disk(obj: object, path: object, *args: object, **kwargs: object) -> None:
        if ".tmp_step_000000004" in str(path) and str(path).endswith("model.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    argv = ["--config", str(TINY_CPU), *tiny_overrides(out, demo_shards, "train.max_steps=4", "checkpoint.every_steps=2")]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    checkpoints = out / "checkpoints"
    assert f"checkpoint {checkpoints / 'step_000000004'} could not be saved: writing the model and optimizer files" in err, err
    assert f"No space left on device: {checkpoints / '.tmp_step_000000004' / 'model.pt'}" in err
    assert "the previous checkpoint step_000000002 stays the latest" in err
    assert sorted(p.name for p in checkpoints.iterdir()) == [LATEST, "step_000000002"]  # the partial save is gone
    assert Checkpointer(checkpoints, 1, 1, DistInfo()).find_latest() == checkpoints / "step_000000002"
    assert not list((tmp_path / "tmp").glob("*filelock"))  # Streaming's lock files left with the run
    monkeypatch.setattr(torch, "save", save)

    shutil.rmtree(checkpoints / "step_000000002")  # every checkpoint gone; metrics say 4 steps were done
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert f"{checkpoints / LATEST} (it names step_000000002)" in err and f"{out / 'metrics.jsonl'} (steps up to 4" in err, err
    assert "checkpoint.resume=never" in err and [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]

    assert train_main([*argv[:-2], "train.max_steps=1", "checkpoint.every_steps=2", "checkpoint.resume=never"]) == 0
    previous = [p for p in out.iterdir() if p.name.startswith("previous_")]
    assert len(previous) == 1 and [r["step"] for r in read_metrics(previous[0] / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (previous[0] / "checkpoints" / LATEST).is_file() and (previous[0] / "config.yaml").is_file()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]


def test_a_local_shard_damaged_in_place_is_named(tmp_path: Path, private_tmp: Path) -> None:
    from conftest_data import DataCfg, batches_of, train_loader
    from dune_scale.data import write_demo_shards
    from dune_scale.data.errors import DataError

    mixture = write_demo_shards(tmp_path / "shards", num_samples_per_dataset=24, val_samples_per_dataset=0)
    shard = tmp_path / "shards" / "synth_mast3r" / "shard.00000.mds"
    data = bytearray(shard.read_bytes())
    data[-200:-100] = bytes(100)  # same size: only the hash can tell
    shard.write_bytes(bytes(data))
    loader = train_loader(DataCfg(str(tmp_path / "shards"), mixture, num_workers=0), image_size=28, batch_size=6, seed=0)
    with pytest.raises(DataError, match=rf"dataset synth_mast3r, shard {shard}: its content does not match the xxh64 hash"):
        batches_of(loader)


def test_too_many_undecodable_images_stop_the_run_naming_the_shards(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dune_scale.data import write_synthetic_dataset

    shards = tmp_path / "shards"
    for name in ("synth_dino2", "synth_mast3r", "synth_multihmr"):
        write_synthetic_dataset(shards, name, 48, image_size=48, corrupt=range(0, 48, 3) if name == "synth_mast3r" else ())
    assert train_main(["--config", str(TINY_CPU), *tiny_overrides(tmp_path / "run", shards, "train.max_steps=6")]) == 2
    err = capsys.readouterr().err
    assert "could not be decoded, more than data.max_corrupt_fraction=0.01 allows; they are in synth_mast3r/shard.00000.mds" in err, err


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("setting, named", [
    ("train.epochs=.nan", "train.epochs: nan is not allowed; it must be a finite number"),
    ("loss.w_cos=-1", "loss.w_cos: -1.0 is not allowed; a loss weight ≥ 0"),
    ("distill.norm_eps=0", "distill.norm_eps: 0.0 is not allowed; a positive floor"),
    ("distill.norm_eps=-1", "distill.norm_eps: -1.0 is not allowed"),
    ("data.download_timeout=0", "data.download_timeout: 0.0 is not allowed; a positive number of seconds"),
    ("data.download_timeout=-1", "data.download_timeout: -1.0 is not allowed"),
    ("train.stall_timeout_s=0", "train.stall_timeout_s: 0.0 is not allowed"),
    ("strategy.collective_timeout_s=-5", "strategy.collective_timeout_s: -5.0 is not allowed"),
    ("data.max_corrupt_fraction=2", "data.max_corrupt_fraction: 2.0 is not allowed; a fraction in [0, 1]"),
])
def test_impossible_settings_are_one_error_before_any_work(setting: str, named: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert train_main(["--config", str(TINY_CPU), *tiny_overrides(out, tmp_path, setting)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {named}") and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_an_index_with_fields_of_the_wrong_types_is_one_error(tmp_path: Path, demo_shards: Path, capsys: pytest.CaptureFixture) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    (shards / "synth_dino2" / "index.json").write_text(json.dumps({"shards": 5}))
    assert train_main(["--config", str(TINY_CPU), *tiny_overrides(tmp_path / "run", shards)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: dataset synth_dino2: {shards / 'synth_dino2' / 'index.json'} is not an MDS index ('shards' is 5, not a list)"
