"""QKV + LoRA: the traditional path (QKV matmul, shrink, expand) against the fused one (one
matmul by [W_qkv; A of every slot], expand), op by op, over seed 000's grid.

    python benchmarks/lora_fusion.py                      # the whole grid (a GPU)
    python benchmarks/lora_fusion.py --quick --device cpu # a smoke run

Grid: batch 1, 4, 8, 16 x sequence 128, 512, 1024, 2048 (tokens = batch x sequence, each
sequence on one adapter, round-robin) x rank 16, 32, 64, 128 x max_loras 1-8. Shapes
of the q/k/v projection of --preset (default qwen3-0.6b). Per point: >= 3 warm-ups, then the
mean and standard deviation of >= 10 timed runs of each path (CUDA events on a GPU), all
in one run: on CUDA with both LoRA kernels of lora/ops.py (the CUDA C++ ones and Triton)
side by side, on the CPU with the PyTorch twins. Prints a table, and JSON with --json.
`--max-loras 1,4,8` (or `--ranks`, `--batches`, `--seqs`) measures part of the grid.
Each call is timed eagerly by default (the host's launch overhead included, as a prefill
step pays it); `--graphs` times replays of CUDA graphs instead (GPU time only, as a decode
step pays it; `--batches 16,64,256 --seqs 1` for decode shapes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import numpy as np
import torch

from novainfer.layers.linear import QKVLinear
from novainfer.lora.layers import LoRASlots, LoRAState
from novainfer.lora.ops import expand, group_by_slot, lora_batch, shrink, using
from novainfer.models.config import ModelConfig
from novainfer.presets import preset_folder


def _timer(device: torch.device, nvtx: bool = False):
    """Times `fn`; with `nvtx`, its last run is in an NVTX range named `name` (for ncu's
    --nvtx-include, docs/lora.md)."""
    def run(fn, warmups: int, runs: int, name: str = "") -> list[float]:
        for _ in range(warmups):
            fn()
        times = []
        for i in range(runs):
            if nvtx and i == runs - 1:
                torch.cuda.nvtx.range_push(name)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
                if nvtx and i == runs - 1:
                    torch.cuda.nvtx.range_pop()
            else:
                t = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t))
        return times
    return run


def _in_graph(fn, repeats: int):
    """fn captured `repeats` times in one CUDA graph: a replay is what a decode step pays
    (GPU time, no launch overhead), timed per call of fn."""
    fn()  # compiles and caches before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    return graph.replay


def point(cfg: ModelConfig, batch: int, seq: int, rank: int, loras: int, device, dtype,
          warmups: int, runs: int, impls: list[str], nvtx: bool = False,
          graphs: bool = False) -> dict:
    torch.manual_seed(0)
    layer = QKVLinear(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, False)
    layer = layer.to(device=device, dtype=dtype)
    torch.nn.init.normal_(layer.weight, std=cfg.hidden_size**-0.5)
    state = LoRAState()
    slots = LoRASlots(layer, state, loras, rank, fuse="on")
    slots.a.normal_(std=cfg.hidden_size**-0.5)
    slots.b.normal_(std=0.01)
    tokens = batch * seq
    token_slots = np.repeat(np.arange(batch) % loras, seq).astype(np.int64)
    host = group_by_slot(token_slots)
    state.batch = lora_batch(*(torch.from_numpy(a).to(device) for a in host), host[1], host[2])
    x = torch.randn(tokens, cfg.hidden_size, device=device, dtype=dtype)

    def traditional():
        y = layer.matmul(x, None)
        expand(shrink(x, slots.a, state.batch), slots.b, y, state.batch, slots.expand_parts,
               rank)
        return y

    def fused():
        return slots.run_layer(layer, x)

    row = {"batch": batch, "seq": seq, "tokens": tokens, "rank": rank, "max_loras": loras,
           "same_output": True}
    timed = _timer(device, nvtx)
    for impl in impls:
        with using(impl):
            same = torch.allclose(traditional().float(), fused().float(), rtol=3e-2, atol=3e-2)
            if graphs:
                t = [v / GRAPH_REPEATS for v in timed(_in_graph(traditional, GRAPH_REPEATS),
                                                     warmups, runs)]
                f = [v / GRAPH_REPEATS for v in timed(_in_graph(fused, GRAPH_REPEATS),
                                                     warmups, runs)]
            else:
                t = timed(traditional, warmups, runs, f"{impl}-traditional")
                f = timed(fused, warmups, runs, f"{impl}-fused")
        row["same_output"] &= same
        row[impl] = {"traditional_ms": statistics.mean(t), "traditional_sd": statistics.stdev(t),
                     "fused_ms": statistics.mean(f), "fused_sd": statistics.stdev(f),
                     "speedup": statistics.mean(t) / statistics.mean(f)}
    return row


GRAPH_REPEATS = 16


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--warmups", type=int, default=3)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="a few small points (smoke test)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--batches", type=_ints, default=[1, 4, 8, 16])
    p.add_argument("--seqs", type=_ints, default=[128, 512, 1024, 2048])
    p.add_argument("--ranks", type=_ints, default=[16, 32, 64, 128])
    p.add_argument("--max-loras", type=_ints, default=list(range(1, 9)))
    p.add_argument("--impls", default=None, help="on CUDA: cuda,triton (default both)")
    p.add_argument("--nvtx", action="store_true",
                   help="mark each path's last run as an NVTX range <impl>-<path> (for ncu)")
    p.add_argument("--graphs", action="store_true",
                   help=f"time replays of CUDA graphs ({GRAPH_REPEATS} calls each), as decode "
                        "steps run: GPU time without the host's launch overhead")
    args = p.parse_args(argv)
    if args.graphs and args.device != "cuda":
        p.error("--graphs needs --device cuda")
    if args.warmups < 3 or args.runs < 10:
        p.error("the grid is measured with >= 3 warm-ups and >= 10 runs")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    cfg = ModelConfig.from_folder(preset_folder(args.preset))
    grid = ([(1, 16, 16, 1), (2, 16, 8, 2)] if args.quick else list(itertools.product(
        args.batches, args.seqs, args.ranks, args.max_loras)))
    impls = ["cuda", "triton"] if device.type == "cuda" else ["torch"]
    impls = args.impls.split(",") if args.impls else impls
    how = "replayed in CUDA graphs" if args.graphs else "eager (launch overhead included)"
    print(f"{args.preset} q/k/v, {device}, {dtype}, {how}: ms per call, mean +- sd of "
          f"{args.runs} runs")
    cols = [f"{i} {path}" for i in impls for path in ("traditional", "fused", "speedup")]
    print("| batch | seq | rank | max_loras | " + " | ".join(cols) + " |")
    print("|---" * (4 + len(cols)) + "|", flush=True)
    rows = []
    for b, s, rank, n in grid:  # each row as soon as it is measured
        r = point(cfg, b, s, rank, n, device, dtype, args.warmups, args.runs, impls, args.nvtx,
                  args.graphs)
        rows.append(r)
        cells = []
        for i in impls:
            m = r[i]
            cells += [f"{m['traditional_ms']:.3f} +- {m['traditional_sd']:.3f}",
                      f"{m['fused_ms']:.3f} +- {m['fused_sd']:.3f}", f"{m['speedup']:.2f}x"]
        print(f"| {r['batch']} | {r['seq']} | {r['rank']} | {r['max_loras']} | "
              + " | ".join(cells) + " |", flush=True)
    if not all(r["same_output"] for r in rows):
        print("error: the fused path's output differs from the traditional one")
        return 1
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
