"""Config loading: recipes carry the seed's numbers; bad input stops before any work, naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dune_scale.config import ConfigError, config_from_dict, load_config, save_config, student_configs
from dune_scale.distributed import DistInfo
from dune_scale.engine.compose import check_run

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["vits14_336", "vits14_448", "vitb14_336", "vitb14_448", "in1k_vitb14_336", "tiny_cpu"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_load_and_round_trip(name: str, tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg


def test_seed_recipe_numbers() -> None:
    s1 = load_config(REPO / "configs" / "vitb14_336.yaml")
    assert (s1.student.arch, s1.student.patch_size, s1.student.num_register_tokens) == ("vit_base", 14, 4)
    assert s1.student.layerscale_init == 1e-4
    assert (s1.train.image_size, s1.train.epochs, s1.train.batch_size_per_rank) == (336, 100, 128)
    assert (s1.optim.betas, s1.optim.eps, s1.optim.weight_decay, s1.optim.grad_clip) == ((0.9, 0.99), 1e-15, 0.03, 1.0)
    assert (s1.optim.warmup_fraction, s1.optim.min_lr) == (0.2, 1e-6)
    assert (s1.distill.teacher_drop, s1.distill.teacher_drop_p) == ("lowest_loss", 0.5)
    assert [t.name for t in s1.teachers.models] == ["dino2reg_vitlarge_14", "mast3r_vitlarge_16", "multihmr_vitlarge_14_672"]
    # lr = 3e-4 × global batch / 256: 8 GPUs × 128 → 1.2e-3; an epoch is ImageNet-1k sized.
    assert s1.peak_lr(8) == pytest.approx(3e-4 * 1024 / 256)
    # main_dune.py's count, ceil(epochs × 1,281,167 / global batch) rounded up to even: 125,114 on 8
    # GPUs; ceil(62,557.0…) = 62,557 → 62,558 on 16.
    assert (s1.total_steps(8), s1.total_steps(16)) == (125_114, 62_558)
    s2 = load_config(REPO / "configs" / "vitb14_448.yaml")
    assert (s2.train.stage, s2.train.image_size, s2.train.epochs, s2.optim.base_lr) == (2, 448, 50, 5e-5)
    assert s2.student.pretrained
    assert load_config(REPO / "configs" / "vits14_336.yaml").student.arch == "vit_small"


def test_overrides_types_and_list_indices() -> None:
    cfg = load_config(
        REPO / "configs" / "vitb14_336.yaml",
        ["train.max_steps=7", "optim.base_lr=1e-4", "teachers.models.1.checkpoint=/x/mast3r.pth", "run.output_dir=/tmp/o"],
    )
    assert cfg.train.max_steps == 7 and cfg.optim.base_lr == 1e-4
    assert cfg.teachers.models[1].checkpoint == "/x/mast3r.pth" and cfg.run.output_dir == "/tmp/o"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.image_size=100", "train.image_size: 100 is not allowed; it must be a positive multiple of student.patch_size=14"),
        ("train.imagesize=336", "unknown config key train.imagesize; allowed keys here:"),
        ("bogus.key=1", "unknown config key bogus"),
        ("train.batch_size_per_rank=many", "train.batch_size_per_rank: 'many' is not a valid integer"),
        ("train.batch_size_per_rank=0", "train.batch_size_per_rank: 0 is too small; it must be at least 1"),
        ("strategy.zero_stage=4", "strategy.zero_stage: 4 is not allowed; choose one of 1 | 2 | 3"),
        ("train.stage=2", "student.pretrained: None is not allowed; train.stage=2 starts from"),
        ("train.precision=fp16", "train.precision: 'fp16' is not allowed; choose one of bf16 | fp32"),
        ("distill.teacher_drop_p=1.5", "distill.teacher_drop_p: 1.5 is not allowed; a probability"),
        ("teachers.models.0.checkpoint=null", "teachers.models.0.checkpoint: None is not allowed; give the teacher's checkpoint path"),
        ("student.embed_dim=64", "student.embed_dim: 64 is not allowed; only student.arch=custom takes it"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
        ("optim.betas=[0.9,1.0]", "optim.betas.1: 1.0 is not allowed; each beta must be in [0, 1)"),
        ("optim.betas=[-0.1,0.99]", "optim.betas.0: -0.1 is not allowed"),
        ("optim.grad_clip=0", "optim.grad_clip: 0.0 is not allowed; a finite gradient-norm limit > 0, or none"),
        ("optim.grad_clip=-1", "optim.grad_clip: -1.0 is not allowed"),
        ("optim.grad_clip=.inf", "optim.grad_clip: inf is not allowed"),
        ("optim.base_lr=-1e-4", "optim.base_lr: -0.0001 is not allowed; a finite learning rate > 0"),
        ("optim.base_lr=.inf", "optim.base_lr: inf is not allowed"),
        ("optim.base_lr=.nan", "optim.base_lr: nan is not allowed"),
        ("optim.min_lr=1.0", "optim.min_lr: 1.0 is not allowed; a finite learning rate with 0 ≤ min_lr ≤ base_lr"),
        ("optim.eps=0", "optim.eps: 0.0 is not allowed; a finite epsilon > 0"),
        ("optim.weight_decay=-0.1", "optim.weight_decay: -0.1 is not allowed; a finite weight decay ≥ 0"),
        ("optim.weight_decay_end=.nan", "optim.weight_decay_end: nan is not allowed"),
        ("optim.clip_mode=norm", "optim.clip_mode: 'norm' is not allowed; choose one of per_param | global"),
        ("optim.wd_groups=all", "optim.wd_groups: 'all' is not allowed; choose one of official | dune_scale"),
        ("train.nonfinite=ignore", "train.nonfinite: 'ignore' is not allowed; choose one of stop | skip"),
        ("strategy.fsdp_param_dtype=fp16", "strategy.fsdp_param_dtype: 'fp16' is not allowed; choose one of fp32 | bf16"),
        ("train.max_steps", "must look like key=value"),
        ("teachers.shard=nodes", "teachers.shard: 'nodes' is not allowed; choose one of none | world | node"),
    ],
)
def test_bad_values_name_key_and_allowed(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "vitb14_336.yaml", [override])
    assert needle in str(err.value)


def test_numeric_defaults_are_the_official_ones_and_clipping_can_be_turned_off() -> None:
    cfg = load_config(REPO / "configs" / "vitb14_336.yaml")
    assert (cfg.optim.clip_mode, cfg.optim.wd_groups, cfg.strategy.fsdp_param_dtype) == ("per_param", "official", "fp32")
    assert cfg.train.nonfinite == "stop"
    assert load_config(REPO / "configs" / "vitb14_336.yaml", ["optim.grad_clip=none"]).optim.grad_clip is None


def test_batch_that_the_mixture_cannot_split() -> None:
    """A rule relating config and data: the up-front run check, not config loading, makes it."""
    cfg = load_config(REPO / "configs" / "vitb14_336.yaml", ["train.batch_size_per_rank=2"])
    with pytest.raises(ConfigError) as err:
        check_run(cfg, DistInfo())
    assert "train.batch_size_per_rank: 2" in str(err.value)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("teachers.models.1.name=mast3r_vitbase", "teachers.models.1.name: 'mast3r_vitbase' is not a known teacher"),
        ("teachers.models.0.arch.depht=2", "teachers.models.0.arch: unknown setting(s) depht for dino2reg_vitlarge_14"),
    ],
)
def test_run_check_names_teacher_problems(override: str, needle: str) -> None:
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", [override])
    with pytest.raises(ConfigError) as err:
        check_run(cfg, DistInfo())
    assert needle in str(err.value)


@pytest.mark.parametrize("value, scope", [("true", "world"), ("false", "none"), ("node", "node")])
def test_teacher_sharding_scope_and_its_boolean_spellings(value: str, scope: str) -> None:
    assert load_config(REPO / "configs" / "vitb14_336.yaml", [f"teachers.shard={value}"]).teachers.shard == scope


def test_shipped_recipes_are_found_by_name() -> None:
    """Recipes and mixtures are package data: a name works wherever the package is installed."""
    assert load_config("vitb14_448").to_dict() == load_config(REPO / "configs" / "vitb14_448.yaml").to_dict()


def test_base_recipe_cycle_is_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")


def test_a_base_recipe_not_beside_the_users_file_is_a_shipped_one(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text("base: vitb14_448.yaml\nstudent: {pretrained: stage1.safetensors}\n")
    mine = load_config(tmp_path / "mine.yaml")
    assert mine.to_dict() == load_config("vitb14_448", ["student.pretrained=stage1.safetensors"]).to_dict()
    (tmp_path / "lost.yaml").write_text("base: vitb14_999.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "lost.yaml")
    assert "'vitb14_999.yaml'" in str(err.value) and str(tmp_path / "vitb14_999.yaml") in str(err.value)
    assert str(REPO / "dune_scale" / "configs" / "vitb14_999.yaml") in str(err.value)


def test_a_named_architecture_replaces_the_custom_shape_below_it(tmp_path: Path) -> None:
    """tiny_cpu's student is custom (48 wide, 2 blocks, 4 heads): naming vit_small, in an override, a
    recipe over it or a students: entry, needs no student.embed_dim/depth/num_heads=null."""
    tiny = REPO / "configs" / "tiny_cpu.yaml"
    (tmp_path / "small.yaml").write_text(f"base: {tiny}\nstudent: {{arch: vit_small}}\n")
    two = load_config(tiny, ["students=[{name: small, student: {arch: vit_small}}, {name: tiny}]"])
    shapes = [(s.student.arch, s.student.embed_dim, s.student.depth, s.student.num_heads) for _, s in student_configs(two)]
    assert shapes == [("vit_small", None, None, None), ("custom", 48, 2, 4)]
    for cfg in (load_config(tiny, ["student.arch=vit_small"]), load_config(tmp_path / "small.yaml")):
        assert (cfg.student.arch, cfg.student.embed_dim, cfg.student.depth, cfg.student.num_heads) == ("vit_small", None, None, None)
    with pytest.raises(ConfigError, match="student.depth: 3 is not allowed; only student.arch=custom takes it"):
        load_config(tiny, ["student.arch=vit_small", "student.depth=3"])  # given with it: still a conflict


def test_demo_reads_its_arguments_before_replacing_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from dune_scale.cli.demo import DEMO_DIR
    from dune_scale.cli.demo import main as demo_main

    monkeypatch.chdir(tmp_path)
    kept = DEMO_DIR / "run" / "metrics.jsonl"
    kept.parent.mkdir(parents=True)
    kept.write_text("{}\n")
    with pytest.raises(SystemExit) as stop:
        demo_main(["--help"])
    assert stop.value.code == 0 and "key=value" in capsys.readouterr().out
    assert demo_main(["train.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert kept.read_text() == "{}\n"


def test_bad_override_fails_fast_from_the_command_line(tmp_path: Path) -> None:
    """Exit code 2 and one line naming the key, before anything is written or loaded."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
         "train.image_size=100", f"run.output_dir={out}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "train.image_size" in result.stderr and "multiple of student.patch_size=14" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "overrides, dist, needle",
    [
        (["teachers.shard=world"], DistInfo(), "teachers.shard=world needs several ranks"),
        (["teachers.shard=node"], DistInfo(world_size=4, local_world_size=1),
         "teachers.shard=node shards within each node, but the launch has 1 rank(s) per node"),
        (["teachers.shard=node"], DistInfo(world_size=6, local_world_size=4), "the same number on every node (use teachers.shard=none"),
        (["strategy.fsdp_shard=node", "strategy.name=single"], DistInfo(), "strategy.fsdp_shard is set but strategy.name=single"),
        (["strategy.fsdp_shard=node"], DistInfo(world_size=4, local_world_size=1),
         "strategy.fsdp_shard=node shards within each node, but the launch has 1 rank(s)"),
        (["strategy.fsdp_shard=node"], DistInfo(world_size=6, local_world_size=4), "(use strategy.fsdp_shard=world)"),
    ],
)
def test_node_sharding_the_launch_cannot_do(overrides: list[str], dist: DistInfo, needle: str) -> None:
    cfg = load_config(REPO / "configs" / "vitb14_336.yaml", ["strategy.name=fsdp", *overrides])
    with pytest.raises(ConfigError) as err:
        check_run(cfg, dist)
    assert needle in str(err.value)
    check_run(load_config(REPO / "configs" / "vitb14_336.yaml", ["strategy.name=fsdp"]), dist)  # the default shards over the world
