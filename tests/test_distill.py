"""The DUNE objective against DESIGN §1: loss values, teacher norm, teacher dropping, the student."""

from __future__ import annotations

import math

import pytest
import torch

from dune_scale.distill.dropping import drop_coefficients
from dune_scale.distill.losses import fused_distill_loss, reference_distill_loss
from dune_scale.distill.objective import DistillObjective
from dune_scale.distill.student import DuneStudent
from dune_scale.distill.teacher_norm import TeacherNorm, global_mean_std
from dune_scale.engine.schedules import cosine, warmup_cosine
from dune_scale.models.vit import VisionTransformer


def test_loss_matches_hand_computed_values() -> None:
    # Token 1: s=[1,0], t'=[0,1] → 0.5·(1−0) + 0.5·mean(0.5, 0.5) = 0.75
    # Token 2: s=[.5,.5], t'=[1,1] → 0.5·(1−1) + 0.5·mean(.125, .125) = 0.0625
    student = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]], requires_grad=True)
    teacher = torch.tensor([[[0.0, 2.0], [1.0, 2.0]]])
    mean, std = torch.zeros(2), torch.tensor([1.0, 2.0])
    loss = reference_distill_loss(student, teacher, mean, std)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx((0.75 + 0.0625) / 2)
    loss.sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_loss_standardises_with_clamped_std_and_mean() -> None:
    student = torch.tensor([[3.0, -1.0]])
    teacher = torch.tensor([[5.0 + 3e-3, 7.0 - 1.0]])
    mean, std = torch.tensor([5.0, 7.0]), torch.tensor([1e-6, 1.0])  # std 1e-6 → clamped to 1e-3
    # t' = [3, -1] = s → zero loss.
    assert reference_distill_loss(student, teacher, mean, std).item() == pytest.approx(0.0, abs=1e-6)
    # Class tokens (B, D) are one token each; weights and beta are honoured.
    s, t = torch.tensor([[0.0, 3.0]]), torch.tensor([[0.0, 0.0]])
    sl1 = (0.0 + (3.0 - 0.5)) / 2
    assert reference_distill_loss(s, t, torch.zeros(2), torch.ones(2), w_cos=0.0, w_sl1=1.0).item() == pytest.approx(sl1)
    assert reference_distill_loss(s, t, torch.zeros(2), torch.ones(2), w_cos=0.0, w_sl1=1.0, beta=4.0).item() == pytest.approx(9 / 8 / 2)


def test_fused_entry_point_falls_back_to_reference_on_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    mean, std = torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.5
    assert torch.equal(fused_distill_loss(s, t, mean, std), reference_distill_loss(s, t, mean, std))
    with pytest.raises(ValueError, match="differ in shape"):
        reference_distill_loss(s, t[:, :4], mean, std)


def test_teacher_norm_batch_stats_ema_and_eval() -> None:
    g = torch.Generator().manual_seed(1)
    patch = torch.randn(4, 6, 3, generator=g) * 5 + 2
    mean, std = global_mean_std(patch)
    rows = patch.reshape(-1, 3)
    torch.testing.assert_close(mean, rows.mean(0))
    torch.testing.assert_close(std, rows.std(0, unbiased=True))  # patch: over batch × tokens
    cls = torch.randn(4, 3, generator=g)
    torch.testing.assert_close(global_mean_std(cls)[1], cls.std(0, unbiased=True))  # cls: over batch

    norm = TeacherNorm(3)
    used_mean, used_std = norm.stats(patch, momentum=1.0)  # m = 1: running = first batch
    torch.testing.assert_close(norm.running_mean, mean)
    torch.testing.assert_close(used_std, std)
    later = torch.randn(4, 6, 3, generator=g)
    m2, s2 = global_mean_std(later)
    norm.stats(later, momentum=0.25)
    torch.testing.assert_close(norm.running_mean, 0.75 * mean + 0.25 * m2)
    torch.testing.assert_close(norm.running_std, 0.75 * std + 0.25 * s2)
    norm.eval()
    eval_mean, eval_std = norm.stats(torch.randn(2, 3, 3, generator=g), momentum=1.0)
    torch.testing.assert_close(eval_mean, 0.75 * mean + 0.25 * m2)  # eval: running stats, unchanged
    torch.testing.assert_close(norm.running_std, 0.75 * std + 0.25 * s2)


def test_momentum_schedule_is_cosine_from_one_to_0001() -> None:
    assert cosine(0, 100, 1.0, 0.001) == pytest.approx(1.0)
    assert cosine(50, 100, 1.0, 0.001) == pytest.approx(0.5005)
    assert cosine(100, 100, 1.0, 0.001) == pytest.approx(0.001)
    assert cosine(500, 100, 1.0, 0.001) == pytest.approx(0.001)
    # lr: np.linspace(0, peak, 20) over 20 steps (step 19 is at the peak), then cosine to the floor.
    assert warmup_cosine(0, 100, 1.0, 1e-6, 20) == 0.0
    assert warmup_cosine(10, 100, 1.0, 1e-6, 20) == pytest.approx(10 / 19)
    assert warmup_cosine(19, 100, 1.0, 1e-6, 20) == warmup_cosine(20, 100, 1.0, 1e-6, 20) == 1.0
    assert warmup_cosine(100, 100, 1.0, 1e-6, 20) == pytest.approx(1e-6)
    assert warmup_cosine(0, 100, 1.0, 1e-6, 1) == 0.0  # linspace(0, peak, 1) is [0]


LOSSES = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.7, 0.2, 0.6, 0.3], [0.3, 0.1, 0.4, 0.8]])  # [teachers, B]


def _drop(losses: torch.Tensor, method: str, p: float = 0.5, generator: torch.Generator | None = None,
          teacher_domains: tuple[str, ...] = (), sample_domains: tuple[str, ...] = ()) -> torch.Tensor:
    return drop_coefficients(losses, method, p, generator, teacher_domains, sample_domains, "dino2", normalise="per_rank", world_size=1)


def test_dropping_none_averages_everything() -> None:
    coeff = _drop(LOSSES, "none")
    assert torch.allclose(coeff, torch.full_like(LOSSES, 1 / 12))


def test_lowest_loss_always_keeps_the_hardest_teacher() -> None:
    only_hardest = _drop(LOSSES, "lowest_loss", p=1.0)
    expected = torch.zeros_like(LOSSES)
    expected[LOSSES.argmax(0), torch.arange(4)] = 0.25
    assert torch.equal(only_hardest, expected)
    assert torch.allclose(_drop(LOSSES, "lowest_loss", p=0.0), torch.full_like(LOSSES, 1 / 12))
    # p = 0.5: the hardest is kept, each other one with probability 1/2; sums to 1 (detached).
    big = torch.rand(3, 4000, generator=torch.Generator().manual_seed(0))
    coeff = _drop(big.requires_grad_(), "lowest_loss", p=0.5, generator=torch.Generator().manual_seed(1))
    assert not coeff.requires_grad and coeff.sum().item() == pytest.approx(1.0)
    kept = coeff > 0
    assert kept[big.argmax(0), torch.arange(4000)].all()
    assert kept.sum().item() / 4000 == pytest.approx(1 + 2 * 0.5, abs=0.05)


def test_own_data_and_generic_data() -> None:
    teachers = ["dino2", "mast3r", "multihmr"]
    samples = ["mast3r", "dino2", "multihmr", "unowned"]
    own = _drop(LOSSES, "own_data", teacher_domains=tuple(teachers), sample_domains=tuple(samples)) > 0
    assert own.tolist() == [[False, True, False, True], [True, False, False, True], [False, False, True, True]]
    generic = _drop(LOSSES, "own+generic_data", teacher_domains=tuple(teachers), sample_domains=tuple(samples)) > 0
    assert generic.tolist() == [[False, True, False, True], [True, True, False, True], [False, True, True, True]]
    assert _drop(LOSSES, "own_data", teacher_domains=tuple(teachers), sample_domains=tuple(samples)).sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown teacher-dropping method"):
        _drop(LOSSES, "random")


def _tiny_student() -> DuneStudent:
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=42, patch_size=14, embed_dim=32, depth=2, num_heads=4, num_register_tokens=4)
    return DuneStudent(encoder, {"a": 24, "b": 40}, {"a": ("cls", "patch"), "b": ("patch",)})


def test_student_outputs_per_teacher_tokens_without_registers() -> None:
    student = _tiny_student()
    out = student(torch.randn(2, 3, 56, 42))  # 4×3 grid, pos-embed resampled
    assert set(out) == {"a", "b"}
    assert out["a"]["cls"].shape == (2, 24) and out["a"]["patch"].shape == (2, 12, 24)
    assert set(out["b"]) == {"patch"} and out["b"]["patch"].shape == (2, 12, 40)
    # Projectors see [cls, patches] of the un-normalised encoder tokens (registers dropped).
    tokens = student.encoder.forward_tokens(torch.zeros(1, 3, 42, 42))
    projected = student.projectors["b"](torch.cat([tokens[:, :1], tokens[:, 5:]], 1))
    torch.testing.assert_close(student(torch.zeros(1, 3, 42, 42))["b"]["patch"], projected[:, 1:])
    assert "teacher_norms.a.cls.running_mean" in student.state_dict()


def test_objective_combines_tokens_teachers_and_dropping() -> None:
    student = _tiny_student()
    images = torch.randn(3, 3, 42, 42)
    preds = student(images)
    g = torch.Generator().manual_seed(2)
    teacher = {"a": {"cls": torch.randn(3, 24, generator=g), "patch": torch.randn(3, 9, 24, generator=g)},
               "b": {"patch": torch.randn(3, 9, 40, generator=g)}}
    objective = DistillObjective(
        ["a", "b"], ["dino2", "mast3r"], drop_method="none", drop_p=0.5, generic_domain="dino2", drop_normalise="per_rank", norm_eps=1e-3,
        w_cos=0.5, w_sl1=0.5, beta=1.0, loss_fn=reference_distill_loss, world_size=1,
    )
    stats = objective.teacher_statistics([teacher], student.teacher_norms, momentum=1.0)
    out = objective(preds, teacher, stats)
    norms = student.teacher_norms
    per_a = (reference_distill_loss(preds["a"]["cls"], teacher["a"]["cls"], norms.a.cls.running_mean, norms.a.cls.running_std)
             + reference_distill_loss(preds["a"]["patch"], teacher["a"]["patch"], norms.a.patch.running_mean, norms.a.patch.running_std)) / 2
    torch.testing.assert_close(out.per_image[0], per_a.detach())
    assert out.loss.item() == pytest.approx(out.per_image.mean().item(), rel=1e-6)
    out.loss.backward()
    assert all(p.grad is not None for p in student.encoder.parameters() if p.requires_grad)
    assert math.isclose(out.coefficients.sum().item(), 1.0, rel_tol=1e-6)
