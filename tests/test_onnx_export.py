"""ONNX export (``--format onnx``, ``--format hf --with-onnx``) run by ONNX Runtime on CPU against
the PyTorch encoder, ``--dynamic`` at three sizes, and ``--resolution`` for every format (the
positional embedding resampled once, at export, by the encoder's own rule)."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime
import pytest
import torch

from dune_scale import load_encoder
from dune_scale.cli.export import main as export_main
from dune_scale.engine.export import DuneEncoder, StudentSpec, StudentWeights, write_hf
from dune_scale.models.vit import VisionTransformer

SIZE = 28  # the tiny student's training size: a 2×2 token grid
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An hf folder (it records the spec of a custom width) of a tiny student whose positional
    table, tokens and layer scales are all far from their initial values."""
    spec = StudentSpec(32, 2, 2, 14, 4, SIZE, 1e-4, {"dino2reg_vitlarge_14": 64}, {"dino2reg_vitlarge_14": ["cls", "patch"]}, 1, 4.0)
    torch.manual_seed(0)
    student = spec.build_student()
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            if "gamma" in name or name.endswith(("pos_embed", "cls_token", "register_tokens")):
                tensor.copy_(torch.randn_like(tensor))
    folder = tmp_path_factory.mktemp("onnx") / "tiny"
    return write_hf(StudentWeights(student.state_dict(), folder, recorded_spec=spec), folder)


def images(height: int, width: int, batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def largest_difference(model: Path, encoder: DuneEncoder, height: int, width: int) -> float:
    """max |ONNX Runtime − PyTorch| over cls and patch tokens of random images (batch 3: not the traced 2)."""
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = images(height, width)
    cls, patch = session.run(["cls", "patch"], {"images": x.numpy()})
    with torch.no_grad():
        expected = encoder.forward_features(x)
    return max((torch.from_numpy(cls) - expected["cls"]).abs().max().item(), (torch.from_numpy(patch) - expected["patch"]).abs().max().item())


def input_shape(model: Path) -> list:
    return onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()[0].shape


def test_dynamic_graph_matches_the_encoder_at_three_sizes(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "dynamic.onnx"
    assert export_main([str(source), "--format", "onnx", "--dynamic", "--out", str(out)]) == 0
    assert all(isinstance(side, str) for side in input_shape(out)[2:])  # H and W are symbols, not the traced 28
    encoder = load_encoder(source)
    for height, width in ((SIZE, SIZE), (42, 70), (98, 14)):  # the stored table, then resampled up and down
        assert largest_difference(out, encoder, height, width) <= TOLERANCE, (height, width)


def test_fixed_graph_at_a_resolution_matches_the_encoder_there(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "fixed.onnx"
    assert export_main([str(source), "--format", "onnx", "--resolution", "42x70", "--out", str(out)]) == 0
    assert input_shape(out)[1:] == [3, 42, 70]
    assert largest_difference(out, load_encoder(source), 42, 70) <= TOLERANCE


@torch.no_grad()
def test_resolution_resamples_once_for_every_format_and_the_card_says_so(source: Path, tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    original = load_encoder(source)
    x = images(42, 42)
    at_42 = original.forward_features(x)  # the training code's resampling at 42 px
    hf = tmp_path / "hf42"
    assert export_main([str(source), "--format", "hf", "--with-onnx", "--resolution", "42", "--out", str(hf)]) == 0
    assert json.loads((hf / "config.json").read_text())["image_size"] == 42
    assert "resampled at export from the 28 px it was trained at" in (hf / "README.md").read_text()
    assert torch.equal(load_encoder(hf).forward_features(x)["patch"], at_42["patch"])
    assert input_shape(hf / "model.onnx")[1:] == [3, 42, 42]
    assert largest_difference(hf / "model.onnx", original, 42, 42) <= TOLERANCE

    assert export_main([str(source), "--format", "timm", "--resolution", "42", "--out", str(tmp_path / "timm42")]) == 0
    model = timm.create_model(f"local-dir:{tmp_path / 'timm42'}", pretrained=True).eval()
    assert torch.equal(model.forward_features(x)[:, 5:], original.vit.forward_features(x)["patch"])
    # The official .pth at a resolution: test_export (its loader needs a named architecture).


def test_dynamic_is_refused_with_the_reason_when_onnx_cannot_resample_as_training_does() -> None:
    """An antialiased resampling (a DINOv2 option the student does not use) has no ONNX equivalent:
    the check at export finds the difference and names it."""
    from dune_scale.engine.export import StudentFileError
    from dune_scale.engine.export.onnx_graph import check_dynamic_resampling

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=56, patch_size=14, embed_dim=16, depth=1, num_heads=2, interpolate_antialias=True)
    with pytest.raises(StudentFileError, match=r"--dynamic refused: .*at a 3x7 token grid it differs from the training rule by"):
        check_dynamic_resampling(vit)
