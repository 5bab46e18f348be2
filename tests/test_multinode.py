"""Two "nodes" on one machine: separate torchrun invocations joined by a c10d rendezvous on
127.0.0.1, each in its own mount namespace with what a real node has to itself: a private /dev/shm
(a tmpfs: Streaming's node-local shared memory), its own TMPDIR (Streaming's lock files) and its own
local disk for the shard cache (bind-mounted on the same ``data.local_cache`` path, as node-local
disks are). The shards come from the test S3 server, so each node really downloads into its cache.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_CPU, free_port, global_batches, launch_command, launcher_env, tiny_overrides
from conftest_data import SeaweedS3
from dune_scale.data.synthetic import DEMO_DATASETS
from dune_scale.engine.preemption import EXIT_PREEMPTED
from dune_scale.telemetry.metrics import read_metrics
from dune_scale.telemetry.scale_model import Links, ModelSizes, teacher_collectives

pytestmark = pytest.mark.distributed
TRAIN = REPO / "launch" / "train.py"
STEPS = 8
GLOBAL_BATCH = 24
# Inside the node's namespace: a private /dev/shm, the node's disk on the shared cache path, then torchrun.
NODE_SHELL = 'mount -t tmpfs tmpfs /dev/shm && mount --bind "$1" "$2" && shift 2 && exec "$@"'


@pytest.fixture(scope="module")
def private_mounts() -> None:
    """The simulated nodes need ``unshare --mount`` (root): without it this module cannot prove
    anything, so it fails rather than skips."""
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"the multi-node tests need 'unshare --mount' with a tmpfs on /dev/shm (run as root): {probe.stderr.strip()}")


@pytest.fixture(scope="module")
def s3_shards(s3_env: SeaweedS3, demo_shards: Path) -> str:
    """The demo shards uploaded as they are (MDS folders) to the test S3 server."""
    client = s3_env.client()
    for path in demo_shards.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), s3_env.bucket, f"mds/{path.relative_to(demo_shards)}")
    return f"s3://{s3_env.bucket}/mds"


def overrides(out: Path, shards: str, ranks: int, *extra: str) -> list[str]:
    """tiny_cpu with the global batch of every run here; ``shards`` a folder or an s3:// URL."""
    return tiny_overrides(out, Path("unused"), f"data.remote_root={shards}", f"train.batch_size_per_rank={GLOBAL_BATCH // ranks}",
                          f"train.max_steps={STEPS}", "distill.teacher_drop=none", "run.log_samples=true", *extra)


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory, demo_shards: Path) -> Path:
    """The reference: one process (this one) reading the same shards in place, the same global batch."""
    from dune_scale.cli.train import train
    from dune_scale.config import load_config

    out = tmp_path_factory.mktemp("one_node") / "run"
    assert train(load_config(TINY_CPU, overrides(out, str(demo_shards), 1)))
    return out


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class TwoNodes:
    """Two torchrun "nodes" (``ranks_per_node`` ranks each) of one job; node 0 starts first and
    hosts the rendezvous store, as the rendezvous endpoint's host does on a cluster. A context
    manager: whatever is still running at exit (a failed test) is killed by PID."""

    def __init__(self, tmp: Path, ranks_per_node: int, args: list[str]) -> None:
        self.tmp, self.port = tmp, free_port()
        self.cache = tmp / "local_cache"  # the one path in the config; each node mounts its own disk there
        self.cache.mkdir(parents=True, exist_ok=True)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", str(ranks_per_node),
                    "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{self.port}", "--rdzv_id", "dune-test",
                    str(TRAIN), "--config", str(TINY_CPU), *args, f"data.local_cache={self.cache}"]
        self.nodes: list[subprocess.Popen] = []
        for node in range(2):
            disk = self.node_dir(node) / "disk"
            disk.mkdir(parents=True, exist_ok=True)
            env = launcher_env(self.node_dir(node))  # TMPDIR: the node's own
            self.nodes.append(subprocess.Popen(
                ["unshare", "--mount", "sh", "-c", NODE_SHELL, "node", str(disk), str(self.cache), *torchrun],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
            ))
            deadline = time.monotonic() + 120
            while node == 0 and not listening(self.port) and self.nodes[0].poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)

    def node_dir(self, node: int) -> Path:
        return self.tmp / f"node{node}"

    def ranks(self, node: int) -> list[int]:
        """PIDs of the node's training processes (children of its torchrun, which ``exec`` made
        the node's top process)."""
        import psutil

        return [p.pid for p in psutil.Process(self.nodes[node].pid).children() if str(TRAIN) in " ".join(p.cmdline())]

    def wait(self, timeout: float = 300) -> list[tuple[int, str]]:
        """(exit code, output) per node."""
        outputs = [proc.communicate(timeout=timeout)[0] for proc in self.nodes]
        return [(proc.returncode, output) for proc, output in zip(self.nodes, outputs)]

    def __enter__(self) -> TwoNodes:
        return self

    def __exit__(self, *exc: object) -> None:
        for node, proc in enumerate(self.nodes):
            if proc.poll() is None:
                for pid in self.ranks(node):
                    os.kill(pid, signal.SIGKILL)
                proc.kill()
                proc.wait()


def cached_shards(disk: Path) -> list[Path]:
    return [p for name, _ in DEMO_DATASETS for p in (disk / name).glob("shard.*.mds")]


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(read_metrics(path)) if path.is_file() else 0


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def test_two_nodes_of_two_ranks_with_node_sharded_teachers_train_like_one_node(
    tmp_path: Path, s3_shards: str, s3_env: SeaweedS3, one_node: Path, private_mounts: None
) -> None:
    out = tmp_path / "run"
    with TwoNodes(tmp_path, 2, overrides(out, s3_shards, 4, "strategy.name=fsdp", "teachers.shard=node", "train.max_steps=3",
                                         f"data.s3_endpoint_url={s3_env.endpoint}")) as job:
        for code, output in job.wait():
            assert code == 0, output[-4000:]
    assert global_batches(out) == global_batches(one_node)[:3]
    assert losses(out) == pytest.approx(losses(one_node)[:3], rel=1e-4)


def test_sigterm_to_one_node_stops_the_job_with_a_complete_checkpoint_then_it_resumes(
    tmp_path: Path, s3_shards: str, s3_env: SeaweedS3, one_node: Path, private_mounts: None
) -> None:
    """DeepSpeed under torchrun, one rank per node (FSDP across nodes: the 2 × 2 test above): each
    node downloads into its own disk, a stop signal to one node stops both with a checkpoint, and
    the job started again on fresh nodes trains on the global batches of one node."""
    out = tmp_path / "run"
    args = overrides(out, s3_shards, 2, "strategy.name=deepspeed", "checkpoint.every_steps=4", f"data.s3_endpoint_url={s3_env.endpoint}")
    with TwoNodes(tmp_path, 1, args) as job:
        deadline = time.monotonic() + 300
        while logged_steps(out) < 2 and all(p.poll() is None for p in job.nodes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert logged_steps(out) >= 2 and all(p.poll() is None for p in job.nodes), "the job did not reach step 2"
        # Streaming's node-local shared memory: the same segment names on both nodes, each in the node's
        # own /dev/shm (on one shared /dev/shm they would collide), none in the machine's.
        shm = [Path(f"/proc/{job.ranks(node)[0]}/root/dev/shm") for node in range(2)]
        devices = {os.stat(path).st_dev for path in shm} | {os.stat("/dev/shm").st_dev}
        names = [sorted(os.listdir(path)) for path in shm]
        assert len(devices) == 3 and names[0] == names[1] and any(n.endswith("_locals") for n in names[0]), names
        job.nodes[1].send_signal(signal.SIGTERM)  # node 1's torchrun: it forwards the signal to its rank
        (code0, output0), (code1, output1) = job.wait()
    assert f"exitcode  : {EXIT_PREEMPTED}" in output0, output0[-4000:]  # node 0 learned of the stop and saved
    assert "closing signal SIGTERM" in output1 and code1 != 0, output1[-4000:]
    records = read_metrics(out / "metrics.jsonl")
    stopped_at = records[-1]["step"]
    assert 2 <= stopped_at < STEPS
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert latest.name == f"step_{stopped_at:09d}" and (latest / "COMPLETE").is_file()
    # Each node downloaded into its own disk; nothing landed on the shared path itself.
    assert cached_shards(job.node_dir(0) / "disk") and cached_shards(job.node_dir(1) / "disk")
    assert not any(job.cache.iterdir())

    with TwoNodes(tmp_path / "again", 1, args) as resumed:  # fresh nodes: empty caches
        for code, output in resumed.wait():
            assert code == 0, output[-4000:]
    assert global_batches(out) == global_batches(one_node)
    assert losses(out) == pytest.approx(losses(one_node), rel=1e-4)


def test_node_sharded_teachers_on_two_by_two_ranks_give_the_replicated_features(tmp_path: Path) -> None:
    """teachers.shard=node on the simulated 2 × 2 layout: each weight is split in halves within a
    node (not in quarters over the world, as teachers.shard=world does), both nodes hold the same
    halves, features are unchanged, and each rank sends what the scale model predicts (fp32 here;
    FSDP pads shards a little)."""
    worker = REPO / "tests" / "workers" / "teacher_shard.py"
    result = subprocess.run(launch_command("torchrun", 4, worker, str(tmp_path), "world", "node"), env=launcher_env(tmp_path),
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(4):
        diffs = torch.load(tmp_path / f"diff_world_{rank}.pt", weights_only=True)
        assert diffs and max(diffs.values()) <= 1e-5, diffs
    assert [torch.load(tmp_path / f"layout_world_{rank}.pt", weights_only=True)["fraction"] for rank in range(4)] == [0.25] * 4
    layouts = [torch.load(tmp_path / f"layout_node_{rank}.pt", weights_only=True) for rank in range(4)]
    assert [layout["fraction"] for layout in layouts] == [0.5] * 4
    assert torch.equal(layouts[0]["shard"], layouts[2]["shard"]) and torch.equal(layouts[1]["shard"], layouts[3]["shard"])
    assert not torch.equal(layouts[0]["shard"], layouts[1]["shard"])
    sizes = ModelSizes(student_params=0, student_blocks=1, teacher_params=layouts[0]["teacher_params"],
                       teacher_blocks=layouts[0]["teacher_blocks"], norm_features=())
    predicted, = teacher_collectives("node", sizes, 4, Links(gpus_per_node=2), bytes_per_param=4)
    for rank in range(4):
        diffs = torch.load(tmp_path / f"diff_node_{rank}.pt", weights_only=True)
        assert diffs and max(diffs.values()) <= 1e-5, diffs
        assert layouts[rank]["all_gather_bytes"] == pytest.approx(predicted.bytes_per_rank, rel=0.02)
