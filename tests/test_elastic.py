"""Elastic node counts: a run resumed on another number of ranks keeps the global batch (more or
fewer images per rank), trains on the same samples as an uninterrupted run and continues its
losses. FSDP2 from 2 simulated nodes × 2 ranks under HSDP (``strategy.fsdp_shard=node``) → 1 rank
→ 3 ranks; DeepSpeed ZeRO-2 from 2 ranks → 1 → 3 (as ZeRO-1) and ZeRO-3 (hierarchical, hpZ) from 4 → 3,
through universal checkpoints converted on resume (or ahead of time)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_multinode import TwoNodes, private_mounts  # noqa: F401 (a fixture)

from conftest import REPO, TINY_CPU, global_batches, launch_command, launcher_env, tiny_overrides
from dune_scale.cli.common import EXIT_USER_ERROR
from dune_scale.cli.convert_checkpoint import main as convert_checkpoint
from dune_scale.cli.train import train
from dune_scale.config import load_config
from dune_scale.distributed import DistInfo
from dune_scale.engine.checkpointer import verify
from dune_scale.engine.universal import UNIVERSAL_FOLDER, saved_model_state
from dune_scale.telemetry.metrics import read_metrics

pytestmark = pytest.mark.distributed
TRAIN = REPO / "launch" / "train.py"
GLOBAL_BATCH = 12
STEPS_PER_LEG = 2
# The tolerance of the other strategy-equivalence tests; measured here: ≤ 1e-7 for every chain.
LOSS_RTOL = 1e-4


def chain_overrides(out: Path, shards: Path, ranks: int, leg: int, *extra: str) -> list[str]:
    """tiny_cpu with one global batch split over ``ranks``; the leg's last step; a checkpoint at
    every leg's end, all kept. Streaming's canonical nodes are fixed so the sample order does not
    depend on the rank count. The clipping limit binds on most parameters, so sharded gradients
    must be clipped by their full parameters' norms."""
    return tiny_overrides(out, shards, f"train.batch_size_per_rank={GLOBAL_BATCH // ranks}", f"train.max_steps={leg * STEPS_PER_LEG}",
                          f"checkpoint.every_steps={STEPS_PER_LEG}", "checkpoint.keep_last=5", "data.num_canonical_nodes=6",
                          "distill.teacher_drop=none", "run.log_samples=true", "optim.grad_clip=0.05", *extra)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, demo_shards: Path) -> Path:
    """The reference: one process, the whole global batch, all legs' steps in one go."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert train(load_config(TINY_CPU, chain_overrides(out, demo_shards, 1, 3)))
    return out


def resume_on(ranks: int, out: Path, shards: Path, leg: int, *extra: str) -> None:
    command = launch_command("torchrun", ranks, TRAIN, "--config", str(TINY_CPU), *chain_overrides(out, shards, ranks, leg, *extra))
    result = subprocess.run(command, env=launcher_env(out.parent), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def assert_continues(out: Path, reference: Path, steps: int = 3 * STEPS_PER_LEG) -> None:
    """Every step's global batch holds the reference's samples; losses and final weights agree."""
    assert global_batches(out) == global_batches(reference)[:steps]
    assert losses(out) == pytest.approx(losses(reference)[:steps], rel=LOSS_RTOL)
    weights = load_file(str(out / "student.safetensors"))
    reference_weights = torch.load(checkpoint(reference, steps) / "model.pt", weights_only=True)  # strategy single
    for name, value in reference_weights.items():
        torch.testing.assert_close(without_key_bias(name, weights[name]), without_key_bias(name, value), rtol=1e-4, atol=1e-6, msg=name)


def without_key_bias(name: str, value: torch.Tensor) -> torch.Tensor:
    """The attention key bias cannot change any output (softmax ignores a constant per query), so
    its gradient is float noise that Adam turns into lr-sized steps: it is left out of comparisons."""
    if not name.endswith("attn.qkv.bias"):
        return value
    query, _, val = value.chunk(3)
    return torch.cat([query, val])


def checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:09d}"


def test_fsdp_resumes_from_two_hsdp_nodes_on_one_rank_then_three(
    tmp_path: Path, demo_shards: Path, uninterrupted: Path, private_mounts: None  # noqa: F811
) -> None:
    out = tmp_path / "run"
    fsdp = ("strategy.name=fsdp",)
    with TwoNodes(tmp_path, 2, chain_overrides(out, demo_shards, 4, 1, *fsdp, "strategy.fsdp_shard=node")) as job:
        for code, output in job.wait():
            assert code == 0, output[-4000:]
    # HSDP: each weight was cut in halves (the node's two ranks), not in quarters over the world.
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint(out, 2) / "fsdp")).read_metadata().state_dict_metadata
    assert len(metadata["model.encoder.blocks.0.mlp.fc1.weight"].chunks) == 2
    resume_on(1, out, demo_shards, 2, *fsdp)
    resume_on(3, out, demo_shards, 3, *fsdp)
    assert_continues(out, uninterrupted)


def zero_partition_state(zero_folder: Path, key: str) -> dict[str, torch.Tensor]:
    """Each parameter's ``key`` state (fp32 weight, exp_avg, exp_avg_sq), flat, pieced together
    from the ranks' ZeRO partitions: under ZeRO-1/2 by DeepSpeed's recorded fragment addresses,
    under ZeRO-3 by its split of every parameter into equal (padded) pieces, one per rank."""
    files = sorted(zero_folder.glob("*optim_states.pt"), key=lambda path: int(path.name.split("_rank_")[1].split("_")[0]))
    states = [torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"] for path in files]
    pieces: dict[str, list[torch.Tensor]] = {}
    if states[0]["zero_stage"] == 3:
        for group, params in enumerate(saved_model_state(zero_folder)["param_shapes"]):
            flats = [state["fp32_flat_groups"][group] if key == "fp32" else state["optimizer_state_dict"]["state"][group][key]
                     for state in states]
            offset = 0
            for name, shape in params.items():
                piece = math.ceil(math.prod(shape) / len(states))
                pieces[name] = [flat.narrow(0, offset, piece) for flat in flats]
                offset += piece
        shapes = {name: shape for params in saved_model_state(zero_folder)["param_shapes"] for name, shape in params.items()}
        return {name: torch.cat(parts)[: math.prod(shapes[name])] for name, parts in pieces.items()}
    for state in states:
        for group, mapping in enumerate(state["param_slice_mappings"]):
            flat = state["single_partition_of_fp32_groups"][group] if key == "fp32" else state["base_optimizer_state"]["state"][group][key]
            for name, address in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, address.start, address.numel))
    return {name: torch.cat(parts) for name, parts in pieces.items()}


def assert_converted_by_value(folder: Path) -> None:
    """The universal checkpoint in ``folder`` holds the ZeRO files' weights, Adam moments, step
    and teacher-norm statistics exactly; the ZeRO files and the manifest are as they were."""
    assert verify(folder, DistInfo()) == []
    zero, universal = folder / "deepspeed", folder / UNIVERSAL_FOLDER / "deepspeed"
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        for name, value in zero_partition_state(zero, key).items():
            converted = torch.load(universal / "zero" / name / f"{key}.pt", weights_only=False)
            converted = converted["param"] if isinstance(converted, dict) else converted  # ZeRO-3 saves bare tensors
            assert torch.equal(converted.flatten(), value), (folder.name, key, name)
    optimizer = torch.load(universal / "zero" / "optimizer_state.pt", weights_only=False)
    if optimizer["zero_stage"] == 3:  # one step count per partition
        counts = [state["step"] for state in optimizer["optimizer_state_dict"]["state"].values()]
    else:  # one per parameter
        counts = [torch.load(path, weights_only=False) for path in (universal / "zero").glob("*/step.pt")]
    assert counts and all(count == int(folder.name.split("_")[1]) for count in counts)
    saved, converted = saved_model_state(zero)["module"], saved_model_state(universal)["module"]
    norms = [name for name in saved if name.startswith("teacher_norms.")]
    assert norms and all(torch.equal(converted[name], saved[name]) for name in norms)


def test_zero2_resumes_on_one_rank_then_on_three_as_zero1_through_universal_checkpoints(
    tmp_path: Path, demo_shards: Path, uninterrupted: Path
) -> None:
    out = tmp_path / "run"
    zero2 = ("strategy.name=deepspeed", "strategy.zero_stage=2")
    resume_on(2, out, demo_shards, 1, *zero2)
    resume_on(1, out, demo_shards, 2, *zero2)  # step 2's ZeRO files converted on resume
    assert convert_checkpoint([str(out), "--workers", "1"]) == 0  # step 4's ahead of time (the latest)
    assert convert_checkpoint([str(uninterrupted)]) == EXIT_USER_ERROR  # not DeepSpeed's: nothing to convert
    resume_on(3, out, demo_shards, 3, "strategy.name=deepspeed", "strategy.zero_stage=1")  # ZeRO-1 reads ZeRO-2's universal files
    assert_continues(out, uninterrupted)
    assert_converted_by_value(checkpoint(out, 2))  # written on 2 ranks
    assert_converted_by_value(checkpoint(out, 4))  # written on 1


def test_zero3_with_hierarchical_partitions_resumes_on_other_ranks_through_a_universal_checkpoint(
    tmp_path: Path, demo_shards: Path, uninterrupted: Path
) -> None:
    """ZeRO-3 with ZeRO++'s hierarchical partitioning (a secondary weight copy per "node" of 2 ranks,
    set through the user JSON) trains like one process; its checkpoint (every parameter split in
    padded pieces, one step count per partition) resumes on 3 ranks without it."""
    out = tmp_path / "run"
    zero3 = ("strategy.name=deepspeed", "strategy.zero_stage=3")
    hpz = tmp_path / "hpz.json"
    hpz.write_text(json.dumps({"zero_optimization": {"zero_hpz_partition_size": 2}}))
    resume_on(4, out, demo_shards, 1, *zero3, f"strategy.deepspeed_config={hpz}")
    resume_on(3, out, demo_shards, 2, *zero3)
    assert_continues(out, uninterrupted, steps=2 * STEPS_PER_LEG)
    assert_converted_by_value(checkpoint(out, 2))
