"""A preset's GEMMs at decode batch sizes: cuBLAS (F.linear) against Inductor's autotuned
Triton templates, in us per call and TFLOP/s.

    python benchmarks/gemm_shapes.py --preset r1-distill-qwen-1.5b [--rows 64 128 256]
        [--inductor] [--cublaslt]

Each shape is one layer's linear (x [rows, K] times a [N, K] weight, bf16); calls are
replayed from a CUDA graph, so launch gaps do not count. `--inductor` also compiles the same
F.linear with `mode="max-autotune-no-cudagraphs"` (persistent TMA templates on), which picks
the fastest of cuBLAS and its Triton templates per shape; its column is that pick's time.
`--cublaslt` adds a column with torch's cuBLASLt backend (`preferred_blas_library`): the
algorithm cuBLASLt's heuristic picks, not a search over its algorithms. (PyTorch's TunableOp
searches only on ROCm; on CUDA its one candidate is the default cuBLAS call.)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from cuda_timing import graph_ms_per_call


def shapes(cfg) -> list[tuple[str, int, int]]:
    """(name, N, K) of one decoder layer's linears and the LM head (cfg: a ModelConfig)."""
    hidden, qkv_heads = cfg.hidden_size, cfg.num_heads + 2 * cfg.num_kv_heads
    return [("qkv", qkv_heads * cfg.head_dim, hidden), ("o", hidden, cfg.num_heads * cfg.head_dim),
            ("gate_up", 2 * cfg.intermediate_size, hidden), ("down", hidden, cfg.intermediate_size),
            ("lm_head", cfg.vocab_size, hidden)]


def _alternative_ms(kind: str, x: torch.Tensor, w: torch.Tensor) -> float:
    """ms per call of x @ w.T by another route than the default cuBLAS call, checked
    against it: Inductor's max-autotune pick or the cuBLASLt backend."""
    expected = F.linear(x, w)
    if kind == "inductor":
        torch._dynamo.reset()
        fn = torch.compile(lambda a, b: F.linear(a, b), mode="max-autotune-no-cudagraphs",
                           dynamic=False)
        call = lambda: fn(x, w)  # noqa: E731
    else:
        call = lambda: F.linear(x, w)  # noqa: E731
    previous = torch.backends.cuda.preferred_blas_library()
    try:
        if kind == "cublaslt":
            torch.backends.cuda.preferred_blas_library("cublaslt")
        torch.testing.assert_close(call(), expected, rtol=2e-2, atol=2e-2)
        return graph_ms_per_call(call)
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def main() -> None:
    from novainfer.models.config import ModelConfig
    from novainfer.presets import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=[p for p in PRESETS if p != "tiny"],
                        default="r1-distill-qwen-1.5b")
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--inductor", action="store_true")
    parser.add_argument("--cublaslt", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemm_shapes needs a CUDA device")
    dev = torch.device("cuda")
    if args.inductor:
        import torch._inductor.config as inductor

        inductor.triton.enable_persistent_tma_matmul = True
    print(f"{torch.cuda.get_device_name(dev)}, {args.preset}, bf16, us per call (TFLOP/s)")
    head = f"{'rows':>5} {'shape':<8} {'N':>7} {'K':>6} {'cuBLAS':>16}"
    extras = [name for name in ("inductor", "cublaslt") if getattr(args, name)]
    print(head + "".join(f" {name:>16} {'gain':>6}" for name in extras))
    cfg = ModelConfig.from_dict(PRESETS[args.preset])
    layers = cfg.num_layers
    totals = {}  # us per step: every layer's four linears and the LM head
    for rows in args.rows:
        for name, n, k in shapes(cfg):
            x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
            flop = 2 * rows * n * k
            base = graph_ms_per_call(lambda: F.linear(x, w)) * 1e3
            line = f"{rows:>5} {name:<8} {n:>7} {k:>6} {base:>7.1f} ({flop / base / 1e6:>5.0f})"
            weight = 1 if name == "lm_head" else layers
            totals[rows, "cuBLAS"] = totals.get((rows, "cuBLAS"), 0.0) + weight * base
            for extra in extras:
                best = _alternative_ms(extra, x, w) * 1e3
                totals[rows, extra] = totals.get((rows, extra), 0.0) + weight * best
                line += f" {best:>7.1f} ({flop / best / 1e6:>5.0f}) {base / best:>5.2f}x"
            print(line, flush=True)
    for rows in args.rows:
        line = f"{rows:>5} {'per step':<8} {'':>7} {'':>6} {totals[rows, 'cuBLAS']:>7.1f}"
        for extra in extras:
            line += f" {'':>8} {totals[rows, extra]:>7.1f}"
        print(line)


if __name__ == "__main__":
    main()
