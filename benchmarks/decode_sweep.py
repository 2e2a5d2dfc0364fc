"""Decode-attention tile sweep on the GPU: achieved KV bandwidth per (block_size, BLOCK_N,
num_warps, num_stages) at a bench-like batch (256 sequences, contexts 100-2048, 8 KV heads,
head_dim 128, bf16). One shape only: check a winner with the whole `novainfer bench` run
before changing a default (128-token tiles won here and lost 24% end to end).

    python benchmarks/decode_sweep.py [--seqs 256] [--max-ctx 2048]
"""

from __future__ import annotations

import argparse
import itertools

import torch


def main() -> None:
    from novainfer.kernels.decode_attention import decode_attention

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--min-ctx", type=int, default=100)
    parser.add_argument("--max-ctx", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
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
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    decode_attention(q, cache, tables, seq_lens, 0.088, out, num_splits=1,
                                     block_n=block_n, num_warps=warps, num_stages=stages)
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end) / 20
            except Exception as e:  # noqa: BLE001  (a config that does not compile: report it)
                print(f"block_size {block_size:3d} BLOCK_N {block_n:3d} warps {warps} stages {stages}: "
                      f"failed ({type(e).__name__})")
                continue
            print(f"block_size {block_size:3d} BLOCK_N {block_n:3d} warps {warps} stages {stages}: "
                  f"{ms * 1e3:8.1f} us  {kv_bytes / ms / 1e9:6.2f} TB/s  max|diff| {err:.3g}")
        del cache


if __name__ == "__main__":
    main()
