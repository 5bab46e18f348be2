"""How the frozen teachers compute: weight dtype, autocast dtype, FP8 linears, compilation.

``teachers.dtype`` is the precision of the GEMMs (``auto``: bf16 on CUDA, fp32 on CPU; ``fp8``:
torchao's float8 linears with per-row dynamic scales, bf16 elsewhere). ``teachers.residual`` is
what everything else keeps: ``fp32`` (the official DUNE code: teacher weights fp32 under bf16
autocast, so norms, layer-scale gammas, positional embeddings and the 24-block residual stream stay
fp32) or ``bf16`` (the whole teacher cast to bf16: less memory and bandwidth, slightly further from
the official features; BENCHMARKS.md measures by how much).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dune_scale.config import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.bfloat16}
FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (sm_89), Hopper (sm_90) and later


@dataclass(frozen=True)
class TeacherPrecision:
    param_dtype: torch.dtype  # the weights (and with them norms, gammas, positional embeddings)
    compute_dtype: torch.dtype  # autocast's dtype; fp32 = no autocast
    fp8: bool = False  # nn.Linear layers quantised to float8 (torchao)


def resolve_teacher_precision(dtype: str, residual: str, device: torch.device) -> TeacherPrecision:
    """The precision ``teachers.dtype`` / ``teachers.residual`` ask for on ``device``; ConfigError
    (naming the key) where the device cannot run it."""
    if dtype == "fp8":
        check_fp8_supported(device)
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    compute = _DTYPES[dtype]
    param = torch.float32 if residual == "fp32" else compute
    return TeacherPrecision(param_dtype=param, compute_dtype=compute, fp8=dtype == "fp8")


def check_fp8_supported(device: torch.device) -> None:
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"teachers.dtype: 'fp8' is not allowed here; {why} (use bf16 or auto)")

    if device.type != "cuda":
        raise refuse(f"FP8 teachers need a CUDA GPU with compute capability ≥ 8.9, this run is on {device.type}")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise refuse(f"{name} has compute capability {capability[0]}.{capability[1]}; FP8 needs ≥ 8.9 (Ada, Hopper or later)")
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        raise refuse("FP8 teachers use torchao's float8 inference, and torchao is not installed (pip install torchao)") from None


def quantize_linears_fp8(teacher: nn.Module) -> None:
    """Every nn.Linear of ``teacher`` → float8 e4m3 weights and dynamically quantised activations,
    one scale per row (torchao; its per-row kernels take bf16 weights, so linears are cast first)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    for module in teacher.modules():
        if isinstance(module, nn.Linear):
            module.to(torch.bfloat16)
    quantize_(teacher, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


def compile_frozen_blocks(blocks: nn.ModuleList) -> None:
    """Compile each block in place (static shapes: a frozen teacher at a fixed resolution). Token
    preparation stays eager, where the per-grid caches live; identical blocks share one graph."""
    for block in blocks:
        block.compile(dynamic=False)
