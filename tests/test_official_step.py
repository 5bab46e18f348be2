"""With every numeric default, our training steps equal an independent re-implementation of the
official naver/dune step (main_dune.py train_one_step): teacher norm on batch statistics, the UNIC
loss, per-parameter gradient clipping, AdamW(0.9, 0.99, eps 1e-15) with the official weight-decay
groups. Teacher dropping is off (its coefficients are random); the student and teachers are the
same modules on both sides, so what is compared is the step itself: losses and updated weights."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from conftest import TINY_CPU
from dune_scale.config import load_config
from dune_scale.distributed import DistInfo
from dune_scale.engine.compose import build_trainer, check_run

STEPS = 2  # Adam's first update is sign-like: clipping only shows from the second one on


def _official_param_groups(model: torch.nn.Module) -> list[dict]:
    decayed = [p for n, p in model.named_parameters() if p.requires_grad and not (n.endswith(".bias") or p.ndim == 1)]
    not_decayed = [p for n, p in model.named_parameters() if p.requires_grad and (n.endswith(".bias") or p.ndim == 1)]
    return [{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}]


def _official_clip(model: torch.nn.Module, clip: float) -> None:
    for param in model.parameters():
        if param.grad is not None:
            coefficient = clip / (param.grad.norm(p=2) + 1e-6)
            if coefficient < 1:
                param.grad.mul_(coefficient)


def _standardise(features: torch.Tensor, token: str, buffers: dict[str, torch.Tensor], momentum: float) -> torch.Tensor:
    dims = [0] if token == "cls" else [0, 1]
    mean, std = features.mean(dim=dims), features.std(dim=dims)
    buffers["running_mean"].copy_(buffers["running_mean"] * (1 - momentum) + mean * momentum)
    buffers["running_std"].copy_(buffers["running_std"] * (1 - momentum) + std * momentum)
    return (features - mean) / torch.clamp(std, min=1e-3)


def _official_loss(student_out: dict, teacher_out: dict, norms: dict, momentum: float) -> torch.Tensor:
    per_teacher = []
    for name, tokens in teacher_out.items():
        losses = []
        for token, target in tokens.items():
            target = _standardise(target.float(), token, norms[name][token], momentum)
            prediction = student_out[name][token].float()
            loss = 0.5 * (1 - F.cosine_similarity(prediction, target, dim=-1))
            loss = loss + 0.5 * F.smooth_l1_loss(prediction, target, reduction="none", beta=1.0).mean(dim=-1)
            losses.append(loss.mean(dim=1) if loss.ndim == 2 else loss)
        per_teacher.append(torch.stack(losses, dim=1).mean(dim=1))
    loss_tensor = torch.stack(per_teacher)
    coefficients = torch.ones_like(loss_tensor)  # teacher dropping "none"
    coefficients /= coefficients.sum()
    return (coefficients * loss_tensor).sum()


def _compare(mine: torch.Tensor, reference: torch.Tensor, key: str, lr: float) -> None:
    """Adam turns float noise in a gradient that is ~0 into steps of up to ±lr: such elements are
    compared to a few % of lr. The key third of qkv.bias has an exactly-zero gradient (softmax is
    shift-invariant), so its steps are pure noise and it is left out."""
    if key.endswith("attn.qkv.bias"):
        dim = reference.shape[0] // 3
        mine, reference = torch.cat([mine[:dim], mine[2 * dim :]]), torch.cat([reference[:dim], reference[2 * dim :]])
    torch.testing.assert_close(mine, reference, rtol=1e-4, atol=0.02 * lr, msg=key)


def test_default_steps_equal_the_official_training_step(tmp_path: Path) -> None:
    _check_against_official(tmp_path)


def _check_against_official(tmp_path: Path, *extra: str) -> None:
    cfg = load_config(TINY_CPU, [f"run.output_dir={tmp_path}", f"data.remote_root={tmp_path}", "distill.teacher_drop=none",
                                 "optim.grad_clip=0.05", *extra])
    assert (cfg.optim.clip_mode, cfg.optim.wd_groups, cfg.optim.betas, cfg.optim.eps) == ("per_param", "official", (0.9, 0.99), 1e-15)
    trainer = build_trainer(cfg, DistInfo(), check_run(cfg, DistInfo()), loader=None)
    trainer.state.step = 20  # past warm-up: a non-zero learning rate
    student = trainer.students[0]
    reference = copy.deepcopy(student.strategy.module)
    optimizer = torch.optim.AdamW(_official_param_groups(reference), lr=0, betas=(0.9, 0.99), eps=1e-15)
    generator = torch.Generator().manual_seed(0)
    batches = [{"images": torch.randn(12, 3, 56, 56, generator=generator), "dataset": ["synth_dino2"] * 12, "index": torch.arange(12)}
               for _ in range(STEPS)]
    ours = iter(batches)
    for step, batch in enumerate(batches, start=20):
        loss = trainer.train_step(ours)[""]["loss"]
        for index, group in enumerate(optimizer.param_groups):
            group["lr"] = student.schedules.lr(step)
            if index == 0:
                group["weight_decay"] = student.schedules.weight_decay_at(step)
        with torch.no_grad():
            teacher_out = trainer.teachers(batch["images"])
        norms = {name: {token: dict(norm.named_buffers()) for token, norm in tokens.items()} for name, tokens in reference.teacher_norms.items()}
        with student.strategy.autocast():
            student_out = reference(batch["images"])
        official = _official_loss(student_out, teacher_out, norms, student.schedules.norm_momentum(step))
        official.backward()
        _official_clip(reference, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.testing.assert_close(loss, official.detach(), rtol=1e-5, atol=0)
    mine = student.strategy.module.state_dict()
    for key, value in reference.state_dict().items():  # includes the teacher norms' running statistics
        _compare(mine[key], value, key, student.schedules.peak_lr)
