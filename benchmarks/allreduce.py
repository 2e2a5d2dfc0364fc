"""All-reduce latency over the GPUs of one host, as the tensor-parallel layers issue it:
NCCL through torch.distributed (eager and replayed inside a CUDA graph, 64 all-reduces per
graph, as a decode step of a 32-layer model issues) against the one-shot peer-to-peer path
(novainfer/distributed/peer_allreduce.py, in a CUDA graph, its one-shot and its two-shot
kernel at every size), bf16, per message size, with the peer path's results compared against
NCCL's on random inputs; then the peer all-reduce followed by the add + RMSNorm against the
fused kernel (kernels/allreduce_norm.py).

    python benchmarks/allreduce.py [--gpus 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cuda_timing import ms_per_call

SIZES_KIB = [8, 32, 128, 512, 1024, 2048, 4096, 8192, 32768, 131072]
PER_GRAPH = 64


def _rank(rank: int, size: int, port: int, queue) -> None:
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                      NVSHMEM_DISABLE_NVLS="1")
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size, device_id=device)
    from novainfer.distributed import peer_allreduce

    control = dist.new_group(backend="gloo")
    os.environ[peer_allreduce.ENV] = "peer"
    peer = peer_allreduce.create(dist.group.WORLD, control, device)
    one_shot_max = peer_allreduce.ONE_SHOT_MAX_BYTES
    rows = []
    for kib in SIZES_KIB:
        x = torch.ones(kib * 1024 // 2, dtype=torch.bfloat16, device=device)
        eager = ms_per_call(lambda: dist.all_reduce(x), 50)
        graph = torch.cuda.CUDAGraph()
        dist.all_reduce(x)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            for _ in range(PER_GRAPH):
                dist.all_reduce(x)
        in_graph = ms_per_call(graph.replay, 10) / PER_GRAPH
        x.fill_(1.0)
        dist.all_reduce(x)
        correct = bool((x == size).all())
        bus = 2 * (size - 1) / size * x.numel() * 2 / (in_graph * 1e-3) / 1e9
        row = {"KiB": kib, "eager_us": round(eager * 1e3, 1),
               "graph_us": round(in_graph * 1e3, 1), "graph_bus_GBps": round(bus, 1),
               "correct": correct, "peer_graph_us": None, "two_shot_graph_us": None,
               "peer_equal": None}
        del graph  # graphs holding NCCL work must go before the communicator
        if peer is not None and kib * 1024 <= peer_allreduce.BUFFER_BYTES:
            gen = torch.Generator(device=device).manual_seed(1000 + rank)
            r = torch.randn(x.numel(), generator=gen, device=device).to(torch.bfloat16)
            a, b = r.clone(), r.clone()
            dist.all_reduce(a)
            assert peer(b)
            row["peer_equal"] = bool(torch.equal(a, b))
            for kernel, limit in (("peer_graph_us", 1 << 40), ("two_shot_graph_us", 0)):
                peer_allreduce.ONE_SHOT_MAX_BYTES = limit  # this kernel at every size
                y = r.clone()
                peer(y)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(PER_GRAPH):
                        peer(y)
                row[kernel] = round(ms_per_call(graph.replay, 10) / PER_GRAPH * 1e3, 1)
                del graph
                b = r.clone()
                peer(b)
                row["peer_equal"] = row["peer_equal"] and bool(torch.equal(a, b))
            peer_allreduce.ONE_SHOT_MAX_BYTES = one_shot_max  # the engine's choice again
        if peer is not None and kib * 1024 <= peer_allreduce.SLOT_BYTES and kib >= 8:
            row.update(_fused_row(peer, kib, rank, device))
        rows.append(row)
    if rank == 0:
        queue.put(rows)
    torch.cuda.synchronize()
    dist.destroy_process_group()


def _fused_row(peer, kib: int, rank: int, device: torch.device) -> dict:
    """The all-reduce + residual add + RMSNorm of a 4096-wide bf16 hidden state (llama3-8b):
    the peer all-reduce then the Triton add + RMSNorm, against the one fused kernel, both
    64 per CUDA graph (the fused calls alternating slots, as the decoder's do)."""
    from novainfer.kernels.norm_act import add_rms_norm

    hidden = 4096
    rows = kib * 1024 // 2 // hidden
    gen = torch.Generator(device=device).manual_seed(2000 + rank)
    x = torch.randn(rows, hidden, generator=gen, device=device).to(torch.bfloat16)
    res = torch.randn(rows, hidden, generator=gen, device=device).to(torch.bfloat16)
    weight = torch.ones(hidden, device=device, dtype=torch.bfloat16)

    def apart(slot: int):
        y = x.clone()
        peer(y)
        return add_rms_norm(y, res, weight, 1e-5)

    def fused(slot: int):
        return peer.add_rms_norm(x, res, weight, 1e-5, None, slot)

    want, got = apart(0), fused(0)
    same = min(float((w == g).float().mean()) for w, g in zip(want, got))
    out = {"rows": rows, "fused_equal_frac": round(same, 4)}
    for name, fn in (("apart_graph_us", apart), ("fused_graph_us", fused)):
        fn(1)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(PER_GRAPH):
                fn(i % 2)
        out[name] = round(ms_per_call(graph.replay, 10) / PER_GRAPH * 1e3, 1)
        del graph
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from novainfer.distributed.workers import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, args.gpus, port, queue))
             for r in range(args.gpus)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=600)
    print(f"NCCL all-reduce, bf16, {args.gpus} x {torch.cuda.get_device_name(0)}")
    print("| KiB | NCCL eager us | NCCL in a CUDA graph us | bus GB/s (graph) | correct | "
          "peer one-shot in a graph us | peer two-shot in a graph us | peer == NCCL |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['KiB']} | {r['eager_us']} | {r['graph_us']} | {r['graph_bus_GBps']} | "
              f"{r['correct']} | {r['peer_graph_us'] or '-'} | {r['two_shot_graph_us'] or '-'} | "
              f"{r['peer_equal'] or '-'} |")
    fused = [r for r in rows if "fused_graph_us" in r]
    if fused:
        print("\nall-reduce + residual add + RMSNorm, bf16, hidden 4096, in a CUDA graph:")
        print("| KiB | rows | peer all-reduce, then add + RMSNorm us | fused kernel us | "
              "elements equal |")
        print("|---|---|---|---|---|")
        for r in fused:
            print(f"| {r['KiB']} | {r['rows']} | {r['apart_graph_us']} | {r['fused_graph_us']} | "
                  f"{r['fused_equal_frac']} |")
    if args.json:
        print(json.dumps(rows))
    for p in procs:
        p.join(60)
        if p.is_alive():
            p.kill()


if __name__ == "__main__":
    main()
