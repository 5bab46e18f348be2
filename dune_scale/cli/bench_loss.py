"""GPU benchmark of the DUNE projector loss, forward + backward, at production shapes.

Compares the fused Triton kernels with the eager ``reference_distill_loss`` and with
``torch.compile`` of it (B = 128 images, N = 577 / 1025 tokens, D = 1024, bf16 by default). The
loss is memory-bound, so each time is also given as effective bandwidth: the bytes a fused
implementation must move (forward reads S and T, backward reads S and T and writes dS: 5·B·N·D
elements) over the time, next to the card's device-to-device copy bandwidth measured in the same run.

    python launch/bench_loss.py --out bench_distill_loss.json

Needs a CUDA GPU: without one it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON to this path")
    parser.add_argument("--batch", type=int, default=128, help="images per step (default 128)")
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[577, 1025], help="tokens per image (default 577 1025)"
    )
    parser.add_argument("--dim", type=int, default=1024, help="teacher feature dim (default 1024)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="feature dtype (default bf16)")
    parser.add_argument("--iters", type=int, default=30, help="timed steps per implementation (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first, compilation included (default 5)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    return parser.parse_args(argv)


def _median_ms(step: Callable[[], object], iters: int, warmup: int) -> float:
    """Median over per-step CUDA event pairs: robust to a stray slow step, warm-up excluded."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in pairs:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs)


def _host_ms(step: Callable[[], object], iters: int) -> float:
    """Host time to issue one step (Python, autograd, launches), measured while the device queue is
    kept busy: when it is close to the device time, a shape is launch-bound, not bandwidth-bound."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    return issued / iters * 1e3


def _graph_ms(
    fn: LossFn, inputs: tuple[torch.Tensor, ...], iters: int, warmup: int
) -> tuple[float | None, str | None]:
    """Device time of one step replayed as a CUDA graph: no host work in between, so this is the
    kernel-side time even where issuing the step is slower than running it. The step runs on a
    fresh student leaf made on the capture's side stream (a leaf first used on another stream
    breaks capture). ``(None, why)`` where the step cannot be captured (e.g. a compiled function's
    guards)."""
    student, *rest = inputs
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            leaf = student.detach().clone().requires_grad_()
            for _ in range(3):  # warm-up on a side stream, as capture requires
                _step(fn, leaf, *rest)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _step(fn, leaf, *rest)
    except RuntimeError as err:
        torch.cuda.synchronize()
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return _median_ms(graph.replay, iters, warmup), None


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time) of a 1 GiB buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), iters=20, warmup=3)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _inputs(bsz: int, n_tok: int, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn(bsz, n_tok, dim, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    teacher = (torch.randn(bsz, n_tok, dim, device="cuda", generator=gen) * 2 + 0.5).to(dtype)
    mean = torch.randn(dim, device="cuda", generator=gen) * 0.1
    std = torch.rand(dim, device="cuda", generator=gen) + 0.5
    grad = torch.randn(bsz, device="cuda", generator=gen)
    return student, teacher, mean, std, grad


def _step(
    fn: LossFn, student: torch.Tensor, teacher: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    loss = fn(student, teacher, mean, std)
    (ds,) = torch.autograd.grad(loss, student, grad)
    return loss, ds


def _peak_mib(run: Callable[[], object]) -> float:
    """Memory one step allocates beyond what is live before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_shape(
    impls: dict[str, LossFn],
    bsz: int,
    n_tok: int,
    dim: int,
    dtype: torch.dtype,
    args: argparse.Namespace,
    copy_gbps: float,
) -> tuple[list[dict], dict]:
    """Time every implementation on one shape; check the fused result against the eager one first."""
    student, teacher, mean, std, grad = _inputs(bsz, n_tok, dim, dtype)
    ref_loss, ref_ds = _step(impls["eager"], student, teacher, mean, std, grad)
    loss, ds = _step(impls["triton"], student, teacher, mean, std, grad)
    loss_err = ((loss - ref_loss).abs().max() / ref_loss.abs().max()).item()
    grad_err = ((ds.float() - ref_ds.float()).abs().max() / ref_ds.float().abs().max()).item()
    # One bf16 ulp is 2^-8 relative: both sides round once, the fp32 math before that is far finer.
    ok = loss_err < 1e-5 and grad_err < 1e-2
    check = {"tokens": n_tok, "loss_rel_err": loss_err, "grad_rel_err": grad_err, "ok": ok}

    ideal_bytes = 5 * bsz * n_tok * dim * student.element_size()
    rows = []
    for name, fn in impls.items():
        t0 = time.perf_counter()
        ms = _median_ms(lambda fn=fn: _step(fn, student, teacher, mean, std, grad), args.iters, args.warmup)
        gbps = ideal_bytes / (ms * 1e-3) / 1e9
        rows.append(
            {
                "tokens": n_tok,
                "impl": name,
                "ms": ms,
                "effective_GBps": gbps,
                "pct_copy_bw": 100 * gbps / copy_gbps,
                "host_ms": _host_ms(lambda fn=fn: _step(fn, student, teacher, mean, std, grad), args.iters),
                **_graph_columns(fn, (student, teacher, mean, std, grad), args, ideal_bytes, copy_gbps, name),
                "peak_extra_MiB": _peak_mib(lambda fn=fn: _step(fn, student, teacher, mean, std, grad)),
                "wall_s_incl_warmup": time.perf_counter() - t0,
            }
        )
    eager_ms = next(r["ms"] for r in rows if r["impl"] == "eager")
    for row in rows:
        row["speedup_vs_eager"] = eager_ms / row["ms"]
    return rows, check


def _graph_columns(
    fn: LossFn, inputs: tuple[torch.Tensor, ...], args: argparse.Namespace, ideal_bytes: int, copy_gbps: float, name: str
) -> dict[str, float | str | None]:
    """The CUDA-graph time and the bandwidth share it gives (the kernels' own, without the host)."""
    if name == "compile":
        return {"graph_ms": None, "graph_pct_copy_bw": None, "graph_error": "not captured: compiled function"}
    ms, error = _graph_ms(fn, inputs, args.iters, 2)
    share = None if ms is None else 100 * ideal_bytes / (ms * 1e-3) / 1e9 / copy_gbps
    return {"graph_ms": ms, "graph_pct_copy_bw": share, "graph_error": error}


def markdown(rows: list[dict], copy_gbps: float) -> str:
    lines = [
        f"device-to-device copy: {copy_gbps:.0f} GB/s",
        "",
        "| tokens | impl | fwd+bwd ms | host ms | CUDA-graph ms | effective GB/s | % of copy BW | graph % of copy BW "
        "| speedup vs eager | extra peak MiB |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        graph_ms, graph_share = r.get("graph_ms"), r.get("graph_pct_copy_bw")
        lines.append(
            f"| {r['tokens']} | {r['impl']} | {r['ms']:.3f} | {r['host_ms']:.3f} | "
            f"{'—' if graph_ms is None else format(graph_ms, '.3f')} | {r['effective_GBps']:.0f} | {r['pct_copy_bw']:.1f} "
            f"| {'—' if graph_share is None else format(graph_share, '.1f')} | {r['speedup_vs_eager']:.2f}x | {r['peak_extra_MiB']:.0f} |"
        )
    failed = [f"N={r['tokens']} {r['impl']}: {r['graph_error']}" for r in rows if r.get("graph_error") and r["impl"] != "compile"]
    return "\n".join(lines + ([f"not captured as a CUDA graph: {'; '.join(failed)}"] if failed else []))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_distill_loss: no CUDA GPU here, nothing was measured (it needs one).", file=sys.stderr)
        return 2
    from kernels import triton_available

    if not triton_available():
        print("bench_distill_loss: triton is not importable, nothing was measured.", file=sys.stderr)
        return 2
    from dune_scale.distill.losses import reference_distill_loss
    from kernels.distill_loss import triton_distill_loss

    impls: dict[str, LossFn] = {"eager": reference_distill_loss, "triton": triton_distill_loss}
    if not args.no_compile:
        impls["compile"] = torch.compile(reference_distill_loss, dynamic=False)  # one graph per shape
    dtype = DTYPES[args.dtype]
    copy_gbps = copy_bandwidth_gbps()
    rows, checks = [], []
    for n_tok in args.tokens:
        shape_rows, check = bench_shape(impls, args.batch, n_tok, args.dim, dtype, args, copy_gbps)
        rows += shape_rows
        checks.append(check)
        torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()}, B={args.batch}, D={args.dim}, {args.dtype}, forward + backward")
    print(markdown(rows, copy_gbps))
    for check in checks:
        status = "ok" if check["ok"] else "MISMATCH"
        print(
            f"N={check['tokens']}: triton vs eager: loss {check['loss_rel_err']:.2e}, "
            f"grad {check['grad_rel_err']:.2e} ({status})"
        )
    if args.out is not None:
        import triton

        result = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "batch": args.batch,
            "dim": args.dim,
            "dtype": args.dtype,
            "iters": args.iters,
            "copy_GBps": copy_gbps,
            "results": rows,
            "checks": checks,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(check["ok"] for check in checks) else 1
