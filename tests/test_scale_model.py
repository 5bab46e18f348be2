"""The scale model's arithmetic on a case small enough to compute by hand, and its model sizes
against the models the project builds."""

from __future__ import annotations

import pytest

from conftest import TINY_CPU
from dune_scale.cli.scale_model import main, model_sizes
from dune_scale.config import load_config
from dune_scale.engine.compose import build_student
from dune_scale.teachers import build_teacher, get_teacher_spec
from dune_scale.telemetry.scale_model import (
    Collective,
    ComputeProfile,
    Links,
    ModelSizes,
    Storage,
    checkpoint_seconds,
    data_bytes_per_s_per_node,
    exposed_ms,
    norm_statistics_collective,
    predict_step,
    student_collectives,
    teacher_collectives,
)

# 1 MB/s over InfiniBand, 450 GB/s over NVLink, 5 µs per IB hop, 1 µs per NVLink hop, no losses.
LINKS = Links(ib_gbits_per_s=8e-3, efficiency=1.0)
SIZES = ModelSizes(student_params=1000, student_blocks=2, teacher_params=10_000, teacher_blocks=4, norm_features=(8,))
COMPUTE = ComputeProfile(batch_per_gpu=10, step_ms=100.0, teacher_forward_ms=10.0, student_forward_ms=1.0, backward_ms=2.0)


def test_sixteen_gpus_on_two_nodes_by_hand() -> None:
    # FSDP: fp32 gathers and reduce-scatter 4·1000·15/16 B each (bf16 gathers: half); two pieces of 15 ring hops.
    fsdp = student_collectives("fsdp", SIZES, 16, LINKS)
    assert [c.bytes_per_rank for c in fsdp] == [3750, 3750, 3750]
    assert [c.bytes_per_rank for c in student_collectives("fsdp_bf16", SIZES, 16, LINKS)] == [1875, 1875, 3750]
    assert fsdp[0].seconds(LINKS) == pytest.approx(3750 / 1e6 + 2 * 15 * 5e-6)
    # HSDP: gathers and reduce-scatter over the node's 8 ranks on NVLink (4·1000·7/8 B), then each
    # rank's 1/8 gradient shard (500 B) all-reduced between the 2 nodes over IB (2·500·1/2 B, one ring hop).
    hsdp = student_collectives("hsdp", SIZES, 16, LINKS)
    assert [(c.bytes_per_rank, c.ranks, c.spans_nodes) for c in hsdp] == [(3500, 8, False)] * 3 + [(500, 2, True)]
    assert hsdp[3].seconds(LINKS) == pytest.approx(500 / 1e6 + 2 * 1 * 5e-6)
    # Teachers in bf16: world-sharded over 16 ranks across IB, node-sharded over 8 on NVLink.
    world, = teacher_collectives("world", SIZES, 16, LINKS)
    node, = teacher_collectives("node", SIZES, 16, LINKS)
    assert (world.bytes_per_rank, world.spans_nodes) == (18_750, True)
    assert world.seconds(LINKS) == pytest.approx(18_750 / 1e6 + 4 * 15 * 5e-6)
    assert (node.bytes_per_rank, node.ranks, node.spans_nodes) == (17_500, 8, False)
    assert node.seconds(LINKS) == pytest.approx(17_500 / 450e9 + 4 * 7 * 1e-6)
    assert teacher_collectives("none", SIZES, 16, LINKS) == []
    # Statistics: count + mean + M2 in fp64 (8 + 64 + 64 B), all-reduced (×2·15/16), three tree rounds of 2·4 levels.
    stats = norm_statistics_collective(SIZES, 16, LINKS)
    assert stats.bytes_per_rank == 255
    assert stats.seconds(LINKS) == pytest.approx(255 / 1e6 + 3 * 8 * 5e-6)


def test_exposed_communication_by_hand() -> None:
    # 19.05 ms behind a 10 ms window in 4 pieces: 9.05 ms over the window + a 4.7625 ms first piece.
    world, = teacher_collectives("world", SIZES, 16, LINKS)
    assert exposed_ms([world], LINKS, COMPUTE) == pytest.approx(9.05 + 19.05 / 4)
    # Two collectives in one window share it; a blocking one shows in full.
    hidden = [Collective("a", 1500, 2, True, "backward", 3), Collective("b", 1500, 2, True, "backward", 1)]
    blocking = Collective("c", 1000, 2, True, None)
    # a: 1.5 + 3·5 µs = 1.515 ms, b: 1.505 ms, together 3.02 ms in a 2 ms window; c: 1.005 ms.
    assert exposed_ms([*hidden, blocking], LINKS, COMPUTE) == pytest.approx(1.02 + 1.515 / 3 + 1.505 + 1.005)
    step = predict_step("zero1", "none", SIZES, 2, LINKS, COMPUTE)
    assert step.img_per_s_per_gpu == pytest.approx(10 / (100 + step.exposed_ms) * 1e3)


def test_data_and_checkpoint_by_hand() -> None:
    storage = Storage(mean_jpeg_bytes=1000, write_bytes_per_s_per_node=1000, filesystem_bytes_per_s=1e6)
    assert data_bytes_per_s_per_node(100.0, LINKS, storage) == 800_000  # 8 GPUs × 100 img/s × 1 kB
    # 12 B per parameter over two nodes' writers (6 s); ZeRO-2's rank 0 also writes 4 kB alone (4 s).
    assert checkpoint_seconds("zero2", SIZES, 16, LINKS, storage) == 6.0
    assert checkpoint_seconds("fsdp", SIZES, 8, LINKS, storage) == 12.0


def test_model_sizes_are_those_of_the_built_models() -> None:
    cfg = load_config(TINY_CPU)
    sizes = model_sizes(cfg)
    teachers = {t.name: build_teacher(t.name, None, **t.arch) for t in cfg.teachers.models}
    student = build_student(cfg, {n: t.embed_dim for n, t in teachers.items()}, {n: get_teacher_spec(n).tokens for n in teachers})
    assert sizes.student_params == sum(p.numel() for p in student.parameters())
    assert sizes.teacher_params == sum(p.numel() for t in teachers.values() for p in t.parameters())
    assert sizes.teacher_blocks == 6 and sizes.student_blocks == 2 + 3
    assert sizes.norm_features == (64, 64, 64, 64)  # dino2 cls + patch, mast3r patch, multihmr patch


def test_cli_prints_the_tables_and_names_a_bad_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(TINY_CPU), "--gpus", "8", "16"]) == 0
    out = capsys.readouterr().out
    assert "| fsdp | node |" in out and "16 GPUs @400 Gb/s" in out
    assert main(["--config", "no_such_recipe"]) == 2
    assert "no_such_recipe" in capsys.readouterr().err
