"""Batch-1 linear layers: cuBLAS (F.linear) against novainfer's GEMV kernel (kernels/gemv.py).

For the weight shapes of the presets (and llama3-8b's tensor-parallel shards), one input
row, bf16: microseconds per call replayed in a CUDA graph, cycling over enough
copies of the weight that none is read from L2 (as in a decode step, where every layer's
weight is new), and the kernel's result against F.linear's. `--sweep` also times every
(BLOCK_N, BLOCK_K, warps) at one row and prints the best, for `gemv.config`. A second
table times the prologue: the separate residual add + RMSNorm and the GEMV against the one
fused kernel, for the layers the engine fuses it into (gemv-routed q/k/v and gate/up).

    python benchmarks/gemv.py [--sweep] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
from cuda_timing import ms_per_call

SHAPES = {  # name: (out_features n, in_features k)
    "qwen3-0.6b qkv": (4096, 1024), "qwen3-0.6b o": (1024, 2048),
    "qwen3-0.6b gate_up": (6144, 1024), "qwen3-0.6b down": (1024, 3072),
    "r1-1.5b qkv": (2048, 1536), "r1-1.5b o": (1536, 1536),
    "r1-1.5b gate_up": (17920, 1536), "r1-1.5b down": (1536, 8960),
    "llama3-8b qkv": (6144, 4096), "llama3-8b o": (4096, 4096),
    "llama3-8b gate_up": (28672, 4096), "llama3-8b down": (4096, 14336),
    "llama3-8b/2 qkv": (3072, 4096), "llama3-8b/2 o": (4096, 2048),
    "llama3-8b/2 gate_up": (14336, 4096), "llama3-8b/2 down": (4096, 7168),
}
CALLS = 64
L2_BYTES = 200 << 20  # read this much weight per replay: well beyond the 50-60 MB of L2


def _us_per_call(fn, weights, x) -> float:
    """Microseconds per call of fn(x, w) over the weights in turn, CALLS per graph replay."""
    for w in weights[:2]:
        fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(x, weights[i % len(weights)])
    # The best of five timings of four replays each.
    best = min(ms_per_call(graph.replay, 4, warmup=1) for _ in range(5)) * 1e3 / CALLS
    del graph
    return best


def main() -> None:
    import triton

    from novainfer.kernels import gemv
    from novainfer.layers.linear import gemv_fits

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    rows_out = []
    print(f"bf16 on {torch.cuda.get_device_name(0)}; us per call in a CUDA graph")
    print("| weight | n x k | engine routes it to gemv | F.linear us | gemv us | gemv TB/s | "
          "speed-up | max rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        copies = max(2, min(64, L2_BYTES // (n * k * 2)))
        weights = [torch.randn(n, k, device=device, dtype=dtype) / k**0.5 for _ in range(copies)]
        x = torch.randn(1, k, device=device, dtype=dtype)
        want = F.linear(x, weights[0]).float()
        got = gemv.gemv(x, weights[0]).float()
        err = float((got - want).abs().max() / want.abs().max())
        base = _us_per_call(lambda x, w: F.linear(x, w), weights, x)
        ours = _us_per_call(lambda x, w: gemv.gemv(x, w), weights, x)
        tbs = n * k * 2 / (ours * 1e-6) / 1e12
        fits = gemv_fits(k, n)
        row = {"weight": name, "n": n, "k": k, "routed": fits, "linear_us": round(base, 2),
               "gemv_us": round(ours, 2), "gemv_TBps": round(tbs, 2),
               "speedup": round(base / ours, 2), "rel_err": err}
        extra = ""
        if args.sweep:
            timed = {}
            for bn, bk, warps in itertools.product((2, 4, 8, 16), (128, 256, 512, 1024),
                                                   (2, 4, 8)):
                if bk <= triton.next_power_of_2(k):
                    timed[(bn, bk, warps)] = _us_per_call(
                        lambda x, w, b=(bn, bk, warps): gemv.gemv(x, w, block=b), weights, x)
            best = min(timed, key=timed.get)
            row["best_block"], row["best_us"] = list(best), round(timed[best], 2)
            extra = f" (best {row['best_block']}: {row['best_us']})"
        rows_out.append(row)
        print(f"| {name} | {n} x {k} | {fits} | {row['linear_us']} | {row['gemv_us']}{extra} | "
              f"{row['gemv_TBps']} | {row['speedup']}x | {err:.1e} |", flush=True)
        del weights
        torch.cuda.empty_cache()
    rows_out += _prologues(device, dtype)
    if args.json:
        print(json.dumps(rows_out))


def _prologues(device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Separate add + RMSNorm + GEMV against the fused kernel, us per call in a graph."""
    from novainfer.kernels import gemv
    from novainfer.layers.linear import gemv_fits
    from novainfer.layers.norm import add_rms_norm

    print("\n| weight | add + RMSNorm, then gemv us | fused us | speed-up | max rel err |")
    print("|---|---|---|---|---|")
    out = []
    for name, (n, k) in SHAPES.items():
        if not name.endswith(("qkv", "gate_up")) or not gemv_fits(k, n):
            continue
        copies = max(2, min(64, L2_BYTES // (n * k * 2)))
        weights = [torch.randn(n, k, device=device, dtype=dtype) / k**0.5 for _ in range(copies)]
        x, r = (torch.randn(1, k, device=device, dtype=dtype) for _ in range(2))
        nw = torch.rand(k, device=device, dtype=dtype) + 0.5

        def separate(x, w, r=r, nw=nw):
            return gemv.gemv(add_rms_norm(x, r, nw, 1e-6)[0], w)

        def fused(x, w, r=r, nw=nw):
            return gemv.gemv_add_rms_norm(x, r, nw, 1e-6, w)[0]
        want, got = separate(x, weights[0]).float(), fused(x, weights[0]).float()
        err = float((got - want).abs().max() / want.abs().max())
        base, ours = _us_per_call(separate, weights, x), _us_per_call(fused, weights, x)
        out.append({"weight": name, "prologue": "add_rms_norm", "separate_us": round(base, 2),
                    "fused_us": round(ours, 2), "rel_err": err})
        print(f"| {name} | {base:.2f} | {ours:.2f} | {base / ours:.2f}x | {err:.1e} |", flush=True)
        del weights
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    main()
