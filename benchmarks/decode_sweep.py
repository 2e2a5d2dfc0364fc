"""Decode-attention tile sweep on the GPU: achieved KV bandwidth per (block_size, BLOCK_N,
num_warps, num_stages) at a bench-like batch (256 sequences, contexts 100-2048, 8 KV heads,
head_dim 128, bf16). One shape only: check a winner with the whole `novainfer bench` run
before changing a default (128-token tiles won here, lost 24% end to end while kernels still
recompiled on step-varying arguments, and won end to end once they did not: the default
since 2026-12-02, kernels/decode_attention.py `default_tile`).

    python benchmarks/decode_sweep.py [--seqs 256] [--max-ctx 2048]
    python benchmarks/decode_sweep.py --kv-dtypes   # bf16 vs fp8 cache (bf16 or fp16 dots)
    python benchmarks/decode_sweep.py --fp8-variants [--heads 12 --kv-heads 2]
        # the fp8 kernel: V bytes vs 16-bit pairs, stages (K/V buffers), register cap
    python benchmarks/decode_sweep.py --split-sweep [--heads 12 --kv-heads 2] [--min-ctx 800]
        # batch sizes x split counts, contexts drawn from a range or all equal to its mean
    python benchmarks/decode_sweep.py --order-sweep [--heads 12 --kv-heads 2]
        # the plain launch against the engine's (a sequence's programs side by side, the
        # longest sequences first, twice the splits: NOVAINFER_DECODE_ORDER)

`--kv-dtypes` times only the engine's block size (16) with 64- and 128-token tiles, over a
bf16 cache and an fp8 one read with the dots in bf16 or in fp16 (NOVAINFER_FP8_DOT), each
against the reference of its own cache.
"""

from __future__ import annotations

import argparse
import functools
import itertools

import torch
from cuda_timing import graph_ms_per_call, ms_per_call


def main() -> None:
    from novainfer.kernels.decode_attention import decode_attention

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--min-ctx", type=int, default=100)
    parser.add_argument("--max-ctx", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--kv-dtypes", action="store_true")
    parser.add_argument("--fp8-variants", action="store_true")
    parser.add_argument("--split-sweep", action="store_true")
    parser.add_argument("--order-sweep", action="store_true")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 96, 128, 192, 256])
    args = parser.parse_args()
    if args.split_sweep:
        return split_sweep(args)
    if args.order_sweep:
        return order_sweep(args)
    if args.kv_dtypes:
        return compare_kv_dtypes(args)
    if args.fp8_variants:
        return fp8_variants(args)
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(args.min_ctx, args.max_ctx + 1, (args.seqs,), generator=g)
    kv_bytes = int(lens.sum()) * args.kv_heads * args.head_dim * 2 * 2
    q = torch.randn(args.seqs, args.heads, args.head_dim, device=dev, dtype=dt)
    out = torch.empty_like(q)
    print(f"{args.seqs} seqs, contexts {args.min_ctx}-{args.max_ctx}, KV read {kv_bytes / 1e9:.2f} GB"
          f" per call, {torch.cuda.get_device_name()}")
    for block_size in (16, 32, 64):
        width = -(-args.max_ctx // block_size)
        num_blocks = args.seqs * width
        cache = torch.randn(2, num_blocks, block_size, args.kv_heads, args.head_dim, device=dev,
                            dtype=dt)
        tables = torch.randperm(num_blocks, generator=g).view(args.seqs, width).int().to(dev)
        seq_lens = lens.int().to(dev)
        ref = decode_attention(q, cache, tables, seq_lens, 0.088, out.clone(), num_splits=1)
        for block_n, warps, stages in itertools.product((16, 32, 64, 128), (2, 4, 8), (1, 2, 3)):
            try:
                o = decode_attention(q, cache, tables, seq_lens, 0.088, out, num_splits=1,
                                     block_n=block_n, num_warps=warps, num_stages=stages)
                err = (o.float() - ref.float()).abs().max().item()
                ms = ms_per_call(functools.partial(
                    decode_attention, q, cache, tables, seq_lens, 0.088, out, num_splits=1,
                    block_n=block_n, num_warps=warps, num_stages=stages), 50)
            except Exception as e:  # noqa: BLE001  (a config that does not compile: report it)
                print(f"block_size {block_size:3d} BLOCK_N {block_n:3d} warps {warps} stages {stages}: "
                      f"failed ({type(e).__name__})")
                continue
            print(f"block_size {block_size:3d} BLOCK_N {block_n:3d} warps {warps} stages {stages}: "
                  f"{ms * 1e3:8.1f} us  {kv_bytes / ms / 1e9:6.2f} TB/s  max|diff| {err:.3g}")
        del cache


def _engine_block_case(args: argparse.Namespace, dev: torch.device) -> tuple:
    """The engine's block size (16): (tokens, q, bf16 cache, fp8 cache, its scales, block
    tables, seq_lens) for `args.seqs` contexts of min_ctx..max_ctx tokens."""
    from novainfer.kernels.fp8 import quantize_fp8

    block_size = 16
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(args.min_ctx, args.max_ctx + 1, (args.seqs,), generator=g)
    q = torch.randn(args.seqs, args.heads, args.head_dim, device=dev, dtype=torch.bfloat16)
    width = -(-args.max_ctx // block_size)
    num_blocks = args.seqs * width
    cache = torch.randn(2, num_blocks, block_size, args.kv_heads, args.head_dim, device=dev,
                        dtype=torch.bfloat16)
    scales = torch.tensor([0.01, 0.01], device=dev)
    fp8 = torch.stack([quantize_fp8(cache[i], scales[i]) for i in (0, 1)])
    tables = torch.randperm(num_blocks, generator=g).view(args.seqs, width).int().to(dev)
    return int(lens.sum()), q, cache, fp8, scales, tables, lens.int().to(dev)


def _batch_cases(args: argparse.Namespace, dev: torch.device, columns: tuple[str, ...]):
    """Print a sweep's title and table header, then yield (seqs, `_engine_block_case`) for
    each of args.batches."""
    print(f"{args.heads} / {args.kv_heads} heads x {args.head_dim}, contexts "
          f"{args.min_ctx}-{args.max_ctx}, block size 16, {torch.cuda.get_device_name()}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for seqs in args.batches:
        yield seqs, _engine_block_case(argparse.Namespace(**{**vars(args), "seqs": seqs}), dev)


def compare_kv_dtypes(args: argparse.Namespace) -> None:
    from novainfer.kernels.decode_attention import decode_attention
    from novainfer.kernels.fp8 import dequantize_fp8

    tokens, q, cache, fp8, scales, tables, seq_lens = _engine_block_case(
        args, torch.device("cuda"))
    deq = torch.stack([dequantize_fp8(fp8[i], scales[i], torch.bfloat16) for i in (0, 1)])
    scale = args.head_dim**-0.5
    print(f"{args.seqs} seqs, contexts {args.min_ctx}-{args.max_ctx}, {args.heads} / "
          f"{args.kv_heads} heads x {args.head_dim}, block size 16, "
          f"{torch.cuda.get_device_name()}")
    print("| cache | dots | BLOCK_N | us | KV TB/s | max abs diff vs its reference |")
    print("|---|---|---|---|---|---|")
    for name, kv, ref_cache, dots in (("bf16", cache, cache, [None]),
                                      ("fp8", fp8, deq, [False, True])):
        nbytes = tokens * args.kv_heads * args.head_dim * 2 * kv.element_size()
        ref = decode_attention(q, ref_cache, tables, seq_lens, scale, torch.empty_like(q))
        for dot_f16 in dots:
            for block_n in (64, 128):
                out = torch.empty_like(q)
                kw = {"block_n": block_n}
                if name == "fp8":
                    kw.update(kv_scales=scales, dot_f16=dot_f16)
                ms = ms_per_call(functools.partial(decode_attention, q, kv, tables, seq_lens,
                                                scale, out, **kw), 50)
                err = (out.float() - ref.float()).abs().max().item()
                label = "-" if dot_f16 is None else ("fp16" if dot_f16 else "bf16")
                print(f"| {name} | {label} | {block_n} | {ms * 1e3:.1f} | "
                      f"{nbytes / ms / 1e9:.2f} | {err:.3g} |")


def fp8_variants(args: argparse.Namespace) -> None:
    """The fp8 decode kernel at 128-token tiles (one split, fp16 dots): V read byte-wise or
    as 16-bit pairs, 3 stages (one K/V buffer) or 5 (two), register cap 168 or none; each
    against the first variant's output (the 2026-12-02 default)."""
    from novainfer.kernels.decode_attention import decode_attention

    tokens, q, _, fp8, scales, tables, seq_lens = _engine_block_case(args, torch.device("cuda"))
    nbytes = tokens * args.kv_heads * args.head_dim * 2  # one byte an element
    print(f"{args.seqs} seqs, contexts {args.min_ctx}-{args.max_ctx}, {args.heads} / "
          f"{args.kv_heads} heads x {args.head_dim}, fp8 cache, {torch.cuda.get_device_name()}")
    print("| V read | stages | register cap | us | KV TB/s | max abs diff |")
    print("|---|---|---|---|---|---|")
    ref = None
    for pairs, stages, cap in ((False, 3, 168), (False, 5, 168), (True, 5, 168), (True, 5, 0),
                               (True, 3, 0)):
        out = torch.empty_like(q)
        call = functools.partial(decode_attention, q, fp8, tables, seq_lens, 0.088, out,
                                 num_splits=1, kv_scales=scales, dot_f16=True, block_n=128,
                                 num_stages=stages, maxnreg=cap, v_pairs=pairs)
        call()
        ref = out.clone() if ref is None else ref
        err = (out.float() - ref.float()).abs().max().item()
        ms = min(ms_per_call(call, 50) for _ in range(3))
        print(f"| {'pairs' if pairs else 'bytes'} | {stages} | {cap or 'none'} | "
              f"{ms * 1e3:.1f} | {nbytes / ms / 1e9:.2f} | {err:.3g} |")


def split_sweep(args: argparse.Namespace) -> None:
    """us per call (replayed from a CUDA graph, as in the engine) and KV TB/s for each batch
    size and split count, bf16 and fp8 caches. The "default" row is `decode_attention`'s own
    default, the plain launch (its split count at 2 programs per SM, and its tile: 64 tokens
    above 2 splits; the engine's ordered launch is `--order-sweep`'s); the others force
    128-token tiles with the stages `default_tile` gives them at 1-2 splits. Contexts drawn
    from min_ctx..max_ctx ("drawn") or all equal to the drawn ones' mean ("equal", same
    bytes): where "equal" reads much faster, uneven contexts leave SMs idle at the end of
    the call."""
    from novainfer.kernels.decode_attention import (
        decode_attention,
        decode_workspace_numel,
        default_num_splits,
    )

    dev = torch.device("cuda")
    cases = _batch_cases(args, dev, ("seqs", "contexts", "cache", "splits", "us", "KV TB/s"))
    for seqs, (tokens, q, cache, fp8, scales, tables, seq_lens) in cases:
        equal = torch.full_like(seq_lens, tokens // seqs)
        default = default_num_splits(seqs, args.kv_heads, tables.shape[1] * 16, dev)
        for contexts, lens in (("drawn", seq_lens), ("equal", equal)):
            for name, kv in (("bf16", cache), ("fp8", fp8)):
                nbytes = int(lens.sum()) * args.kv_heads * args.head_dim * 2 * kv.element_size()
                kw = {"kv_scales": scales} if name == "fp8" else {}
                for splits in (None, 1, 2, 4, 8):
                    if splits == default:
                        continue  # the None row
                    out = torch.empty_like(q)
                    tile = {} if splits is None else {"block_n": 128,
                                                      "num_stages": 5 if name == "fp8" else 2}
                    n = splits or default
                    ws = torch.empty(decode_workspace_numel(seqs, args.heads, args.head_dim, n),
                                     dtype=torch.float32, device=dev)  # before the capture
                    call = functools.partial(decode_attention, q, kv, tables, lens, 0.088, out,
                                             num_splits=n, workspace=ws, **tile, **kw)
                    ms = min(graph_ms_per_call(call) for _ in range(2))
                    label = f"{default} (default)" if splits is None else f"{splits} (128)"
                    print(f"| {seqs} | {contexts} | {name} | {label} | {ms * 1e3:.1f} | "
                          f"{nbytes / ms / 1e9:.2f} |", flush=True)


def order_sweep(args: argparse.Namespace) -> None:
    """us per call (replayed from a CUDA graph), bf16 and fp8 caches: the plain launch at the
    plain split count (2 programs per SM) against a sequence's programs side by side and the
    sequences longest first, at that split count and at the engine's (4 programs per SM,
    NOVAINFER_DECODE_ORDER); each checked bit for bit against the plain launch at its split
    count (the order moves programs, not arithmetic)."""
    from novainfer.kernels.decode_attention import (
        decode_attention,
        decode_order,
        decode_workspace_numel,
        default_num_splits,
    )

    dev = torch.device("cuda")
    cases = _batch_cases(args, dev, ("seqs", "cache", "launch", "splits", "us", "KV TB/s",
                                     "same bits"))
    for seqs, (tokens, q, cache, fp8, scales, tables, seq_lens) in cases:
        width = tables.shape[1] * 16
        plain_splits = default_num_splits(seqs, args.kv_heads, width, dev)
        ordered_splits = default_num_splits(seqs, args.kv_heads, width, dev, programs_per_sm=4)
        ordered = {"heads_first": True, "order": decode_order(seq_lens)}
        for name, kv in (("bf16", cache), ("fp8", fp8)):
            nbytes = tokens * args.kv_heads * args.head_dim * 2 * kv.element_size()
            kw = {"kv_scales": scales} if name == "fp8" else {}
            plain = {}
            for label, splits, extra in (("plain", plain_splits, {}),
                                         ("ordered", plain_splits, ordered),
                                         ("plain", ordered_splits, {}),
                                         ("ordered (engine)", ordered_splits, ordered)):
                if label == "plain" and splits in plain:
                    continue  # one split count for both rules
                ws = torch.empty(decode_workspace_numel(seqs, args.heads, args.head_dim, splits),
                                 dtype=torch.float32, device=dev)
                out = torch.empty_like(q)
                call = functools.partial(decode_attention, q, kv, tables, seq_lens, 0.088, out,
                                         num_splits=splits, workspace=ws, **kw, **extra)
                call()
                plain.setdefault(splits, out.clone())
                ms = min(graph_ms_per_call(call) for _ in range(3))
                print(f"| {seqs} | {name} | {label} | {splits} | {ms * 1e3:.1f} | "
                      f"{nbytes / ms / 1e9:.2f} | {torch.equal(out, plain[splits])} |",
                      flush=True)


if __name__ == "__main__":
    main()
