"""Tensor parallelism on two GPUs (NCCL, CUDA graphs on): fp32 greedy tokens identical to
transformers; bf16 logits within the single-GPU tests' tolerance of the exact answer and
of one GPU; a killed worker is an error naming the rank, not a hang. Skipped without two
CUDA devices."""

from __future__ import annotations

import faulthandler
import threading

import pytest
import torch
from conftest import CHECKPOINTS, completion_tokens, hf_greedy, hf_next_logits, random_prompts

from novainfer import SamplingParams
from novainfer.distributed.workers import WorkerFailed
from novainfer.engine import model_runner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

LENGTHS = [1, 7, 16, 17, 64, 200, 300]


def _llm(model_dir, **kwargs):
    from novainfer import LLM

    return LLM(str(model_dir), device="cuda", max_model_len=512, max_num_seqs=16,
               num_kv_blocks=512, **kwargs)


@pytest.fixture(autouse=True)
def _nccl_unless_asked(monkeypatch):
    """NCCL for these engines unless a test asks otherwise: the peer path (the default,
    `auto`) serves only the first engine of a process, and the peer tests need to be it."""
    monkeypatch.setenv("NOVAINFER_ALLREDUCE", "nccl")


@pytest.mark.parametrize("name", ["llama", "llama_untied", "qwen2", "qwen3"])
def test_fp32_greedy_two_gpus_with_graphs(checkpoint, name):
    model_dir = checkpoint(name)
    prompts = random_prompts(LENGTHS, seed=7)
    expected = hf_greedy(model_dir, prompts, 24)
    with _llm(model_dir, dtype="float32", tensor_parallel_size=2) as llm:
        # qwen2's head_dim 8 is below the Triton kernels' 16: the reference backend, eager.
        assert (llm.llm_engine.runner.graphs is not None) == (CHECKPOINTS[name]["head_dim"] >= 16)
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        assert completion_tokens(llm.generate(prompts, params, use_tqdm=False)) == expected


def _first_logits(llm, prompts, monkeypatch) -> list[torch.Tensor]:
    """The full-vocabulary logits rank 0 samples the first token from, per prompt."""
    seen: list[torch.Tensor] = []
    real = model_runner.sample_tensors

    def spy(logits, seqs, eos_ids, generator):
        seen.append(logits[0].float().cpu())
        return real(logits, seqs, eos_ids, generator)

    monkeypatch.setattr(model_runner, "sample_tensors", spy)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    for prompt in prompts:
        llm.generate([prompt], params, use_tqdm=False)
    monkeypatch.setattr(model_runner, "sample_tensors", real)
    return seen


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_bf16_logits_two_gpus(checkpoint, name, monkeypatch):
    """The single-GPU test's bound (test_gpu_e2e): within 1e-2 of the exact fp32 logits, or
    twice one implementation's own bf16 error, whichever is larger; two bf16 runs that round
    at different places sit ~1-1.2% apart (measured: one vs two H200s 1.18% for llama,
    1.01% for qwen3), so they are held to the same bound, not to a flat 1e-2."""
    model_dir = checkpoint(name)
    prompts = random_prompts([5, 64, 300], seed=3)
    one = _llm(model_dir, dtype="bfloat16")
    single = _first_logits(one, prompts, monkeypatch)
    del one
    torch.cuda.empty_cache()
    with _llm(model_dir, dtype="bfloat16", tensor_parallel_size=2) as two:
        double = _first_logits(two, prompts, monkeypatch)
    for prompt, a, b in zip(prompts, single, double):
        exact = hf_next_logits(model_dir, prompt)
        allowed = max(1e-2, 2.0 * _rel(a, exact))
        assert _rel(b, a) <= allowed, f"{name}: two GPUs vs one {_rel(b, a):.3e}"
        assert _rel(b, exact) <= allowed, f"{name}: two GPUs vs fp32 {_rel(b, exact):.3e}"


@pytest.mark.parametrize("allreduce", ["nccl", "peer"])  # peer: barrier kernels without abort
def test_killed_gpu_worker_is_an_error_not_a_hang(checkpoint, allreduce, monkeypatch):
    monkeypatch.setenv("NOVAINFER_ALLREDUCE", allreduce)
    llm = _llm(checkpoint("llama"), dtype="bfloat16", tensor_parallel_size=2)
    assert (llm.llm_engine.runner.tp.peer is not None) == (allreduce == "peer")
    engine = llm.llm_engine
    engine.add_request("r", random_prompts([10], seed=43)[0],
                       SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
    engine.step()
    engine.runner.workers.procs[0].kill()
    outcome: list[BaseException] = []

    def step_until_error() -> None:
        try:
            while engine.has_unfinished_requests():
                engine.step()
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertions
            outcome.append(exc)

    thread = threading.Thread(target=step_until_error, daemon=True)
    thread.start()
    thread.join(120)  # a hang guard
    assert not thread.is_alive(), "the engine hung after a GPU worker died"
    assert outcome and isinstance(outcome[0], WorkerFailed) and "rank 1" in str(outcome[0])
    llm.shutdown()
    drained = threading.Thread(target=torch.cuda.synchronize, daemon=True)
    drained.start()
    drained.join(60)  # rank 0's GPU work drained: the device is usable again
    assert not drained.is_alive(), "rank 0's GPU stayed busy after the worker died"


def _two_ranks(target) -> list:
    """Run target(rank, port, queue) in two spawned processes; what rank 0 puts in the
    queue (a hang guard of 180 s, then both are reaped)."""
    import torch.multiprocessing as mp

    from novainfer.distributed.workers import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        return queue.get(timeout=180)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()


def _peer_vs_nccl_rank(rank: int, port: int, queue) -> None:
    from novainfer.distributed import peer_allreduce
    from novainfer.distributed.workers import Launch, join_group, leave_group

    faulthandler.dump_traceback_later(150, exit=True)  # a hang guard that says where
    launch = Launch(2, f"tcp://127.0.0.1:{port}", "nccl", torch.device("cuda", 0))
    tp = join_group(launch, rank)
    device = torch.device("cuda", rank)
    results = []
    limit = peer_allreduce.BUFFER_BYTES
    for dtype in (torch.bfloat16, torch.float32):
        size = torch.empty((), dtype=dtype).element_size()
        one_shot = peer_allreduce.ONE_SHOT_MAX_BYTES // size  # then two-shot
        for numel in (1, 3, 1000, 4097, one_shot, one_shot + 2, one_shot + 4, one_shot + 8,
                      limit // size, limit // size + 1):
            gen = torch.Generator(device=device).manual_seed(numel * 10 + rank)
            x = (torch.randn(numel, generator=gen, device=device) * 100).to(dtype)
            want = x.clone()
            torch.distributed.all_reduce(want, group=tp.group)
            got = x.clone()
            took = tp.peer(got)
            replayed = x.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                tp.all_reduce(replayed)
            replayed.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            del graph
            results.append((str(dtype), numel, took, bool(torch.equal(got, want)) or not took,
                            bool(torch.equal(replayed, want))))
    if rank == 0:
        queue.put(results)
    torch.cuda.synchronize()
    leave_group()


def test_peer_allreduce_matches_nccl(monkeypatch):
    """The peer path against NCCL's sum on random inputs: odd sizes (an odd bf16 count is
    not 4-byte aligned: NCCL then), the one-shot kernel's limit and just over it (two-shot,
    16-, 8- and 4-byte aligned), the buffer's limit, one element over it (NCCL), bf16 and
    fp32, eager and in a CUDA graph."""
    from novainfer.distributed import peer_allreduce

    monkeypatch.setenv(peer_allreduce.ENV, "peer")  # the ranks inherit it
    results = _two_ranks(_peer_vs_nccl_rank)
    for dtype, numel, took, eager_equal, graph_equal in results:
        limit = peer_allreduce.BUFFER_BYTES
        nbytes = numel * (2 if "bfloat16" in dtype else 4)
        assert took == (nbytes <= limit and nbytes % 4 == 0), (dtype, numel)
        assert eager_equal and graph_equal, (dtype, numel)


def _fused_vs_nccl_rank(rank: int, port: int, queue) -> None:
    from novainfer.distributed.workers import Launch, join_group, leave_group
    from novainfer.layers.norm import add_rms_norm, rms_norm

    faulthandler.dump_traceback_later(150, exit=True)  # a hang guard that says where
    launch = Launch(2, f"tcp://127.0.0.1:{port}", "nccl", torch.device("cuda", 0))
    tp = join_group(launch, rank)
    device = torch.device("cuda", rank)
    hidden, results = 4096, []
    assert tp.peer is not None and tp.peer.fuse_norm
    for dtype in (torch.bfloat16, torch.float32):
        for rows, with_res, with_bias in ((1, True, False), (7, False, False), (129, True, True),
                                          (256, True, False), (1024 // (dtype.itemsize // 2),
                                                               True, True)):
            shared = torch.Generator(device=device).manual_seed(rows)  # same on both ranks
            res = torch.randn(rows, hidden, generator=shared, device=device).to(dtype)
            res = res if with_res else None
            bias = torch.randn(hidden, generator=shared, device=device).to(dtype)
            bias = bias if with_bias else None
            w = (1 + 0.5 * torch.randn(hidden, generator=shared, device=device)).to(dtype)
            # Four calls, each on its own data: two eager (slots 0, 1), two in a graph
            # (slots 2, 0), so a slot overwritten too early shows in the next call's sum.
            gen = torch.Generator(device=device).manual_seed(rows * 10 + rank)
            xs = [(torch.randn(rows, hidden, generator=gen, device=device) * 3).to(dtype)
                  for _ in range(4)]
            wants = []
            for x in xs:
                s = x.clone()
                torch.distributed.all_reduce(s, group=tp.group)
                if bias is not None:
                    s = s + bias
                wants.append((rms_norm(s, w, 1e-5), s) if res is None
                             else add_rms_norm(s, res, w, 1e-5))
            assert tp.peer.fuses(xs[0], res, w)
            gots = [tp.peer.add_rms_norm(xs[0], res, w, 1e-5, bias, 0),
                    tp.peer.add_rms_norm(xs[1], res, w, 1e-5, bias, 1)]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = [tp.peer.add_rms_norm(xs[2], res, w, 1e-5, bias, 2),
                            tp.peer.add_rms_norm(xs[3], res, w, 1e-5, bias, 0)]
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            gots += captured
            same = [float((got[0] == want[0]).float().mean()) for got, want in zip(gots, wants)]
            close = all(torch.allclose(g.float(), r.float(), rtol=1.6e-2, atol=1e-2)
                        for got, want in zip(gots, wants) for g, r in zip(got, want))
            sums_equal = all(torch.equal(got[1], want[1]) for got, want in zip(gots, wants))
            mine = torch.stack([t.float() for got in gots for t in got])
            theirs = [torch.empty_like(mine) for _ in range(2)]
            torch.distributed.all_gather(theirs, mine, group=tp.group)
            results.append((str(dtype), rows, min(same), close, sums_equal,
                            bool(torch.equal(theirs[0], theirs[1]))))
            del graph
    if rank == 0:
        queue.put(results)
    torch.cuda.synchronize()
    leave_group()


def test_fused_allreduce_add_norm_matches_nccl_then_norm(monkeypatch):
    """The peer path's fused all-reduce + residual add + RMSNorm (kernels/allreduce_norm.py)
    against NCCL's sum, the bias and `add_rms_norm`: bf16 and fp32, one row to the slot's
    limit, more rows than programs, with and without residual and bias; four consecutive
    calls on different data (eager in slots 0 and 1, then a CUDA graph replayed in slots 2
    and 0), each checked; both ranks' results identical."""
    from novainfer.distributed import peer_allreduce

    monkeypatch.setenv(peer_allreduce.ENV, "peer")  # the ranks inherit both
    monkeypatch.setenv(peer_allreduce.FUSED_ENV, "1")
    results = _two_ranks(_fused_vs_nccl_rank)
    assert len(results) == 10
    for dtype, rows, same_out, close, sums_equal, ranks_agree in results:
        assert close and ranks_agree, (dtype, rows)
        assert sums_equal, (dtype, rows)  # two ranks: the sum is NCCL's, bit for bit
        if "bfloat16" in dtype:  # the norm's rounding repeated: nearly every element equal
            assert same_out > 0.97, (dtype, rows)


FUSED_ENGINE = """
import json, sys
from novainfer import LLM, SamplingParams
from conftest import random_prompts
llm = LLM(sys.argv[1], device="cuda", dtype="float32", tensor_parallel_size=2,
          max_model_len=512, max_num_seqs=16, num_kv_blocks=512)
tp = llm.llm_engine.runner.tp
assert tp.peer is not None and tp.peer.fuse_norm and llm.llm_engine.runner.graphs is not None
calls = []
fused = tp.peer.add_rms_norm
tp.peer.add_rms_norm = lambda *a: calls.append(1) or fused(*a)  # eager calls (prefills)
params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
outs = llm.generate(random_prompts({lengths}, seed=7), params, use_tqdm=False)
assert calls, "the fused kernel never ran"
print(json.dumps([list(o.outputs[0].token_ids) for o in outs]))
llm.shutdown()
"""


@pytest.mark.parametrize("name", ["llama", "z_llama_bias"])
def test_fp32_greedy_two_gpus_fused_allreduce_norm(checkpoint, name):
    """The peer path with its fused all-reduce + add + RMSNorm in a whole engine (CUDA
    graphs, fp32): tokens equal to transformers'. In a process of its own: the peer path
    serves only the first tensor-parallel engine of a process."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    model_dir = checkpoint(name)
    expected = hf_greedy(model_dir, random_prompts(LENGTHS, seed=7), 24)
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, NOVAINFER_ALLREDUCE="peer", NOVAINFER_FUSED_ALLREDUCE_NORM="1",
               PYTHONPATH=os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", FUSED_ENGINE.format(lengths=LENGTHS),
                           str(model_dir)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected
