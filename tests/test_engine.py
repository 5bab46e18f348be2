"""Engine pieces on their own: parameter groups, checkpoint atomicity and fallback, pretrained init."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TINY_CPU
from dune_scale.config import load_config
from dune_scale.distill.student import DuneStudent
from dune_scale.distributed import DistInfo
from dune_scale.engine.checkpointer import LATEST, MANIFEST, TRAINER_STATE, Checkpointer, CheckpointError, is_complete
from dune_scale.engine.optim import clip_gradients_, clip_per_parameter_, param_groups
from dune_scale.engine.pretrained import PretrainedError, load_pretrained_student
from dune_scale.engine.strategies.single import SingleStrategy
from dune_scale.models.vit import VisionTransformer


def _student(img_size: int = 42, seed: int = 0) -> DuneStudent:
    torch.manual_seed(seed)
    encoder = VisionTransformer(img_size=img_size, patch_size=14, embed_dim=32, depth=2, num_heads=4)
    return DuneStudent(encoder, {"t": 16}, {"t": ("cls", "patch")})


def _groups_by_name(student: DuneStudent, wd_groups: str) -> tuple[set[str], set[str], dict]:
    decay, no_decay = param_groups(student, wd_groups)
    names = {id(p): n for n, p in student.named_parameters()}
    return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}, no_decay


def test_official_weight_decay_groups_skip_only_biases_and_1d_tensors() -> None:
    student = _student()
    decay_names, no_decay_names, no_decay = _groups_by_name(student, "official")
    # naver/dune get_params_groups: learned tokens and the positional embedding ARE decayed.
    assert {"encoder.cls_token", "encoder.register_tokens", "encoder.pos_embed"} <= decay_names
    assert "encoder.blocks.0.ls1.gamma" in no_decay_names and "encoder.blocks.0.attn.qkv.bias" in no_decay_names
    assert "encoder.blocks.0.norm1.weight" in no_decay_names and "projectors.t.head.bias" in no_decay_names
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    assert decay_names == {n for n, p in student.named_parameters() if n in trained and p.ndim > 1}
    assert "encoder.norm.weight" not in decay_names | no_decay_names  # frozen: never trained
    assert no_decay["weight_decay"] == 0.0


def test_dune_scale_weight_decay_groups_also_skip_tokens_and_pos_embed() -> None:
    student = _student()
    decay_names, no_decay_names, _ = _groups_by_name(student, "dune_scale")
    assert {"encoder.cls_token", "encoder.register_tokens", "encoder.pos_embed"} <= no_decay_names
    assert decay_names == {n for n, _ in student.named_parameters() if n.endswith("weight") and "norm" not in n}


def _official_clip(grads: list[torch.Tensor], clip: float) -> None:
    """naver/dune utils/optim.py clip_gradients, re-written."""
    for grad in grads:
        norm = grad.norm(p=2)
        coefficient = clip / (norm + 1e-6)
        if coefficient < 1:
            grad.mul_(coefficient)


def test_per_parameter_clip_equals_the_official_one_and_split_pieces_agree() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(5, 3) * 3, torch.randn(7) * 0.01, torch.randn(2, 2, 2)]
    expected = [g.clone() for g in grads]
    _official_clip(expected, 1.0)
    clipped = [g.clone() for g in grads]
    norms = clip_per_parameter_(clipped, range(3), 3, 1.0)
    assert torch.allclose(norms, torch.stack([g.norm() for g in grads]))
    for mine, reference in zip(clipped, expected):
        assert torch.allclose(mine, reference, rtol=1e-6, atol=0)
    assert torch.equal(clipped[1], grads[1])  # under the limit: untouched
    # The same parameters cut into pieces (as ZeRO partitions and FSDP shards hold them): same result.
    flats = [g.clone().flatten() for g in grads]
    pieces = [flats[0][:4], flats[0][4:], flats[1], flats[2][:3], flats[2][3:]]
    clip_per_parameter_(pieces, [0, 0, 1, 2, 2], 3, 1.0)
    for flat, reference in zip(flats, expected):
        assert torch.allclose(flat, reference.flatten(), rtol=1e-6, atol=0)


def test_global_clip_and_no_clip(tmp_path: Path) -> None:
    cfg = load_config(TINY_CPU, [f"data.remote_root={tmp_path}", "optim.clip_mode=global"]).optim
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad, params[1].grad = torch.full((3,), 3.0), torch.full((4,), 0.1)
    total = torch.cat([p.grad for p in params]).norm()
    assert clip_gradients_(params, cfg) == pytest.approx(total.item())
    assert torch.cat([p.grad for p in params]).norm() == pytest.approx(1.0, rel=1e-5)
    params[0].grad = torch.full((3,), 3.0)
    unclipped = load_config(TINY_CPU, [f"data.remote_root={tmp_path}", "optim.grad_clip=none"]).optim
    assert unclipped.grad_clip is None
    clip_gradients_(params, unclipped)
    assert torch.equal(params[0].grad, torch.full((3,), 3.0))


def _strategy(tmp_path: Path) -> SingleStrategy:
    cfg = load_config(TINY_CPU, [f"run.output_dir={tmp_path}", f"data.remote_root={tmp_path}"])
    strategy = SingleStrategy(cfg, DistInfo())
    strategy.setup(_student(), 1e-3)
    return strategy


@dataclasses.dataclass
class _Box:
    """A minimal Stateful component."""

    value: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


def _save_steps(ckpt: Checkpointer, strategy: SingleStrategy, steps: tuple[int, ...]) -> None:
    for step in steps:
        ckpt.save(step, {"": strategy}, {"progress": _Box(step)}, {"rng": _Box(torch.tensor([step]))})


def test_checkpoints_are_atomic_pruned_and_skip_incomplete(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    strategy = _strategy(tmp_path)
    ckpt = Checkpointer(tmp_path / "ckpt", keep_last=2, every_steps=2, dist=DistInfo())
    assert [ckpt.due(step, final=False) for step in (1, 2, 3, 4)] == [False, True, False, True] and ckpt.due(3, final=True)
    _save_steps(ckpt, strategy, (1, 2, 3))
    assert [p.name for p in ckpt.completed()] == ["step_000000002", "step_000000003"]
    # Every component comes back, global and per rank, with the strategy's weights.
    progress, rng, other = _Box(), _Box(), _strategy(tmp_path)
    ckpt.load(ckpt.find_latest(), {"": other}, {"progress": progress}, {"rng": rng})
    assert progress.value == 3 and torch.equal(rng.value, torch.tensor([3]))
    assert all(torch.equal(a, b) for a, b in zip(strategy.module.state_dict().values(), other.module.state_dict().values()))
    assert not list((tmp_path / "ckpt").glob(".tmp*"))
    # A save killed half-way leaves a temporary folder; it is never a candidate.
    (tmp_path / "ckpt" / ".tmp_step_000000004").mkdir()
    assert ckpt.find_latest().name == "step_000000003"
    # A truncated file in the latest checkpoint: fall back to the previous one, with a warning naming it.
    model = tmp_path / "ckpt" / "step_000000003" / "model.pt"
    model.write_bytes(model.read_bytes()[:100])
    assert not is_complete(model.parent)
    with caplog.at_level(logging.WARNING):
        assert ckpt.find_latest().name == "step_000000002"
    assert "step_000000003" in caplog.text
    (tmp_path / "ckpt" / LATEST).unlink()
    assert ckpt.find_latest().name == "step_000000002"


def _overwrite_same_size(path: Path, offset: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + 8] = bytes(b ^ 0xFF for b in data[offset : offset + 8])
    path.write_bytes(bytes(data))


def test_same_size_corruption_falls_back_and_no_usable_checkpoint_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    strategy = _strategy(tmp_path)
    ckpt = Checkpointer(tmp_path / "ckpt", keep_last=3, every_steps=1, dist=DistInfo())
    _save_steps(ckpt, strategy, (1, 2, 3))
    manifest = json.loads((tmp_path / "ckpt" / "step_000000003" / MANIFEST).read_text())["files"]
    assert set(manifest) == {"model.pt", "optimizer.pt", "rank_00000.pt", TRAINER_STATE}
    assert all(len(entry["sha256"]) == 64 for entry in manifest.values())
    _overwrite_same_size(tmp_path / "ckpt" / "step_000000003" / "model.pt")  # bit rot: size unchanged
    (tmp_path / "ckpt" / "step_000000002" / TRAINER_STATE).write_bytes(b"\0" * (tmp_path / "ckpt" / "step_000000002" / TRAINER_STATE).stat().st_size)
    with caplog.at_level(logging.WARNING):
        assert ckpt.find_latest().name == "step_000000001"
    assert "step_000000003/model.pt: content differs from its sha256" in caplog.text
    assert f"step_000000002/{TRAINER_STATE}: content differs" in caplog.text
    (tmp_path / "ckpt" / "step_000000001" / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError) as err:
        ckpt.find_latest()
    message = str(err.value)
    assert "none can be resumed from" in message and "step_000000001/optimizer.pt is missing" in message
    assert "step_000000003/model.pt" in message and "checkpoint.resume=never" in message
    assert ckpt.resume_folder("never") is None
    with pytest.raises(CheckpointError, match=r"checkpoint.resume: .*/nowhere is not a checkpoint folder"):
        ckpt.resume_folder(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match=r"checkpoint.resume: .*step_000000003 cannot be resumed from"):
        ckpt.resume_folder(str(tmp_path / "ckpt" / "step_000000003"))


def test_strategy_save_load_round_trip(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    strategy.module(torch.randn(2, 3, 42, 42))["t"]["patch"].sum().backward()
    strategy.step(1e-3, 0.03, skip=torch.tensor(False))
    (tmp_path / "a").mkdir()
    strategy.save(tmp_path / "a")
    other = _strategy(tmp_path)
    other.load(tmp_path / "a")
    for (name, p), q in zip(strategy.module.state_dict().items(), other.module.state_dict().values()):
        assert torch.equal(p, q), name
    saved, loaded = strategy.optimizer.state_dict()["state"], other.optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys() and saved
    for index, state in saved.items():  # Adam's moments and step counts, value for value
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(loaded[index][key]), torch.as_tensor(value)), (index, key)


def test_pretrained_init_resamples_pos_embed_and_checks_shapes(tmp_path: Path) -> None:
    stage1 = _student(img_size=42, seed=1)
    torch.save(stage1.state_dict(), tmp_path / "stage1.pt")
    stage2 = _student(img_size=56, seed=2)
    load_pretrained_student(stage2, tmp_path / "stage1.pt")
    assert torch.equal(stage2.encoder.blocks[1].mlp.fc2.weight, stage1.encoder.blocks[1].mlp.fc2.weight)
    assert stage2.encoder.pos_embed.shape == (1, 1 + 16, 32)
    assert torch.equal(stage2.encoder.pos_embed[:, 0], stage1.encoder.pos_embed[:, 0])
    # An encoder-only file (e.g. a released student) under a "model" key works too.
    encoder_only = {k: v for k, v in stage1.encoder.state_dict().items()}
    torch.save({"model": encoder_only}, tmp_path / "released.pth")
    load_pretrained_student(_student(img_size=56), tmp_path / "released.pth")
    wider = DuneStudent(VisionTransformer(img_size=42, patch_size=14, embed_dim=48, depth=2, num_heads=4), {"t": 16}, {"t": ("patch",)})
    with pytest.raises(PretrainedError, match=r"encoder.cls_token has shape \(1, 1, 32\), the student needs \(1, 1, 48\)"):
        load_pretrained_student(wider, tmp_path / "stage1.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedError, match="cannot be read"):
        load_pretrained_student(stage2, tmp_path / "junk.pt")

