"""`python benchmarks/ab.py attention`: every attention implementation on the same step shapes.

    python benchmarks/ab.py attention                     # batch 1,8,32 x context 128,512,2048
    python benchmarks/ab.py attention --model llama3-8b --mode prefill --json
    python benchmarks/ab.py attention --quick             # tiny grid (the CPU smoke test)

prefill: `batch` sequences of `seq_len` new tokens each, no cached prefix; q/k/v are views of
one packed qkv projection output, as the model passes them. triton = our prefill kernel over
the paged cache; sdpa-* = layers/attention/sdpa_prefill.py (the `cudnn` backend's path) under
one SDPA kernel; flex = torch.compile(flex_attention) with a causal block mask. The KV-cache
write (store_kv) is the same for every backend and is not timed.
decode: `batch` sequences with `seq_len` tokens of context in the paged cache, one query each.
triton = our decode kernel reading the cache; sdpa-* = K/V gathered from the cache into
contiguous tensors, then SDPA (the gather is timed: an engine would pay it; equal lengths, so
no length mask, which flash could not take anyway); flex: not run (see FLEX_DECODE).

Each implementation is first checked against float32 SDPA (math) on the cell's inputs; a
difference beyond the dtype's tolerance makes the exit status 1 (after the table). One that
cannot run here is listed once with the reason. Timing: `--repeats` timed calls per
implementation, interleaved in chunks; median and interquartile range (ms).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import warnings
from collections.abc import Callable
from importlib.util import find_spec

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from novainfer.layers.attention.sdpa_prefill import sdpa_prefill
from novainfer.layers.attention.torch_ref import gather_kv

# (query heads, KV heads, head_dim)
MODELS = {"qwen3-0.6b": (16, 8, 128), "llama3-8b": (32, 8, 128)}
SDPA = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}
IMPLS = ("triton", *SDPA, "flex")
# Max abs difference from the float32 reference that still counts as a match.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}
FLEX_DECODE = ("FlexAttention over the paged cache needs a BlockMask translated through the "
               "block table (attention-gym's PagedAttention); not written here")


class NotRun(Exception):
    """An implementation that cannot run on this device / torch, with the reason."""


def _rand(gen: torch.Generator, *shape, device, dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=device, dtype=dtype)


def make_cell(mode: str, batch: int, seq_len: int, model: str, block_size: int,
              device: torch.device, dtype: torch.dtype) -> dict:
    """The inputs of one cell: q/k/v (views of a packed qkv), the paged cache holding every
    sequence's K/V, block tables, lengths."""
    heads, kv_heads, head_dim = MODELS[model]
    gen = torch.Generator(device=device).manual_seed(batch * 100003 + seq_len)
    rows = batch * seq_len if mode == "prefill" else batch
    qkv = _rand(gen, rows, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
    q, k, v = (x.unflatten(1, (-1, head_dim)) for x in qkv.split(
        [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1))
    per_seq = -(-seq_len // block_size)
    perm = torch.randperm(batch * per_seq, generator=torch.Generator().manual_seed(seq_len))
    tables = perm.view(batch, per_seq).to(device=device, dtype=torch.int32)
    cache = _rand(gen, 2, batch * per_seq, block_size, kv_heads, head_dim, device=device,
                  dtype=dtype)
    if mode == "prefill":  # the new tokens' K/V, where store_kv puts them
        pos = torch.arange(seq_len, device=device)
        slots = (tables[:, pos // block_size].long() * block_size + pos % block_size).flatten()
        cache[0].view(-1, kv_heads, head_dim)[slots] = k
        cache[1].view(-1, kv_heads, head_dim)[slots] = v
    return {
        "mode": mode, "batch": batch, "seq_len": seq_len, "q": q, "k": k, "v": v,
        "cache": cache, "tables": tables, "scale": head_dim**-0.5,
        "seq_lens": torch.full((batch,), seq_len, dtype=torch.int32, device=device),
        "query_start_loc": torch.arange(0, rows + 1, seq_len if mode == "prefill" else 1,
                                        dtype=torch.int32, device=device),
    }


def reference(cell: dict) -> torch.Tensor:
    """float32 SDPA (math), one sequence at a time: [rows, heads, head_dim]."""
    q, scale, L = cell["q"].float(), cell["scale"], cell["seq_len"]
    out = torch.empty_like(q)
    with sdpa_kernel(SDPBackend.MATH):
        if cell["mode"] == "decode":
            kd, vd = gather_kv(cell["cache"].float(), cell["tables"], L)
            o = F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, scale=scale,
                                               enable_gqa=True)
            return o.squeeze(2)
        k, v = cell["k"].float(), cell["v"].float()
        for i in range(cell["batch"]):
            s = slice(i * L, (i + 1) * L)
            o = F.scaled_dot_product_attention(
                q[s].transpose(0, 1), k[s].transpose(0, 1), v[s].transpose(0, 1),
                is_causal=True, scale=scale, enable_gqa=True,
            )
            out[s] = o.transpose(0, 1)
    return out


def _triton_call(cell: dict) -> Callable[[], torch.Tensor]:
    q = cell["q"]
    if find_spec("triton") is None:
        raise NotRun("triton is not installed")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise NotRun("the Triton kernels need CUDA (or TRITON_INTERPRET=1 on the CPU)")
    from novainfer.kernels.decode_attention import (
        alloc_decode_workspace,
        decode_attention,
        decode_launch,
        decode_order,
    )
    from novainfer.kernels.prefill_attention import prefill_attention

    out = torch.empty_like(q)
    cache, tables, seq_lens, scale = cell["cache"], cell["tables"], cell["seq_lens"], cell["scale"]
    if cell["mode"] == "prefill":
        qsl, L = cell["query_start_loc"], cell["seq_len"]
        return lambda: prefill_attention(q, cache, tables, qsl, seq_lens, L, scale, out)
    batch, heads, head_dim = q.shape
    # As TritonBackend launches it: the split count from static shapes, the scratch allocated
    # once, the order (NOVAINFER_DECODE_ORDER) sorted once outside the timed call, as one
    # step's layers share it.
    splits, ordered = decode_launch(batch, cache.shape[3], tables.shape[1] * cache.shape[2],
                                    q.device)
    ws = alloc_decode_workspace(batch, heads, head_dim, splits, q.device) if splits > 1 else None
    order = decode_order(seq_lens) if ordered and batch > 1 else None
    return lambda: decode_attention(q, cache, tables, seq_lens, scale, out, num_splits=splits,
                                    workspace=ws, heads_first=ordered, order=order)


def _sdpa_call(cell: dict, backend: SDPBackend) -> Callable[[], torch.Tensor]:
    q, scale, L = cell["q"], cell["scale"], cell["seq_len"]
    if q.device.type != "cuda" and backend in (SDPBackend.CUDNN_ATTENTION,
                                               SDPBackend.EFFICIENT_ATTENTION):
        raise NotRun(f"SDPA has no {backend.name} kernel on {q.device.type}")
    if cell["mode"] == "prefill":
        out, k, v, lens = torch.empty_like(q), cell["k"], cell["v"], [L] * cell["batch"]
        return lambda: sdpa_prefill(q, k, v, lens, scale, out, backend)
    cache, tables = cell["cache"], cell["tables"]

    def decode() -> torch.Tensor:
        kd, vd = gather_kv(cache, tables, L)  # [batch, kv_heads, L, D], a copy
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, scale=scale,
                                               enable_gqa=True)
        return o.squeeze(2)

    return decode


_FLEX: list[Callable] = []


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _flex_call(cell: dict) -> Callable[[], torch.Tensor]:
    if cell["mode"] == "decode":
        raise NotRun(FLEX_DECODE)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not _FLEX:
        # One compiled function for every cell: the second shape makes torch.compile mark the
        # sizes dynamic, so a grid costs two or three compilations, not one per cell.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _FLEX.append(torch.compile(flex_attention))
    q, k, v, B, L = cell["q"], cell["k"], cell["v"], cell["batch"], cell["seq_len"]
    mask = create_block_mask(_causal, None, None, L, L, device=q.device)

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(0, (B, L)).transpose(1, 2)

    qb, kb, vb = heads_first(q), heads_first(k), heads_first(v)
    scale, flex = cell["scale"], _FLEX[0]
    return lambda: flex(qb, kb, vb, block_mask=mask, scale=scale,
                        enable_gqa=True).transpose(1, 2).flatten(0, 1)


def make_call(name: str, cell: dict) -> Callable[[], torch.Tensor]:
    if name == "triton":
        return _triton_call(cell)
    if name == "flex":
        return _flex_call(cell)
    return _sdpa_call(cell, SDPA[name])


def _first_run(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The first call; a failure becomes NotRun with SDPA's reasons (its warnings) attached."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn()
        # Any failure (SDPA's RuntimeError, a compiler error) means "cannot run here": it is
        # reported with its reason instead of ending the run.
        except Exception as e:
            why = [str(w.message).splitlines()[0] for w in caught
                   if "not used because" not in str(w.message)]
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise NotRun("; ".join([*why[:3], first])[:300]) from e


def run_cell(cell: dict, impls: list[str], time_calls, iqr, warmup: int, repeats: int,
             tolerance: float) -> tuple[dict, dict[str, str]]:
    """Check then time every implementation on one cell: ({name: result}, {name: reason})."""
    device = cell["q"].device
    ref = reference(cell)
    calls, results, not_run = {}, {}, {}
    for name in impls:
        try:
            fn = make_call(name, cell)
            out = _first_run(fn)
        except NotRun as e:
            not_run[name] = str(e)
            continue
        diff = float((out.float() - ref).abs().max())
        calls[name] = fn
        results[name] = {"max_abs_diff": diff, "match": diff <= tolerance}
    del ref
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    chunk, done = max(1, repeats // 5), 0
    while done < repeats:  # interleaved, so drift hits every implementation alike
        n = min(chunk, repeats - done)
        for name, fn in calls.items():
            times[name] += time_calls(fn, device, n, 1)
        done += n
    for name, ts in times.items():
        results[name].update(ms=statistics.median(ts) * 1e3, iqr_ms=iqr(ts) * 1e3)
    return results, not_run


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}"
    return f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__}"


def markdown(result: dict) -> str:
    impls = result["impls"]
    lines = [f"## Attention: {', '.join(impls)}", "",
             (f"{result['machine']}; {result['dtype']}; {result['model']} shapes "
              f"({result['heads']} q / {result['kv_heads']} kv heads x {result['head_dim']}), "
              f"block size {result['block_size']}; warm-up {result['warmup']}, "
              f"{result['repeats']} timed calls; median ± interquartile range, ms per call.")]
    for mode in result["modes"]:
        cells = [c for c in result["cells"] if c["mode"] == mode]
        shown = [n for n in impls if any(n in c["results"] for c in cells)]
        lines += ["", f"### {mode}", "", "| batch | seq len | " + " | ".join(shown)
                  + " | fastest |", "|---:|---:|" + "---:|" * len(shown) + "---|"]
        for c in cells:
            row = [str(c["batch"]), str(c["seq_len"])]
            for n in shown:
                r = c["results"].get(n)
                row.append("—" if r is None else f"{r['ms']:.4f} ± {r['iqr_ms']:.4f}"
                           + ("" if r["match"] else " **mismatch**"))
            row.append(c["fastest"] or "—")
            lines.append("| " + " | ".join(row) + " |")
    if result["not_run"]:
        lines += ["", "Not run:"]
        for e in result["not_run"]:
            where = "" if e["all_cells"] else " (in " + ", ".join(e["cells"]) + ")"
            lines.append(f"- {e['impl']}{where}: {e['reason']}")
    for m in result["mismatches"]:
        lines.append(f"- **mismatch**: {m['impl']} {m['cell']}: max abs diff "
                     f"{m['max_abs_diff']:.3g} > {result['tolerance']:.3g}")
    return "\n".join(lines)


def _fastest(results: dict) -> str | None:
    """The lowest median; '(within spread)' when the runner-up is closer than the two IQRs."""
    ranked = sorted(results, key=lambda n: results[n]["ms"])
    if not ranked:
        return None
    if len(ranked) > 1:
        a, b = results[ranked[0]], results[ranked[1]]
        if b["ms"] - a["ms"] <= a["iqr_ms"] + b["iqr_ms"]:
            return f"{ranked[0]} (within spread of {ranked[1]})"
    return ranked[0]


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str], time_calls, iqr) -> int:
    parser = argparse.ArgumentParser(prog="ab.py attention", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=lambda s: [int(x) for x in _csv(s)], default=None,
                        help="default 1,8,32 (--quick: 1,2)")
    parser.add_argument("--seq-len", type=lambda s: [int(x) for x in _csv(s)], default=None,
                        help="default 128,512,2048 (--quick: 16,40)")
    parser.add_argument("--mode", type=_csv, default=["prefill", "decode"])
    parser.add_argument("--model", default="qwen3-0.6b", choices=list(MODELS))
    parser.add_argument("--impls", type=_csv, default=list(IMPLS),
                        help=f"which of {', '.join(IMPLS)} (default all)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=None, help="default 5 (--quick: 1)")
    parser.add_argument("--repeats", type=int, default=None, help="default 50 (--quick: 5)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--quick", action="store_true", help="a tiny grid, for a smoke test")
    parser.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    args = parser.parse_args(argv)
    bad = [m for m in args.mode if m not in ("prefill", "decode")]
    bad += [n for n in args.impls if n not in IMPLS]
    if bad:
        parser.error(f"unknown mode or implementation {bad}; modes: prefill, decode; "
                     f"implementations: {', '.join(IMPLS)}")
    quick = args.quick
    batches = args.batch or ([1, 2] if quick else [1, 8, 32])
    seq_lens = args.seq_len or ([16, 40] if quick else [128, 512, 2048])
    warmup = args.warmup if args.warmup is not None else (1 if quick else 5)
    repeats = args.repeats if args.repeats is not None else (5 if quick else 50)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    dtype = ((torch.bfloat16 if device.type == "cuda" else torch.float32)
             if args.dtype == "auto" else getattr(torch, args.dtype))
    tolerance = TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])
    heads, kv_heads, head_dim = MODELS[args.model]
    cells, reasons = [], {}
    for mode in args.mode:
        for batch in batches:
            for seq_len in seq_lens:
                cell = make_cell(mode, batch, seq_len, args.model, args.block_size, device, dtype)
                results, not_run = run_cell(cell, args.impls, time_calls, iqr, warmup, repeats,
                                            tolerance)
                label = f"{mode} {batch}x{seq_len}"
                for name, why in not_run.items():
                    reasons.setdefault((name, why), []).append(label)
                cells.append({"mode": mode, "batch": batch, "seq_len": seq_len,
                              "results": results, "fastest": _fastest(results)})
                print(f"  {label}: " + ", ".join(f"{n} {r['ms']:.4f} ms" for n, r in
                                                  results.items()), file=sys.stderr)
                del cell
    result = {
        "comparison": "attention", "machine": _machine(device), "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "model": args.model, "heads": heads,
        "kv_heads": kv_heads, "head_dim": head_dim, "block_size": args.block_size,
        "warmup": warmup, "repeats": repeats, "tolerance": tolerance, "modes": args.mode,
        "impls": args.impls, "cells": cells,
        "not_run": [{"impl": n, "reason": why, "cells": labels, "all_cells": len(labels) == len(cells)}
                    for (n, why), labels in reasons.items()],
        "mismatches": [{"impl": n, "cell": f"{c['mode']} {c['batch']}x{c['seq_len']}",
                        "max_abs_diff": r["max_abs_diff"]}
                       for c in cells for n, r in c["results"].items() if not r["match"]],
    }
    print(markdown(result))
    if args.json:
        print(json.dumps(result))
    return 1 if result["mismatches"] else 0
