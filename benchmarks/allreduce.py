"""All-reduce latency over the GPUs of one host, as the tensor-parallel layers issue it:
NCCL through torch.distributed (eager and replayed inside a CUDA graph, 64 all-reduces per
graph, as a decode step of a 32-layer model issues) against the one-shot peer-to-peer path
(novainfer/distributed/peer_allreduce.py, in a CUDA graph, its one-shot and its two-shot
kernel at every size), bf16, per message size, with the peer path's results compared against
NCCL's on random inputs.

    python benchmarks/allreduce.py [--gpus 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES_KIB = [8, 32, 128, 512, 1024, 2048, 4096, 8192, 32768, 131072]
PER_GRAPH = 64


def _time(fn, iters: int) -> float:
    """Milliseconds per call of fn, after a warm-up, measured with CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


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
    rows = []
    for kib in SIZES_KIB:
        x = torch.ones(kib * 1024 // 2, dtype=torch.bfloat16, device=device)
        eager = _time(lambda: dist.all_reduce(x), 50)
        graph = torch.cuda.CUDAGraph()
        dist.all_reduce(x)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            for _ in range(PER_GRAPH):
                dist.all_reduce(x)
        in_graph = _time(graph.replay, 10) / PER_GRAPH
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
                row[kernel] = round(_time(graph.replay, 10) / PER_GRAPH * 1e3, 1)
                del graph
                b = r.clone()
                peer(b)
                row["peer_equal"] = row["peer_equal"] and bool(torch.equal(a, b))
        rows.append(row)
    if rank == 0:
        queue.put(rows)
    torch.cuda.synchronize()
    dist.destroy_process_group()


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
    if args.json:
        print(json.dumps(rows))
    for p in procs:
        p.join(60)
        if p.is_alive():
            p.kill()


if __name__ == "__main__":
    main()
