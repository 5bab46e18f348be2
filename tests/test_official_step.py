"""With every numeric default, our schedules and training steps equal naver/dune's, written out here
from its formulas and never from our own code:

- the step count of ``main_dune.py`` (ceil(epochs · epoch_size / global batch), rounded up to even)
  and the schedules of ``utils/exp.py``'s ``cosine_scheduler`` as numpy arrays indexed by the
  iteration (warm-up ``np.linspace(0, peak, W)``, then a half-cosine; the teacher-norm momentum is
  the same cosine without warm-up; ``lr · global batch / 256``);
- its ``train_one_step`` on two DDP ranks: teacher norm on the statistics of both ranks' features,
  the UNIC loss, teacher dropping normalised by each rank's own kept count
  (``model/teacher_dropping.py``), the ranks' gradients averaged, per-parameter clipping
  (``utils/optim.py``), AdamW(0.9, 0.99, eps 1e-15, fused) with the official weight-decay groups.

Our side runs the two ranks' batches as two accumulated micro-batches of one process: the same maths
as two ranks (statistics over both, each normalised on its own, gradients averaged), through the
trainer every strategy uses; the last test shows that the objective of a rank of a 2-rank job
takes nothing from the other rank's kept count (the strategies' gradient average is checked
against ``single`` in test_distributed). Shared by both sides are only the inputs of a step: the
student's weights, the batches, the teachers' features (recorded from our side's teacher pass: the
reference side calls neither our teachers nor our schedules), and which (teacher, image) pairs
``lowest_loss`` keeps (its draws are ours; the official ones come from python's ``random``)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY_CPU
from dune_scale.config import load_config
from dune_scale.distill import dropping
from dune_scale.distill import objective as objective_module
from dune_scale.distributed import DistInfo
from dune_scale.engine.compose import build_objective, build_schedules, build_trainer, check_run

RECIPES = ("vits14_336", "vitb14_336", "vits14_448", "vitb14_448", "in1k_vitb14_336")
RANKS, PER_RANK = 2, 6
# 1 epoch of 769 images in global batches of 12: ceil(64.08) = 65 iterations, rounded up to 66; the
# warm-up is then 13 iterations (0 … peak at iteration 12). Steps 11–13 end the warm-up and start
# the cosine (Adam's first update is sign-like: clipping only shows from the second one on).
EPOCH_SIZE, FIRST_STEP, STEPS = 769, 11, 3
SEED = 2  # its dropping draws keep different numbers of pairs on the two ranks at each of the steps


# ----------------------------------------------------------------------- the official formulas


def official_iterations(epochs: float, epoch_size: int, global_batch: int) -> int:
    iterations = math.ceil(epochs * epoch_size / global_batch)
    return iterations + iterations % 2


def official_cosine_scheduler(base: float, final: float, epochs: float, niter_per_ep: int, warmup_epochs: float = 0) -> np.ndarray:
    warmup = np.array([])
    warmup_iters = math.floor(warmup_epochs * niter_per_ep)
    if warmup_epochs > 0:
        warmup = np.linspace(0, base, warmup_iters)
    rest = np.arange(math.floor(epochs * niter_per_ep) - warmup_iters)
    return np.concatenate((warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * rest / len(rest)))))


def official_schedules(cfg, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """main_dune.py's ``args.lr_schedule`` and ``args.tnorm_ema_schedule`` for our config, mapped to
    its arguments: --lr = optim.base_lr (with lr_reference_batch 256), --warmup_epochs =
    optim.warmup_fraction × epochs, --batch_size_per_gpu × ranks = our global batch."""
    assert cfg.optim.lr_reference_batch == 256 and cfg.train.total_steps is None
    batch = cfg.train.batch_size_per_rank * cfg.train.grad_accum_steps * world_size
    iters = official_iterations(cfg.train.epochs, cfg.train.epoch_size, batch)
    warmup_epochs = cfg.optim.warmup_fraction * cfg.train.epochs
    lr = official_cosine_scheduler(cfg.optim.base_lr * batch / 256.0, cfg.optim.min_lr, epochs=1, niter_per_ep=iters,
                                   warmup_epochs=warmup_epochs / cfg.train.epochs)
    momentum = official_cosine_scheduler(cfg.distill.norm_momentum_start, cfg.distill.norm_momentum_end, epochs=1, niter_per_ep=iters)
    return lr, momentum


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


def _official_teacher_norm(ranks: list[torch.Tensor], token: str, buffers: dict[str, torch.Tensor], momentum: float) -> list[torch.Tensor]:
    """StandardNormalizer in training: statistics of the features gathered from every rank."""
    dims = [0] if token == "cls" else [0, 1]
    gathered = torch.cat(ranks)
    mean, std = gathered.mean(dim=dims), gathered.std(dim=dims)
    buffers["mean"].copy_(buffers["mean"] * (1 - momentum) + mean * momentum)
    buffers["std"].copy_(buffers["std"] * (1 - momentum) + std * momentum)
    return [(features - mean) / torch.clamp(std, min=1e-3) for features in ranks]


def _official_per_image_losses(student_out: dict, targets: dict) -> torch.Tensor:
    """[teachers, B]: per token 0.5·(1 − cos) + 0.5·smooth-L1, token-mean, then mean over token types."""
    per_teacher = []
    for name, tokens in targets.items():
        losses = []
        for token, target in tokens.items():
            prediction = student_out[name][token].float()
            loss = 0.5 * (1 - F.cosine_similarity(prediction, target, dim=-1))
            loss = loss + 0.5 * F.smooth_l1_loss(prediction, target, reduction="none", beta=1.0).mean(dim=-1)
            losses.append(loss.mean(dim=1) if loss.ndim == 2 else loss)
        per_teacher.append(torch.stack(losses, dim=1).mean(dim=1))
    return torch.stack(per_teacher)


def _official_rank_loss(loss_tensor: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """TeacherDropping: the coefficients of the kept pairs divided by this rank's own kept count."""
    coefficients = kept.float()
    coefficients.div_(coefficients.sum())
    return (coefficients.clone().detach() * loss_tensor).sum()


# ----------------------------------------------------------------------- schedules


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_steps_through_the_official_schedules(recipe: str) -> None:
    """Every iteration's learning rate, weight decay and teacher-norm momentum, on 8 and 16 GPUs
    (stage 1 on 16 and stage 2 on 8 count 62,557 iterations, rounded up to 62,558)."""
    for world_size in (8, 16):
        cfg = load_config(REPO / "configs" / f"{recipe}.yaml")
        lr, momentum = official_schedules(cfg, world_size)
        assert cfg.total_steps(world_size) == len(lr) and len(lr) % 2 == 0
        schedules = build_schedules(cfg, world_size)
        ours_lr = np.array([schedules.lr(step) for step in range(len(lr))])
        ours_momentum = np.array([schedules.norm_momentum(step) for step in range(len(lr))])
        np.testing.assert_allclose(ours_lr, lr, rtol=1e-13, atol=0)
        np.testing.assert_allclose(ours_momentum, momentum, rtol=1e-13, atol=0)
        warmup = math.floor(cfg.optim.warmup_fraction * len(lr))
        assert ours_lr[warmup - 1] == schedules.peak_lr == lr[warmup - 1] and ours_lr[0] == 0.0
        assert {schedules.weight_decay_at(step) for step in range(0, len(lr), 997)} == {cfg.optim.weight_decay}  # --wd


# ----------------------------------------------------------------------- the training step


def _compare(mine: torch.Tensor, reference: torch.Tensor, key: str, lr: float) -> None:
    """Adam turns float noise in a gradient that is ~0 into steps of up to ±lr, so elements are
    compared to 2% of lr, and one element in a thousand may be such noise (up to lr/4). The key third
    of qkv.bias has an exactly-zero gradient (softmax is shift-invariant): its steps are pure noise
    and it is left out. A different rule moves most elements; the losses and learning rates, which
    are compared exactly, catch it first."""
    if key.endswith("attn.qkv.bias"):
        dim = reference.shape[0] // 3
        mine, reference = torch.cat([mine[:dim], mine[2 * dim :]]), torch.cat([reference[:dim], reference[2 * dim :]])
    error = (mine - reference).abs() - 1e-4 * reference.abs()
    assert int((error > 0.02 * lr).sum()) <= max(1, error.numel() // 1000) and float(error.max()) <= lr / 4, key


def test_two_rank_steps_with_unequal_kept_counts_equal_the_official_ddp_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(TINY_CPU, [f"run.output_dir={tmp_path}", f"data.remote_root={tmp_path}", "train.total_steps=null",
                                 "train.epochs=1", f"train.epoch_size={EPOCH_SIZE}", f"train.batch_size_per_rank={PER_RANK}",
                                 f"train.grad_accum_steps={RANKS}", "optim.lr_reference_batch=256", "optim.base_lr=0.04",
                                 "optim.grad_clip=0.05", f"run.seed={SEED}"])
    assert (cfg.distill.teacher_drop, cfg.distill.teacher_drop_p, cfg.optim.clip_mode, cfg.optim.wd_groups) == ("lowest_loss", 0.5, "per_param", "official")
    assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.warmup_fraction, cfg.train.precision) == ((0.9, 0.99), 1e-15, 0.2, "fp32")
    lr_schedule, tnorm_schedule = official_schedules(cfg, world_size=1)
    kept: list[torch.Tensor] = []  # which pairs our lowest_loss kept, micro-batch by micro-batch
    ours_drop = objective_module.drop_coefficients

    def recording(*args, **kwargs) -> torch.Tensor:
        coefficients = ours_drop(*args, **kwargs)
        kept.append(coefficients > 0)
        return coefficients

    monkeypatch.setattr(objective_module, "drop_coefficients", recording)
    trainer = build_trainer(cfg, DistInfo(), check_run(cfg, DistInfo()), loader=None)
    teachers, teacher_outs = trainer.teachers, []  # the teachers' features of each micro-batch: an input of both sides

    def recorded_teachers(images: torch.Tensor, timed: object = None) -> dict:
        features = teachers(images, timed)
        teacher_outs.append({name: {token: value.detach().clone() for token, value in tokens.items()} for name, tokens in features.items()})
        return features

    trainer.teachers = recorded_teachers
    trainer.state.step = FIRST_STEP
    student = trainer.students[0]
    reference = copy.deepcopy(student.strategy.module)
    optimizer = torch.optim.AdamW(_official_param_groups(reference), lr=0, betas=(0.9, 0.99), eps=1e-15, fused=True)
    generator = torch.Generator().manual_seed(0)
    steps = [[torch.randn(PER_RANK, 3, 56, 56, generator=generator) for _ in range(RANKS)] for _ in range(STEPS)]
    ours = iter({"images": images, "dataset": ["synth_dino2"] * PER_RANK, "index": torch.arange(PER_RANK)} for rank_batches in steps for images in rank_batches)
    for it, rank_images in enumerate(steps, start=FIRST_STEP):
        loss = trainer.train_step(ours)[""]["loss"]
        assert student.strategy.optimizer.param_groups[0]["lr"] == pytest.approx(lr_schedule[it], rel=1e-13)
        rank_kept = kept[-RANKS:]
        assert len({int(k.sum()) for k in rank_kept}) == RANKS, "the ranks must keep different numbers of pairs"
        for index, group in enumerate(optimizer.param_groups):
            group["lr"] = lr_schedule[it]
            if index == 0:
                group["weight_decay"] = cfg.optim.weight_decay
        step_outs = teacher_outs[-RANKS:]
        targets: list[dict] = [{name: {} for name in step_outs[0]} for _ in range(RANKS)]
        for name, tokens in step_outs[0].items():
            for token in tokens:
                buffers = {"mean": reference.teacher_norms[name][token].running_mean, "std": reference.teacher_norms[name][token].running_std}
                standardised = _official_teacher_norm([out[name][token].float() for out in step_outs], token, buffers, tnorm_schedule[it])
                for rank in range(RANKS):
                    targets[rank][name][token] = standardised[rank]
        rank_losses = []
        for rank, images in enumerate(rank_images):
            student_out = reference(images)  # fp32, as the config says
            loss_tensor = _official_per_image_losses(student_out, targets[rank])
            hardest = loss_tensor.argmax(dim=0)  # lowest_loss never drops an image's hardest teacher
            assert rank_kept[rank][hardest, torch.arange(PER_RANK)].all()
            rank_losses.append(_official_rank_loss(loss_tensor, rank_kept[rank]))
            (rank_losses[-1] / RANKS).backward()  # DDP: the average of the ranks' gradients
        _official_clip(reference, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.testing.assert_close(loss, torch.stack(rank_losses).mean().detach(), rtol=1e-5, atol=0)
    mine = student.strategy.module.state_dict()
    for key, value in reference.state_dict().items():  # includes the teacher norms' running statistics
        _compare(mine[key], value, key, float(lr_schedule.max()))


@pytest.mark.parametrize("rule", ["default", "global"])
def test_each_rank_of_a_two_rank_job_normalises_by_what_the_rule_says(rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The objective every strategy's ranks compute with (built for 2 ranks), on two ranks' batches
    that keep different numbers of pairs (own+generic_data: an image of the generic domain trains
    every teacher): by default each rank's coefficients are the official ones whatever the other
    rank kept; ``distill.drop_normalise=global`` divides by the count of both. The collective is
    simulated: it adds the other rank's count."""
    cfg = load_config(TINY_CPU, ["distill.teacher_drop=own+generic_data", *(["distill.drop_normalise=global"] if rule == "global" else [])])
    names = [t.name for t in cfg.teachers.models]
    objective = build_objective(cfg, names, world_size=RANKS)
    domains = [["dino2"] * 4, ["dino2", "mast3r", "multihmr", "mast3r"]]  # kept: 12 and 6 (teacher, image) pairs
    kept = [torch.ones(3, 4, dtype=torch.bool), torch.tensor([[1, 0, 0, 0], [1, 1, 0, 1], [1, 0, 1, 0]], dtype=torch.bool)]
    generator = torch.Generator().manual_seed(0)
    for rank in range(RANKS):
        other = float(kept[1 - rank].sum())
        monkeypatch.setattr(dropping, "all_reduce_sum", lambda tensor, other=other: tensor.add_(other))
        student = {n: {"patch": torch.randn(4, 5, 64, generator=generator)} for n in names}
        teacher = {n: {"patch": torch.randn(4, 5, 64, generator=generator)} for n in names}
        stats = {n: {"patch": (torch.zeros(64), torch.ones(64))} for n in names}
        out = objective(student, teacher, stats, domains[rank])
        official = kept[rank].float() / kept[rank].sum()
        expected = official if rule == "default" else kept[rank].float() * RANKS / (kept[0].sum() + kept[1].sum())
        torch.testing.assert_close(out.coefficients, expected, rtol=0, atol=0)
        if rule == "default":
            torch.testing.assert_close(out.loss, _official_rank_loss(out.per_image, kept[rank]), rtol=1e-6, atol=0)
