"""Several students on one teacher pass (``students:``): one teacher forward per batch, each student
exactly as if trained alone (weights, dropping, resume), its own outputs, export and bench numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_CPU, tiny_overrides
from dune_scale.cli.bench import BenchOptions, run_benchmark
from dune_scale.cli.export import main as export_main
from dune_scale.cli.train import train
from dune_scale.config import ConfigError, load_config, student_configs
from dune_scale.distributed import DistInfo
from dune_scale.engine.export import load_encoder
from dune_scale.teachers.ensemble import TeacherEnsemble
from dune_scale.telemetry.metrics import read_metrics

# A smaller student with its own learning rate, and one that differs from the top level only in its
# dropping method (the top level's lowest_loss draws from each student's own random stream).
SMALL = "{name: small, student: {depth: 1}, optim: {base_lr: 1.0e-3}}"
WIDE = "{name: wide, distill: {teacher_drop: own_data}}"
GROUP = f"students=[{SMALL}, {WIDE}]"


def _train(out: Path, shards: Path, *extra: str) -> bool:
    """Checkpoints and validation (one batch per dataset) every 3 steps."""
    overrides = tiny_overrides(out, shards, "checkpoint.every_steps=3", "eval.every_steps=3", "eval.max_batches=1", *extra)
    return train(load_config(TINY_CPU, overrides))


@pytest.fixture(scope="module")
def group_run(tmp_path_factory: pytest.TempPathFactory, demo_shards: Path) -> Path:
    """Two students for 6 steps, stopped after 3 and resumed (teacher forwards counted)."""
    out = tmp_path_factory.mktemp("group") / "run"
    _train(out, demo_shards, GROUP, "train.max_steps=3")
    calls = []
    original = TeacherEnsemble.forward
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TeacherEnsemble, "forward", lambda self, images, *rest: calls.append(len(images)) or original(self, images, *rest))
        _train(out, demo_shards, GROUP, "train.max_steps=6")
    # Steps 4-6, then validation (one batch of each of the 3 datasets): one teacher forward per batch
    # for both students.
    assert calls == [12] * 6
    return out


def test_a_student_in_a_group_trains_exactly_as_alone_across_a_resume(
    group_run: Path, tmp_path: Path, demo_shards: Path
) -> None:
    alone = tmp_path / "alone"
    _train(alone, demo_shards, f"students=[{WIDE}]", "train.max_steps=6")
    grouped = read_metrics(group_run / "students" / "wide" / "metrics.jsonl")
    single = read_metrics(alone / "students" / "wide" / "metrics.jsonl")
    assert [r["step"] for r in grouped if r["kind"] == "train"] == list(range(1, 7))
    keys = ("kind", "loss", "loss_dino2reg_vitlarge_14", "grad_norm", "drop_weight_mast3r_vitlarge_16",
            "norm_mast3r_vitlarge_16_patch_std", "dataset", "loss_multihmr_vitlarge_14_672_patch_cos")
    assert [[r.get(k) for k in keys] for r in grouped] == [[r.get(k) for k in keys] for r in single]
    assert [r["step"] for r in grouped if r["kind"] == "val" and r["dataset"] == "all"] == [3, 6]
    assert len(list((group_run / "students" / "wide" / "pictures").glob("step_000000006_*.png"))) == 4
    weights = load_file(str(group_run / "students" / "wide" / "student.safetensors"))
    reference = load_file(str(alone / "students" / "wide" / "student.safetensors"))
    assert weights.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(weights[key], value), key


def test_each_student_has_its_own_model_schedule_outputs_and_checkpoint_part(group_run: Path) -> None:
    small, wide = ([r for r in read_metrics(group_run / "students" / name / "metrics.jsonl") if r["kind"] == "train"]
                   for name in ("small", "wide"))
    assert small[-1]["lr"] == pytest.approx(wide[-1]["lr"] / 2)  # base_lr 1e-3 vs the top level's 2e-3
    assert small[-1]["loss"] != wide[-1]["loss"]
    assert not (group_run / "metrics.jsonl").exists() and not (group_run / "student.safetensors").exists()
    depths = {name: 1 + max(int(k.split(".")[2]) for k in load_file(str(group_run / "students" / name / "student.safetensors"))
                            if k.startswith("encoder.blocks.")) for name in ("small", "wide")}
    assert depths == {"small": 1, "wide": 2}
    checkpoint = group_run / "checkpoints" / "step_000000006"
    assert sorted(p.name for p in (checkpoint / "students").iterdir()) == ["small", "wide"]
    assert (checkpoint / "students" / "small" / "model.pt").is_file()
    # Both students keep the same running teacher statistics: one computation, shared.
    norm = "teacher_norms.dino2reg_vitlarge_14.patch.running_std"
    small_weights = load_file(str(group_run / "students" / "small" / "student.safetensors"))
    wide_weights = load_file(str(group_run / "students" / "wide" / "student.safetensors"))
    assert torch.equal(small_weights[norm], wide_weights[norm])


def test_a_named_student_starts_from_weights_of_its_name_and_the_seed() -> None:
    from dune_scale.engine.compose import build_trainer, check_run

    def initial(students: str, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
        cfg = load_config(TINY_CPU, ["run.console=none", students, f"run.seed={seed}"])
        trainer = build_trainer(cfg, DistInfo(), check_run(cfg, DistInfo()), loader=None)
        return {s.name: s.strategy.module.encoder.state_dict() for s in trainer.students}

    group, alone, reseeded = initial(GROUP), initial(f"students=[{WIDE}]"), initial(f"students=[{WIDE}]", seed=1)
    assert all(torch.equal(group["wide"][k], alone["wide"][k]) for k in alone["wide"])
    assert not torch.equal(group["wide"]["pos_embed"], reseeded["wide"]["pos_embed"])


def test_resume_with_another_student_list_is_refused(group_run: Path, demo_shards: Path) -> None:
    with pytest.raises(ConfigError, match=r"students: checkpoint has \['small', 'wide'\], this run has \['wide'\]"):
        _train(group_run, demo_shards, f"students=[{WIDE}]", "train.max_steps=8")


def test_export_names_the_student(group_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_main([str(group_run), "--format", "dune", "--out", str(tmp_path / "x.pth")]) == 2
    assert "several students (small, wide)" in capsys.readouterr().err
    assert export_main([str(group_run), "--student", "tiny", "--format", "dune", "--out", str(tmp_path / "x.pth")]) == 2
    assert export_main([str(group_run), "--student", "small", "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    from_checkpoint = load_encoder(tmp_path / "hf")
    from_folder = load_encoder(group_run / "students" / "small")
    assert len(from_checkpoint.vit.blocks) == len(from_folder.vit.blocks) == 1
    for key, value in from_folder.state_dict().items():
        assert torch.equal(from_checkpoint.state_dict()[key], value), key


@pytest.mark.parametrize(
    "students, message",
    [
        ("[{name: a}, {name: a}]", "students.1.name: 'a' is not allowed; each student name may appear once"),
        ("[{name: 'a/b'}]", "students.0.name: 'a/b' is not allowed"),
        ("[{name: a, distill: {norm_momentum_end: 0.1}}]", "students.0.distill.norm_momentum_end: 0.1 is not allowed; every"),
        ("[{name: a}, {name: b, student: {patch_size: 16}}]", "students.1.student.patch_size: 16 is not allowed; every"),
        # Merged key by key; a named arch drops the top level's custom shape, but not a shape given with it.
        ("[{name: a, student: {arch: vit_small, depth: 3}}]", "students.0 (a): student.depth: 3 is not allowed; only"),
        ("[{name: a, student: {arch: vit_tiny}}]", "students.0 (a): student.arch: 'vit_tiny' is not allowed"),
        ("[{name: a, optim: {learning_rate: 1}}]", "students.0 (a): unknown config key optim.learning_rate"),
        ("[{name: a, train: {batch_size_per_rank: 2}}]", "unknown config key students.0.train"),
    ],
)
def test_bad_student_entries_name_the_key(students: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(TINY_CPU, [f"students={students}"])


def test_the_top_level_student_is_a_template_each_entry_completes() -> None:
    """Stage 2 of a family: each student starts from its own stage-1 weights, none at the top."""
    family = "students=[{name: s, student: {pretrained: s.safetensors}}, {name: b, student: {pretrained: b.safetensors}}]"
    cfg = load_config(TINY_CPU, ["train.stage=2", family])
    assert [c.student.pretrained for _, c in student_configs(cfg)] == ["s.safetensors", "b.safetensors"]
    with pytest.raises(ConfigError, match=r"^students.1 \(b\): student.pretrained: None is not allowed; train.stage=2"):
        load_config(TINY_CPU, ["train.stage=2", "students=[{name: s, student: {pretrained: s.safetensors}}, {name: b}]"])


def test_a_student_section_is_merged_over_the_top_level() -> None:
    cfg = load_config(TINY_CPU, [GROUP, "optim.weight_decay=0.05"])
    (small_name, small), (wide_name, wide) = student_configs(cfg)
    assert (small_name, wide_name) == ("small", "wide")
    assert (small.student.depth, small.student.embed_dim, small.optim.base_lr, small.optim.weight_decay) == (1, 48, 1e-3, 0.05)
    assert (wide.student.depth, wide.distill.teacher_drop, wide.optim.base_lr) == (2, "own_data", 2e-3)
    assert small.students == [] and student_configs(load_config(TINY_CPU)) == [("", load_config(TINY_CPU))]


def test_bench_reports_each_student_and_the_combined_rate(tmp_path: Path) -> None:
    options = BenchOptions(steps=2, warmup=1)
    report = run_benchmark(str(TINY_CPU), ["run.console=none", f"run.output_dir={tmp_path}", GROUP], [], options, DistInfo())
    (result,) = report["results"]
    assert result["status"] == "ok", result["error"]
    students = result["students"]
    assert set(students) == {"small", "wide"}
    for numbers in students.values():
        assert 0 < numbers["own_seconds"] < numbers["alone_step_time_s"] <= result["step_time_s"]
        assert numbers["img_per_s_per_rank_alone"] > result["img_per_s_per_rank"]
    assert {"students/small/backward", "students/wide/optimizer", "teacher_forward"} <= set(result["phases"])


def test_one_wandb_run_shows_every_student_under_its_name() -> None:
    from dune_scale.telemetry.metrics import StudentView

    logged: list[dict] = []
    run_sink = type("RunSink", (), {"write": lambda self, record: logged.append(record)})()
    view = StudentView(run_sink, "small", "students/small")
    view.write({"step": 3, "kind": "train", "loss": 0.5, "lr": 1e-3})
    view.write({"step": 3, "kind": "pictures", "dataset": "probe", "paths": ["pictures/step_000000003_0.png"]})
    assert logged[0] == {"step": 3, "kind": "train", "small/loss": 0.5, "small/lr": 1e-3}
    assert logged[1]["paths"] == ["students/small/pictures/step_000000003_0.png"] and logged[1]["tag"] == "small/pictures"
