"""A/B micro-benchmark: two implementations of one op over a batch x sequence-length grid.

    python benchmarks/ab.py --list
    python benchmarks/ab.py qkv-split                      # default grid (batch 1..64 x seq 128..4096)
    python benchmarks/ab.py rmsnorm-residual --batch 1,4 --seq-len 128,512 --repeats 50 --out /tmp/ab
    python benchmarks/ab.py fused-ops                      # eager vs compile vs triton, 1..512 tokens
    python benchmarks/ab.py top-k-filter --batch 1,64,256 --seq-len 32000,151936  # sampler
    python benchmarks/ab.py top-p-filter --batch 1,64,256 --seq-len 151936
    python benchmarks/ab.py attention                      # every attention backend (ab_attention.py)

Per cell: warm-up, then `--repeats` timed runs (CUDA events on the GPU, perf_counter on the
CPU) of `--inner` calls each; the median of A and of B, their spread (interquartile range
relative to the median) and the improvement of B over A (positive = B faster). Summary:
average, best and worst improvement, standard deviation over cells, and every regression
that is larger than the cell's measured noise: the larger of an A-vs-A null run of the same
cell (what the timer sees when nothing changed) and the 95% bootstrap interval of the
improvement itself (so two equal ops are called a regression in ~1 cell in 40, not 1 in 3). Markdown table (+ JSON) and a PNG heatmap into --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# A comparison: make(batch, seq_len, device, dtype) -> (fn_a, fn_b), each called with no args.
Maker = Callable[[int, int, torch.device, torch.dtype], tuple[Callable[[], object], Callable[[], object]]]


@dataclass
class Comparison:
    name: str
    label_a: str
    label_b: str
    make: Maker
    description: str = ""


# ---------------------------------------------------------------------------- shipped pairs


def _qkv_shapes(hidden: int = 4096, heads: int = 32, kv_heads: int = 8, head_dim: int = 128):
    return heads * head_dim, kv_heads * head_dim


def make_qkv_split(batch: int, seq_len: int, device: torch.device, dtype: torch.dtype, *,
                   heads: int = 32, kv_heads: int = 8, head_dim: int = 128):
    """QKV output split with sizes computed per call (A) vs cached at construction (B, seed 004)."""
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(batch * seq_len, q_size + 2 * kv_size, device=device, dtype=dtype)

    class PerCall:
        def __init__(self) -> None:
            self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim

        def split(self, x):
            return x.split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                            self.num_kv_heads * self.head_dim], dim=-1)

    class Cached:
        def __init__(self) -> None:
            self.sizes = [q_size, kv_size, kv_size]

        def split(self, x):
            return x.split(self.sizes, dim=-1)

    a, b = PerCall(), Cached()

    def run_a():
        q, k, v = a.split(qkv)
        return v.contiguous()

    def run_b():
        q, k, v = b.split(qkv)
        return v.contiguous()

    return run_a, run_b


def make_rmsnorm_residual(batch: int, seq_len: int, device: torch.device, dtype: torch.dtype, *,
                          hidden: int = 4096):
    """Residual add then RMSNorm as two ops (A) vs novainfer's fused add_rms_norm (B)."""
    from novainfer.layers.norm import add_rms_norm, rms_norm

    x = torch.randn(batch * seq_len, hidden, device=device, dtype=dtype)
    residual = torch.randn_like(x)
    weight = torch.ones(hidden, device=device, dtype=dtype)

    def run_a():
        r = x + residual
        return rms_norm(r, weight, 1e-6), r

    def run_b():
        return add_rms_norm(x, residual, weight, 1e-6)

    return run_a, run_b


def make_top_k_filter(batch: int, seq_len: int, device: torch.device, dtype: torch.dtype, *,
                      top_k: int = 50, top_p: float = 0.9):
    """The sampler's top-k + top-p over a full-vocabulary sort (A) vs over `topk`'s
    candidates (B). Here `batch` is the rows that sample and `seq_len` the vocabulary; the
    logits are float32 whatever --dtype says (the sampler filters widened logits)."""
    from novainfer.engine import sampler

    del dtype
    logits = torch.randn(batch, seq_len, device=device, dtype=torch.float32) * 3
    ks, ps = [top_k] * batch, [top_p] * batch
    width = sampler.candidate_width(top_k, seq_len)
    return (lambda: sampler._top_k_top_p_sorted(logits, ks, ps),
            lambda: sampler._top_k_top_p_candidates(logits, ks, ps, width))


def make_top_p_filter(batch: int, seq_len: int, device: torch.device, dtype: torch.dtype, *,
                      top_p: float = 0.9):
    """The sampler's top-p alone over a full-vocabulary sort (A) vs the radix search for
    the cut (B, kernels/top_p.py; CUDA or the Triton interpreter). Here `batch` is the
    rows that sample and `seq_len` the vocabulary; float32 logits as the sampler filters."""
    from novainfer.engine import sampler
    from novainfer.kernels.top_p import top_p_filter_triton

    del dtype
    logits = torch.randn(batch, seq_len, device=device, dtype=torch.float32) * 3
    ps = [top_p] * batch
    p = torch.full((batch,), top_p, device=device)
    return (lambda: sampler._top_k_top_p_sorted(logits, [-1] * batch, ps),
            lambda: top_p_filter_triton(logits, p))


COMPARISONS: dict[str, Comparison] = {
    "qkv-split": Comparison("qkv-split", "split sizes per call", "split sizes cached",
                            make_qkv_split, "Llama-3-8B attention shapes (32 q / 8 kv heads x 128)"),
    "rmsnorm-residual": Comparison("rmsnorm-residual", "add + rms_norm", "fused add_rms_norm",
                                   make_rmsnorm_residual, "hidden 4096"),
    "top-k-filter": Comparison("top-k-filter", "vocabulary sort", "topk candidates",
                               make_top_k_filter, "top_k 50 + top_p 0.9; --batch = rows, "
                               "--seq-len = vocabulary (e.g. --batch 1,64,256 --seq-len "
                               "32000,151936)"),
    "top-p-filter": Comparison("top-p-filter", "vocabulary sort", "radix search",
                               make_top_p_filter, "top_p 0.9 alone; --batch = rows, "
                               "--seq-len = vocabulary"),
}

# ---------------------------------------------------------------------------- fused ops, 3 ways

# hidden size, intermediate size, (q heads, head_dim) of the q/k norm or None.
FUSED_MODELS = {"qwen3-0.6b": (1024, 3072, (16, 128)), "llama3-8b": (4096, 14336, None)}
FUSED_VARIANTS = ("eager", "compile", "triton")
FUSED_OPS = ("add_rms_norm", "rms_norm", "qk_rms_norm", "qk_norm_rope", "silu_and_mul")


_COMPILED: dict[Callable, Callable] = {}


def _compiled(fn: Callable) -> Callable:
    """torch.compile(fn) as layers/fusion.py makes it, once per function: every batch size
    reuses it, as the engine does."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED[fn]


def fused_op_calls(op: str, rows: int, model: str, device: torch.device, dtype: torch.dtype,
                   variants: list[str]) -> dict[str, Callable[[], object]] | None:
    """One no-argument call per variant of `op` on `rows` tokens of `model`'s shapes: eager
    (the PyTorch reference), compile (torch.compile of it, as layers/fusion.py does), triton
    (kernels/norm_act.py). None where the model has no such op (llama: no q/k norm)."""
    from novainfer.layers import activation, norm
    from novainfer.layers.fusion import triton_op

    hidden, inter, qk = FUSED_MODELS[model]
    gen = torch.Generator().manual_seed(rows)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if op in ("qk_rms_norm", "qk_norm_rope"):
        if qk is None:
            return None
        heads, head_dim = qk
        qkv = rnd(rows, (heads + 2 * (heads // 2)) * head_dim)  # q is a view, as in the model
        q = qkv[:, : heads * head_dim].view(rows, heads, head_dim)
        if op == "qk_norm_rope":
            return _qk_norm_rope_calls(qkv, q, heads, head_dim, rows, device, variants)
        args, fn = (q, rnd(head_dim), 1e-6), norm.rms_norm
    elif op == "silu_and_mul":
        args, fn = (rnd(rows, 2 * inter),), activation.silu_and_mul
    elif op == "rms_norm":
        args, fn = (rnd(rows, hidden), rnd(hidden), 1e-6), norm.rms_norm
    else:
        args, fn = (rnd(rows, hidden), rnd(rows, hidden), rnd(hidden), 1e-6), norm.add_rms_norm
    impls = {"eager": lambda: fn.reference}
    impls["compile"] = lambda: _compiled(fn.reference)
    impls["triton"] = lambda: triton_op(fn.triton_name)
    calls = {}
    for name in variants:
        impl = impls[name]()
        calls[name] = lambda impl=impl: impl(*args)
    return calls


def _qk_norm_rope_calls(qkv, q, heads, head_dim, rows, device, variants):
    """q/k norm + rotary: the three ops (eager; each compiled, as the model runs them under
    compile) against the one Triton launch."""
    from novainfer.layers import norm, rotary
    from novainfer.layers.fusion import triton_op

    k = qkv[:, heads * head_dim : heads * head_dim * 3 // 2].view(rows, heads // 2, head_dim)
    rope = rotary.RotaryEmbedding(head_dim, 4096, 1e6, {}).to(device)
    pos = torch.randint(0, 4096, (rows,), device=device)
    w = torch.ones(head_dim, device=device, dtype=q.dtype)
    args = (q, k, pos, w, w, 1e-6, rope.cos, rope.sin)
    calls = {}
    if "eager" in variants:
        calls["eager"] = lambda: rotary.qk_norm_rope_reference(*args)
    if "compile" in variants:
        c_norm, c_rope = _compiled(norm.rms_norm.reference), _compiled(rotary.apply_rope.reference)
        calls["compile"] = lambda: c_rope(c_norm(q, w, 1e-6), c_norm(k, w, 1e-6), pos,
                                          rope.cos, rope.sin)
    if "triton" in variants:
        fused = triton_op("qk_norm_rope")
        calls["triton"] = lambda: fused(*args)
    return calls


def run_fused_ops(batches: list[int], models: list[str], variants: list[str],
                  device: torch.device, dtype: torch.dtype, warmup: int, repeats: int,
                  inner: int, log=None) -> dict:
    """Every op x model x batch: mean and standard deviation (ms per call) of each variant,
    timed in interleaved chunks so drift hits every variant alike."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
    cells = []
    for op in FUSED_OPS:
        for model in models:
            for rows in batches:
                calls = fused_op_calls(op, rows, model, device, dtype, variants)
                if calls is None:
                    continue
                for fn in calls.values():
                    for _ in range(warmup):
                        fn()
                _sync(device)
                times: dict[str, list[float]] = {v: [] for v in calls}
                chunk, done = max(1, repeats // 5), 0
                while done < repeats:
                    n = min(chunk, repeats - done)
                    for v, fn in calls.items():
                        times[v] += time_calls(fn, device, n, inner)
                    done += n
                cell = {"op": op, "model": model, "batch": rows}
                for v, ts in times.items():
                    cell[f"{v}_ms"] = statistics.fmean(ts) * 1e3
                    cell[f"{v}_sd_ms"] = statistics.stdev(ts) * 1e3 if len(ts) > 1 else 0.0
                cells.append(cell)
                if log:
                    print(f"  {op} {model} batch {rows:>4}: " + ", ".join(
                        f"{v} {cell[f'{v}_ms']:.4f} ms" for v in calls), file=log)
    return {"comparison": "fused-ops", "variants": variants, "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "warmup": warmup, "repeats": repeats,
            "inner": inner, "batches": batches, "models": models, "cells": cells}


def fused_markdown(result: dict) -> str:
    variants = result["variants"]
    ratios = [v for v in ("compile", "eager") if v in variants and "triton" in variants]
    lines = [
        "## Fused ops: " + " vs ".join(variants),
        "",
        (f"{result['device']}, {result['dtype']}; warm-up {result['warmup']}, "
         f"{result['repeats']} repeats x {result['inner']} calls per cell; mean ± sd in ms per "
         "call; speedup = the other's time / triton's (> 1: triton faster)."),
        "",
        "| op | model | batch | " + " | ".join(f"{v} ms" for v in variants)
        + "".join(f" | triton vs {v}" for v in ratios) + " |",
        "|---|---|---:|" + "---:|" * (len(variants) + len(ratios)),
    ]
    for c in result["cells"]:
        row = [c["op"], c["model"], str(c["batch"])]
        row += [f"{c[f'{v}_ms']:.4f} ± {c[f'{v}_sd_ms']:.4f}" for v in variants]
        for v in ratios:
            ratio = c[f"{v}_ms"] / c["triton_ms"]
            # beyond the two spreads added: a difference the timer can tell
            clear = abs(c[f"{v}_ms"] - c["triton_ms"]) > c[f"{v}_sd_ms"] + c["triton_sd_ms"]
            row.append(f"{ratio:.2f}x" + ("" if clear else " (within sd)"))
        lines.append("| " + " | ".join(row) + " |")
    for v in ratios:
        per = [c[f"{v}_ms"] / c["triton_ms"] for c in result["cells"]]
        slower = [c for c in result["cells"] if c["triton_ms"] - c[f"{v}_ms"]
                  > c[f"{v}_sd_ms"] + c["triton_sd_ms"]]
        lines += ["", f"- triton vs {v}: mean speedup {statistics.fmean(per):.2f}x "
                  f"(sd {statistics.pstdev(per):.2f}); triton slower beyond the spread in "
                  f"{len(slower)} of {len(per)} cells"
                  + (": " + ", ".join(f"{c['op']} {c['model']} batch {c['batch']}"
                                      for c in slower[:10]) if slower else "")
                  + (f" and {len(slower) - 10} more" if len(slower) > 10 else "")]
    return "\n".join(lines)


def fused_main(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
               out: Path) -> None:
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in FUSED_VARIANTS]
    models = args.models.split(",")
    bad += [m for m in models if m not in FUSED_MODELS]
    if bad:
        raise SystemExit(f"unknown variant or model {bad}; variants: {', '.join(FUSED_VARIANTS)}, "
                         f"models: {', '.join(FUSED_MODELS)}")
    batches = args.batch or [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    print(f"fused-ops: {len(FUSED_OPS)} ops x {len(models)} models x {len(batches)} batch sizes "
          f"on {device}", file=sys.stderr)
    result = run_fused_ops(batches, models, variants, device, dtype, args.warmup, args.repeats,
                           args.inner, log=sys.stderr)
    md = fused_markdown(result)
    print(md + "\n")
    (out / "fused-ops.md").write_text(md + "\n")
    (out / "fused-ops.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'fused-ops'}.md, .json", file=sys.stderr)


# ---------------------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int, inner: int) -> list[float]:
    """`repeats` timings (seconds per call) of `inner` back-to-back calls each."""
    out = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3 / inner)
        return out
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t0) / inner)
    return out


def _iqr(values: list[float]) -> float:
    if len(values) < 4:
        return max(values) - min(values)
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def bootstrap_halfwidth(a: list[float], b: list[float], draws: int = 400, seed: int = 0) -> float:
    """Half-width (percentage points) of the 95% bootstrap interval of the improvement of B's
    median over A's: how far resampling alone moves the cell's result."""
    rng = random.Random(seed)
    imps = []
    for _ in range(draws):
        ra = statistics.median(rng.choices(a, k=len(a)))
        rb = statistics.median(rng.choices(b, k=len(b)))
        imps.append((ra - rb) / ra * 100)
    imps.sort()
    return (imps[int(0.975 * (draws - 1))] - imps[int(0.025 * (draws - 1))]) / 2


def measure_cell(fn_a, fn_b, device: torch.device, warmup: int, repeats: int, inner: int) -> dict:
    for _ in range(warmup):
        fn_a()
        fn_b()
    _sync(device)
    # Interleave A and B in chunks so drift (clock, thermal, other load) hits both alike;
    # a second A series gives the null (A vs A) difference: the noise of this cell.
    a, b, a2 = [], [], []
    chunk = max(1, repeats // 5)
    done = 0
    while done < repeats:
        n = min(chunk, repeats - done)
        a += time_calls(fn_a, device, n, inner)
        b += time_calls(fn_b, device, n, inner)
        a2 += time_calls(fn_a, device, n, inner)
        done += n
    med_a, med_b, med_a2 = statistics.median(a), statistics.median(b), statistics.median(a2)
    improvement = (med_a - med_b) / med_a * 100  # % time saved by B (positive = B faster)
    null = abs(med_a - med_a2) / med_a * 100
    # Noise floor: the null difference, or the 95% interval of the cell's own estimate,
    # whichever is larger.
    spread_a = _iqr(a) / med_a * 100
    spread_b = _iqr(b) / med_b * 100
    noise = max(null, bootstrap_halfwidth(a, b))
    return {
        "a_ms": med_a * 1e3, "b_ms": med_b * 1e3, "a_spread_pct": spread_a, "b_spread_pct": spread_b,
        "improvement_pct": improvement, "speedup": med_a / med_b, "noise_pct": noise,
    }


def run_grid(cmp: Comparison, batches: list[int], seq_lens: list[int], device: torch.device,
             dtype: torch.dtype, warmup: int, repeats: int, inner: int, log=None) -> dict:
    cells = []
    for bsz in batches:
        for sl in seq_lens:
            fn_a, fn_b = cmp.make(bsz, sl, device, dtype)
            cell = measure_cell(fn_a, fn_b, device, warmup, repeats, inner)
            cell.update(batch=bsz, seq_len=sl)
            cells.append(cell)
            if log:
                print(f"  batch {bsz:>3} seq {sl:>5}: A {cell['a_ms']:.4f} ms, B {cell['b_ms']:.4f} ms, "
                      f"{cell['improvement_pct']:+.2f}% (noise {cell['noise_pct']:.2f}%)", file=log)
            del fn_a, fn_b
    return {"comparison": cmp.name, "a": cmp.label_a, "b": cmp.label_b,
            "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "warmup": warmup, "repeats": repeats, "inner": inner,
            "batches": batches, "seq_lens": seq_lens, "cells": cells, "summary": summarize(cells)}


def summarize(cells: list[dict]) -> dict:
    imps = [c["improvement_pct"] for c in cells]
    best = max(cells, key=lambda c: c["improvement_pct"])
    worst = min(cells, key=lambda c: c["improvement_pct"])
    regressions = [
        {"batch": c["batch"], "seq_len": c["seq_len"], "improvement_pct": c["improvement_pct"],
         "noise_pct": c["noise_pct"]}
        for c in cells if c["improvement_pct"] < -c["noise_pct"]
    ]
    wins = [c for c in cells if c["improvement_pct"] > c["noise_pct"]]
    mean = statistics.fmean(imps)
    losses = [c for c in cells if c["improvement_pct"] < -c["noise_pct"]]
    if mean > 0 and 2 * len(wins) >= len(cells):
        winner = "B"
    elif mean < 0 and 2 * len(losses) >= len(cells):
        winner = "A"
    else:
        winner = "tie"
    return {
        "mean_improvement_pct": mean,
        "std_improvement_pct": statistics.pstdev(imps) if len(imps) > 1 else 0.0,
        "best": {"batch": best["batch"], "seq_len": best["seq_len"], "improvement_pct": best["improvement_pct"]},
        "worst": {"batch": worst["batch"], "seq_len": worst["seq_len"], "improvement_pct": worst["improvement_pct"]},
        "mean_speedup": statistics.fmean(c["speedup"] for c in cells),
        "significant_wins": len(wins),
        "regressions": regressions,
        "winner": winner,
    }


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [
        f"## A/B: {result['comparison']}: A = {result['a']}, B = {result['b']}",
        "",
        f"{result['device']}, {result['dtype']}; warm-up {result['warmup']}, {result['repeats']} repeats "
        f"x {result['inner']} calls per cell; improvement = time saved by B (positive: B faster).",
        "",
        "| batch | seq len | A median ms | A spread | B median ms | B spread | improvement | noise |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["cells"]:
        flag = " **regression**" if c["improvement_pct"] < -c["noise_pct"] else ""
        lines.append(
            f"| {c['batch']} | {c['seq_len']} | {c['a_ms']:.4f} | {c['a_spread_pct']:.1f}% | "
            f"{c['b_ms']:.4f} | {c['b_spread_pct']:.1f}% | {c['improvement_pct']:+.2f}%{flag} | "
            f"{c['noise_pct']:.2f}% |"
        )
    regs = ", ".join(f"batch {r['batch']} x {r['seq_len']} ({r['improvement_pct']:+.2f}% vs noise "
                     f"{r['noise_pct']:.2f}%)" for r in s["regressions"]) or "none"
    lines += [
        "",
        f"- winner: **{ {'A': result['a'], 'B': result['b'], 'tie': 'no clear winner'}[s['winner']] }**",
        f"- average improvement {s['mean_improvement_pct']:+.2f}% (std {s['std_improvement_pct']:.2f}%), "
        f"mean speedup {s['mean_speedup']:.3f}x",
        f"- best {s['best']['improvement_pct']:+.2f}% (batch {s['best']['batch']}, seq {s['best']['seq_len']}); "
        f"worst {s['worst']['improvement_pct']:+.2f}% (batch {s['worst']['batch']}, seq {s['worst']['seq_len']})",
        f"- cells where B is faster beyond noise: {s['significant_wins']} of {len(result['cells'])}",
        f"- regressions beyond measured noise: {regs}",
    ]
    return "\n".join(lines)


def heatmap(result: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipped the PNG heatmap (pip install matplotlib)"
    bs, sls = result["batches"], result["seq_lens"]
    grid = [[0.0] * len(sls) for _ in bs]
    for c in result["cells"]:
        grid[bs.index(c["batch"])][sls.index(c["seq_len"])] = c["improvement_pct"]
    lim = max(1e-6, max(abs(v) for row in grid for v in row))
    fig, ax = plt.subplots(figsize=(1.2 * len(sls) + 2.5, 0.5 * len(bs) + 2))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(sls)), [str(s) for s in sls])
    ax.set_yticks(range(len(bs)), [str(b) for b in bs])
    ax.set_xlabel("sequence length")
    ax.set_ylabel("batch")
    for i in range(len(bs)):
        for j in range(len(sls)):
            ax.text(j, i, f"{grid[i][j]:+.1f}%", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="improvement of B over A (%)")
    ax.set_title(f"{result['comparison']}: {result['b']} vs {result['a']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def attention_main(argv: list[str]) -> int:
    """`ab.py attention`: benchmarks/ab_attention.py (beside this file), timed by this file's
    time_calls."""
    spec = importlib.util.spec_from_file_location(
        "novainfer_ab_attention", Path(__file__).with_name("ab_attention.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv, time_calls, _iqr)


def main(argv: list[str] | None = None, comparisons: dict[str, Comparison] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["attention"]:  # its own options: see ab_attention.py
        return attention_main(argv[1:])
    comparisons = comparisons or COMPARISONS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("comparison", nargs="*",
                        help=f"which: {', '.join(comparisons)} (default all), or fused-ops "
                             "(RMSNorm, add + RMSNorm, SiLU-and-mul: eager vs torch.compile vs "
                             "Triton, alone), or attention (every attention backend; "
                             "`attention --help` for its options)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--batch", type=_ints, default=None,
                        help="default 1..64 (fused-ops: 1..512 tokens)")
    parser.add_argument("--variants", default=",".join(FUSED_VARIANTS),
                        help="fused-ops: which implementations")
    parser.add_argument("--models", default=",".join(FUSED_MODELS),
                        help="fused-ops: whose shapes")
    parser.add_argument("--seq-len", type=_ints, default=[128, 512, 1024, 2048, 4096])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--inner", type=int, default=1, help="calls per timed repeat")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out", default="ab_out", help="folder for the .md, .json and .png files")
    args = parser.parse_args(argv)
    if args.list:
        for c in comparisons.values():
            print(f"{c.name}: A = {c.label_a}, B = {c.label_b}. {c.description}")
        print(f"fused-ops: {', '.join(FUSED_VARIANTS)} for {', '.join(FUSED_OPS)} at "
              f"{', '.join(FUSED_MODELS)} shapes (alone: not an A/B pair)")
        print("attention: triton vs SDPA (cudnn, flash, efficient, math) vs FlexAttention, "
              "prefill and decode (ab.py attention --help)")
        return 0
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" \
        else getattr(torch, args.dtype)
    out = Path(args.out)
    if args.comparison == ["fused-ops"]:
        out.mkdir(parents=True, exist_ok=True)
        fused_main(args, device, dtype, out)
        return 0
    args.batch = args.batch or [1, 2, 4, 8, 16, 32, 64]
    names = args.comparison or list(comparisons)
    unknown = [n for n in names if n not in comparisons]
    if unknown:
        parser.error(f"unknown comparison {unknown}; choose from {', '.join(comparisons)}")
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(f"{name}: {len(args.batch)} x {len(args.seq_len)} cells on {device}", file=sys.stderr)
        result = run_grid(comparisons[name], args.batch, args.seq_len, device, dtype,
                          args.warmup, args.repeats, args.inner, log=sys.stderr)
        md = markdown(result)
        print(md + "\n")
        (out / f"{name}.md").write_text(md + "\n")
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        note = heatmap(result, out / f"{name}.png")
        print(note or f"wrote {out / name}.md, .json, .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
