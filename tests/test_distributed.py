"""Strategies on 2 CPU ranks (gloo, 127.0.0.1): train (accumulating micro-batches), validate,
checkpoint, resume, export, and agree with `single`.

Every sharded run is a real launcher (`torchrun` / `deepspeed`) in a subprocess with a timeout; the
`single` reference trains in the test process. In fp32 with the same global batch and teacher
dropping off, the strategies compute the same losses; resumed runs continue bitwise as if never
stopped. Clipping binds (per parameter, the default), so sharded strategies also have to clip
shards by the norm of the whole parameter to agree.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_eval import val_sets
from test_hardening import assert_planted_payload_refused

from conftest import REPO, TINY_CPU, global_batches, launch_command, launcher_env, tiny_overrides
from dune_scale.cli.export import main as export_main
from dune_scale.cli.train import train
from dune_scale.config import load_config, student_subdir
from dune_scale.engine.export import read_student
from dune_scale.telemetry.metrics import read_metrics

pytestmark = pytest.mark.distributed
TRAIN = REPO / "launch" / "train.py"
# launch/train.py whose ranks each validate their share of test_eval's held-out sets.
TRAIN_WITH_VAL = REPO / "tests" / "workers" / "train_with_val.py"
LAUNCHER = {"single": (None, 1), "fsdp": ("torchrun", 2), "deepspeed": ("deepspeed", 2)}
# Low enough that the default per-parameter clipping binds on most parameters of the tiny student, so
# the comparison with `single` also checks that shards/partitions are clipped by full-parameter norms.
CLIP = 0.05
# Two students on one teacher pass (issue 14) in the strategy runs: `main` is checked in full against
# `single`, `small` (shallower, its own learning rate) for its losses and its exported weights.
STUDENTS = "students=[{name: main}, {name: small, student: {depth: 1}, optim: {base_lr: 1.0e-3}}]"


def run_training(strategy: str, out: Path, shards: Path, *extra: str, stage: int = 2, timeout: int = 300,
                 with_val: bool = False, student: str = "") -> list[dict]:
    """A sharded strategy through its launcher; `single`, the reference, in this process (a launch
    costs seconds of imports and proves nothing these comparisons need). ``with_val``: with
    test_eval's held-out sets, each rank validating its share. Returns the records of ``student``
    (one of ``students:``; "" without the list)."""
    launcher, nproc = LAUNCHER[strategy]
    overrides = tiny_overrides(out, shards, f"strategy.name={strategy}", f"strategy.zero_stage={stage}",
                               f"train.batch_size_per_rank={24 // nproc}", "distill.teacher_drop=none",
                               "run.log_samples=true", f"optim.grad_clip={CLIP}", *extra)
    if strategy == "single":
        assert train(load_config(TINY_CPU, overrides), val=val_sets() if with_val else None)
        return read_metrics(out / student_subdir(student) / "metrics.jsonl")
    command = launch_command(launcher, nproc, TRAIN_WITH_VAL if with_val else TRAIN, "--config", str(TINY_CPU), *overrides)
    result = subprocess.run(command, env=launcher_env(out.parent), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, f"{strategy} failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return read_metrics(out / student_subdir(student) / "metrics.jsonl")


def training(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("kind", "train") == "train"]


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in training(records)]


@pytest.fixture(scope="module")
def knn_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """eval.knn_train / eval.knn_val overrides: tiny labelled image folders for the k-NN probe."""
    from test_knn import write_labelled_set

    root = tmp_path_factory.mktemp("knn")
    return f"eval.knn_train={write_labelled_set(root / 'train', 4, seed=1)}", f"eval.knn_val={write_labelled_set(root / 'val', 2, seed=2)}"


def accumulating(strategy: str) -> tuple[str, str]:
    """The global batch of 24 as 2 micro-batches (2 ranks × 6 × 2 == 1 rank × 12 × 2: same loader
    batches, same statistics), so that every strategy run also checks accumulation under sharding."""
    return "train.grad_accum_steps=2", f"train.batch_size_per_rank={12 // LAUNCHER[strategy][1]}"


@pytest.fixture(scope="module")
def probe_sets(tmp_path_factory: pytest.TempPathFactory) -> str:
    """eval.probes: linear segmentation on the encoder and depth on a projector (test_probes' sets)."""
    from test_probes import write_ade20k, write_nyu

    root = tmp_path_factory.mktemp("probes")
    ade, nyu = write_ade20k(root / "ade", (6, 3)), write_nyu(root / "nyu", (6, 3))
    return (f"eval.probes=[{{kind: linear-seg, data: {ade}, num_classes: 3, epochs: 3}}, "
            f"{{kind: depth, data: {nyu}, epochs: 3, features: 'projector:dino2reg_vitlarge_14'}}]")


def probed(knn_sets: tuple[str, str], probes: str) -> tuple[str, ...]:
    """Validation and the k-NN probe (the encoder called on its own) every 2 steps, the probes of
    eval.probes (spread over the ranks; no eval.probe_every_steps) at the end only."""
    return "eval.every_steps=2", "eval.knn_every_steps=2", *knn_sets, probes


@pytest.fixture(scope="module")
def single_run(
    tmp_path_factory: pytest.TempPathFactory, demo_shards: Path, knn_sets: tuple[str, str], probe_sets: str
) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("single") / "run"
    return out, run_training("single", out, demo_shards, "train.max_steps=5", *accumulating("single"), *probed(knn_sets, probe_sets), STUDENTS,
                             with_val=True, student="main")


# ZeRO-1 shares DeepSpeed's stage-1/2 optimizer with ZeRO-2. FSDP and ZeRO-2 checkpoints are resumed
# (bitwise, after a stop signal) in test_preemption, so only ZeRO-3 resumes here, to hold the suite's time.
# FSDP saves asynchronously (both students' DCP writes in flight at once).
@pytest.mark.parametrize("strategy, stage, resume", [("fsdp", 0, False), ("deepspeed", 2, False), ("deepspeed", 3, True)])
def test_strategy_trains_checkpoints_resumes_and_matches_single(
    strategy: str, stage: int, resume: bool, tmp_path: Path, demo_shards: Path, single_run: tuple[Path, list[dict]],
    knn_sets: tuple[str, str], probe_sets: str
) -> None:
    single_dir, single = single_run
    out = tmp_path / "run"
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    first = run_training(strategy, out, demo_shards, "train.max_steps=5", "checkpoint.every_steps=3", *accumulating(strategy),
                         *probed(knn_sets, probe_sets), STUDENTS, f"checkpoint.async_save={strategy == 'fsdp'}", stage=stage or 2,
                         with_val=True, student="main")
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shm_before  # DeepSpeed's segments are freed
    assert global_batches(out) == global_batches(single_dir)  # same samples per global batch
    assert [r["samples_seen"] for r in training(first)] == [24 * step for step in range(1, 6)]
    for mine, reference in zip(losses(first), losses(single)):
        assert mine == pytest.approx(reference, rel=1e-4)
    # Per-group gradient norms of sharded or partitioned gradients are the single run's; ZeRO-1/2 do
    # not expose their gradients per parameter, and say so (None, not a wrong number).
    for mine, reference in zip(training(first), training(single)):
        for key in [k for k in reference if k.startswith(("grad_norm_", "loss_"))]:
            if key.startswith("grad_norm_") and stage == 2:
                assert mine[key] is None, key
            else:
                assert mine[key] == pytest.approx(reference[key], rel=1e-3), key
    # Each rank validated half the images: the reduced numbers equal one process validating all of them.
    val, single_val = [r for r in first if r["kind"] == "val"], [r for r in single if r["kind"] == "val"]
    assert [(r["step"], r["dataset"], r["images"]) for r in val] == [(r["step"], r["dataset"], r["images"]) for r in single_val] and val
    for mine, reference in zip(val, single_val):
        assert mine["loss"] == pytest.approx(reference["loss"], rel=1e-4)
        assert mine["loss_mast3r_vitlarge_16_sl1"] == pytest.approx(reference["loss_mast3r_vitlarge_16_sl1"], rel=1e-4)
    # The k-NN probe calls the sharded encoder on its own. Early in training the class tokens of
    # different images nearly tie, so float-level differences between sharded and single sums may
    # flip a neighbour (one or two of the 8 queries); once the features separate, the answer is the same.
    knn, single_knn = ([(r["step"], r["top1"], r["top5"]) for r in records if r["kind"] == "knn"] for records in (first, single))
    assert [r[0] for r in knn] == [r[0] for r in single_knn] == [2, 4, 5]
    assert all(abs(a - b) <= 0.25 for mine, reference in zip(knn, single_knn) for a, b in zip(mine[1:], reference[1:]))
    assert knn[-1] == single_knn[-1]
    # The dense probes, each rank extracting and training on its stride of the images, train the head
    # one process trains (up to float sums: a pixel's argmax may flip).
    for kind, keys in (("linear-seg", ("miou", "pixel_accuracy")), ("depth", ("rmse", "abs_rel", "delta1"))):
        mine, reference = ([r for r in records if r["kind"] == kind] for records in (first, single))
        assert [(r["step"], r["images"], r["train_images"]) for r in mine] == [(5, 3, 6)]
        assert [(r["step"], r["images"], r["train_images"]) for r in reference] == [(5, 3, 6)]
        for key in keys:
            assert mine[0][key] == pytest.approx(reference[0][key], abs=0.02), (kind, key)
    # The second student trained on the same teacher pass, as under `single`.
    small, single_small = (read_metrics(folder / "students" / "small" / "metrics.jsonl") for folder in (out, single_dir))
    assert losses(small) == pytest.approx(losses(single_small), rel=1e-4) and losses(small) != losses(first)
    # The full student weights are exported whatever the sharding (ZeRO-3 and FSDP gather them).
    for name in ("main", "small"):
        exported = load_file(str(out / "students" / name / "student.safetensors"))
        reference_weights = load_file(str(single_dir / "students" / name / "student.safetensors"))
        assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in reference_weights.items()}
        # ... and the checkpoint is read without its world size (this process has no process group).
        weights = read_student(out / "checkpoints" / "step_000000005", name)
        assert set(weights.state) == set(exported) and all(torch.equal(weights.state[k], v) for k, v in exported.items())
    assert export_main([str(out), "--student", "small", "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    # A payload planted in the checkpoint (its manifest rewritten to match) never runs.
    planted = {0: "fsdp/.metadata", 2: "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
               3: "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"}[stage]
    assert_planted_payload_refused(out / "checkpoints" / "step_000000005", f"students/main/{planted}", tmp_path, "--student", "main")
    if not resume:
        return
    resumed = run_training(strategy, out, demo_shards, "train.max_steps=7", "checkpoint.every_steps=3", *accumulating(strategy),
                           STUDENTS, stage=stage or 2, student="main")
    assert [r["step"] for r in training(resumed)] == list(range(1, 8))
    assert losses(resumed)[:5] == losses(first)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000000007"


# teachers.shard=world (features equal the replicated ones): test_multinode's worker launch, with =node.


def test_unsupported_launch_is_named_before_any_work(tmp_path: Path, demo_shards: Path) -> None:
    out = tmp_path / "run"
    command = launch_command("torchrun", 2, TRAIN, "--config", str(TINY_CPU), *tiny_overrides(out, demo_shards, "strategy.name=single"))
    result = subprocess.run(command, env=launcher_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode != 0
    assert "strategy.name=single runs one process, but 2 were launched" in result.stderr
    assert not (out / "checkpoints").exists()


def test_fsdp_in_bf16_keeps_fp32_parameters_like_single(tmp_path: Path, demo_shards: Path) -> None:
    """bf16 comes from autocast around fp32 parameters under FSDP too (strategy.fsdp_param_dtype=fp32):
    the first step's forward is then the one `single` computes, to float noise; bf16 compute copies of
    the parameters (the option) move it by ~6e-6 here."""
    bf16 = ("train.precision=bf16", "train.max_steps=3")
    single = losses(run_training("single", tmp_path / "single", demo_shards, *bf16))
    fsdp = losses(run_training("fsdp", tmp_path / "fsdp", demo_shards, *bf16))
    assert fsdp[0] == pytest.approx(single[0], rel=1e-6)
    assert fsdp == pytest.approx(single, rel=1e-4)


def test_nonfinite_teacher_loss_on_two_ranks_skips_then_stops_every_rank(tmp_path: Path, demo_shards: Path) -> None:
    """A teacher whose features are NaN (a corrupt checkpoint): both ranks skip the same updates,
    save only finite states, and stop together once the consecutive-skip limit is passed."""
    from dune_scale.engine.checkpointer import is_complete
    from dune_scale.teachers import build_teacher

    teacher = build_teacher("dino2reg_vitlarge_14", embed_dim=64, depth=2, num_heads=4, img_size=70)
    weights = teacher.state_dict()
    weights["norm.weight"] = torch.full_like(weights["norm.weight"], float("nan"))
    torch.save(weights, tmp_path / "nan_teacher.pth")
    out = tmp_path / "run"
    overrides = tiny_overrides(out, demo_shards, "strategy.name=fsdp", "train.batch_size_per_rank=6", "train.max_steps=4",
                               "checkpoint.every_steps=1", "train.nonfinite=skip", "train.max_nonfinite_skips=1",
                               f"teachers.models.0.checkpoint={tmp_path / 'nan_teacher.pth'}", "teachers.models.0.random_init=false")
    command = launch_command("torchrun", 2, TRAIN, "--config", str(TINY_CPU), *overrides)
    result = subprocess.run(command, env=launcher_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode != 0
    assert "step 1: the loss of teacher dino2reg_vitlarge_14 is not finite; update skipped" in result.stderr
    assert result.stderr.count("step 2: the loss of teacher dino2reg_vitlarge_14 is not finite; that is 2 consecutive") == 2
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000000001"]
    assert is_complete(out / "checkpoints" / "step_000000001")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(out / "checkpoints" / "step_000000001" / "fsdp", tmp_path / "step1.pt")
    saved = torch.load(tmp_path / "step1.pt", weights_only=True)["model"]
    assert saved and all(torch.isfinite(v).all() for v in saved.values())
