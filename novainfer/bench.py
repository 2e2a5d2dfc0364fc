"""`novainfer bench`: nano-vLLM's bench.py offline throughput workload, with the hardware floor.

Workload (nano-vLLM's bench.py): random.seed(0); 256 prompts of randint(100, 1024) random ids
in [0, 10000]; then 256 output lengths randint(100, 1024); temperature 0.6, ignore_eos;
one warm-up request; one timed generate() over all. 133,966 output tokens in total.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from novainfer.bench_strict import StrictCheck, reserve_small_pool


@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)

    def kv_pairs(self) -> int:
        """(token, context) pairs the decode steps must read: each output token after the
        first attends over its whole context once."""
        return sum(m * len(p) + m * (m - 1) // 2 for p, m in zip(self.prompts, self.max_tokens))


DRAW_ORDERS = ("benchpy", "interleaved")
TIMED_SAMPLING = {"temperature": 0.6}  # nano-vLLM's bench.py: temperature alone


def make_workload(num_seqs: int, max_input_len: int, max_output_len: int, seed: int = 0,
                  draw_order: str = "benchpy") -> Workload:
    """nano-vLLM's bench.py workload: prompts of 100..max_input_len random ids, outputs of
    100..max_output_len tokens. `draw_order` "benchpy" draws every prompt, then every
    max_tokens (bench.py; 133,966 output tokens at the defaults), "interleaved" each
    request's prompt and max_tokens together (seed 003's runs; 140,084)."""
    if draw_order not in DRAW_ORDERS:
        raise ValueError(f"draw_order must be one of {DRAW_ORDERS}, got {draw_order!r}")
    rng = random.Random(seed)
    lo_in, lo_out = min(100, max_input_len), min(100, max_output_len)

    def prompt() -> list[int]:
        return [rng.randint(0, 10000) for _ in range(rng.randint(lo_in, max_input_len))]

    if draw_order == "interleaved":
        pairs = [(prompt(), rng.randint(lo_out, max_output_len)) for _ in range(num_seqs)]
        return Workload([p for p, _ in pairs], [m for _, m in pairs])
    prompts = [prompt() for _ in range(num_seqs)]
    max_tokens = [rng.randint(lo_out, max_output_len) for _ in range(num_seqs)]
    return Workload(prompts, max_tokens)


def measure_bandwidth(device: torch.device) -> float:
    """Copy bandwidth in bytes/s, counting read + write (as the reference floor does)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    reps = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * n * reps / (time.perf_counter() - start)


def measure_matmul(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul rate in FLOP/s at the model's dtype."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps = 10 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kv_bytes_per_token(runner) -> int:
    """KV-cache bytes one token of context takes on one rank, all layers (1 byte an element
    with an fp8 cache)."""
    cfg = runner.model_config
    return (cfg.num_layers * 2 * runner.worker.num_kv_heads * cfg.head_dim
            * runner.kv_cache.element_size())


def floor_seconds(llm, work: Workload, steps: int, bandwidth: float, flops: float) -> dict:
    """The time the run cannot beat: bytes it must move over bandwidth + matmul FLOPs. With
    tensor parallelism the ranks work at once, so this is one rank's share (its weight
    shard, its KV heads) over one device's bandwidth: the N devices' floor."""
    runner = llm.llm_engine.runner
    cfg = runner.model_config
    kv_per_token = kv_bytes_per_token(runner)
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    embed = cfg.vocab_size * cfg.hidden_size // runner.tp.size
    matmul_params = sum(p.numel() for p in runner.model.parameters()) - (
        embed if not cfg.tie_word_embeddings else 0
    )
    tokens = work.prompt_tokens + work.output_tokens
    kv_bytes = work.kv_pairs() * kv_per_token
    weights_total = weight_bytes * steps
    flop = 2 * matmul_params * tokens
    seconds = (kv_bytes + weights_total) / bandwidth + flop / flops
    return {
        "kv_read_bytes": kv_bytes,
        "weight_read_bytes": weights_total,
        "matmul_flop": flop,
        "bandwidth_Bps": bandwidth,
        "matmul_flops": flops,
        "floor_s": seconds,
    }


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from novainfer.presets import PRESETS

    parser.add_argument("--model", default=None, help="HF model folder or .gguf (real weights)")
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="random weights of a known shape (no download; default: tiny "
                        "unless --model is given)")
    parser.add_argument("--num-seqs", type=int, default=None, help="requests (default 256; tiny: 16)")
    parser.add_argument("--max-input-len", type=int, default=None, help="default 1024; tiny: 128")
    parser.add_argument("--max-output-len", type=int, default=None, help="default 1024; tiny: 128")
    parser.add_argument("--max-model-len", type=int, default=4096, help="context length")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="sequences per step")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="tokens per step (default: 16384 on CUDA, 512 on the CPU)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--attention-backend", default="auto",
                        help="auto, torch, cpu, triton, flash_attn, cudnn")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of GPU memory for weights, activations and KV cache")
    parser.add_argument("--compare", choices=["hf"], default=None,
                        help="also run transformers' continuous batching on the same workload")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    from novainfer.cli import (
        add_async_scheduling_arg,
        add_kv_cache_args,
        add_lora_arg,
        add_tensor_parallel_arg,
    )

    add_tensor_parallel_arg(parser)
    add_async_scheduling_arg(parser)
    add_kv_cache_args(parser)
    add_lora_arg(parser)
    parser.add_argument("--lora-count", type=int, default=0,
                        help="random LoRA adapters of the model's shapes, requests assigned "
                             "round-robin (0: none)")
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of --lora-count adapters")
    parser.add_argument("--seed", type=int, default=0, help="the workload's random seed")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus filter of every request (1 = off: temperature 0.6 alone, "
                             "the workload's usual sampling)")
    parser.add_argument("--top-k", type=int, default=-1, help="top-k of every request (-1 = off)")
    parser.add_argument("--draw-order", choices=DRAW_ORDERS, default="benchpy",
                        help="benchpy: all prompts, then all lengths (nano-vLLM's bench.py); "
                             "interleaved: each request's prompt and length together")
    parser.add_argument("--rounds", type=int, default=1,
                        help="timed runs of the workload (the prefix cache emptied before "
                             "each); the mean and spread are reported")
    parser.add_argument("--strict", action="store_true",
                        help="fail (exit 1) when a timed round compiles anything (Triton, "
                             "torch.compile), takes new device memory (new allocator segments) "
                             "or produces another token total than expected")
    return parser


def warm_up_largest_steps(llm, max_num_seqs: int, max_num_batched_tokens: int,
                          max_model_len: int, loras: list | None = None,
                          sampling: dict | None = None) -> None:
    """Untimed: a prefill step of up to max_num_batched_tokens and a decode step of
    max_num_seqs rows, sampled as the timed run samples (with `loras`, the adapters taken in
    turn, so the LoRA buffers reach their largest shapes too). The worker empties the
    allocator's cache after its profiling pass; this fills it back at the largest step
    shapes, so the timed run takes no memory from the device (what --strict checks), and
    keeps headroom in the small pool (`reserve_small_pool`)."""
    from novainfer import SamplingParams

    length = max(1, min(max_num_batched_tokens // max_num_seqs, max_model_len - 2))
    top = min(10000, llm.llm_engine.runner.model_config.vocab_size - 1)
    rng = random.Random(12345)  # distinct prompts: the prefix cache must not share them
    prompts = [[rng.randint(0, top) for _ in range(length)] for _ in range(max_num_seqs)]
    params = SamplingParams(**(sampling or TIMED_SAMPLING), ignore_eos=True, max_tokens=2)
    requests = [loras[i % len(loras)] for i in range(max_num_seqs)] if loras else None
    llm.generate(prompts, params, use_tqdm=False, lora_request=requests)
    reserve_small_pool(llm.llm_engine.runner.device)


def _bench_loras(args: argparse.Namespace, engine, num_seqs: int, folder) -> list:
    """One LoRARequest (or None) per request: --lora for all, or --lora-count random ones
    written under `folder`, round-robin."""
    from novainfer.cli import lora_from_args
    from novainfer.lora.random_adapter import write_random_adapter
    from novainfer.lora.request import LoRARequest

    lora, _ = lora_from_args(args)
    if lora is not None:
        return [lora] * num_seqs
    if not args.lora_count:
        return [None] * num_seqs
    requests = [
        LoRARequest(f"random-{k}", k + 1, str(write_random_adapter(
            folder / f"random-{k}", engine.model_config, args.lora_rank, seed=k)))
        for k in range(args.lora_count)
    ]
    return [requests[i % len(requests)] for i in range(num_seqs)]


def _lora_engine_args(args: argparse.Namespace) -> dict:
    from novainfer.cli import lora_from_args

    if args.lora_count and args.lora:
        raise ValueError("give --lora or --lora-count, not both")
    if args.lora_count < 0:
        raise ValueError(f"--lora-count must be >= 0, got {args.lora_count}")
    if args.lora_count:
        return {"enable_lora": True, "max_loras": args.lora_count,
                "max_lora_rank": args.lora_rank}
    return lora_from_args(args)[1]


def run(args: argparse.Namespace,
        around_round: Callable[[object], AbstractContextManager] | None = None) -> dict:
    """The bench; `around_round(llm)`, when given, returns a context manager entered around
    each timed generate() (benchmarks/run_breakdown.py profiles the round with it)."""
    from novainfer import LLM, SamplingParams
    from novainfer.presets import preset_folder

    if args.model and args.preset:
        raise ValueError("give --model or --preset, not both")
    tiny = args.preset == "tiny"
    num_seqs = args.num_seqs or (16 if tiny else 256)
    max_in = args.max_input_len or (128 if tiny else 1024)
    max_out = args.max_output_len or (128 if tiny else 1024)
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    sampling = {**TIMED_SAMPLING, "top_p": args.top_p, "top_k": args.top_k}
    SamplingParams(**sampling)  # a bad --top-p / --top-k: its ValueError before any loading
    work = make_workload(num_seqs, max_in, max_out, args.seed, args.draw_order)
    preset = args.preset or (None if args.model else "tiny")
    model = args.model or str(preset_folder(preset))
    extra = {"load_format": "dummy", "skip_tokenizer_init": True} if preset else {}
    llm = LLM(
        model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
        async_scheduling=args.async_scheduling,
        kv_cache_dtype=args.kv_cache_dtype,
        calculate_kv_scales=args.calculate_kv_scales,
        **extra,
        **_lora_engine_args(args),
    )
    engine = llm.llm_engine
    device = engine.runner.device
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    adapters = tempfile.TemporaryDirectory(prefix="novainfer-bench-lora-")
    loras = _bench_loras(args, engine, len(work.prompts), Path(adapters.name))
    used = list(dict.fromkeys(lora for lora in loras if lora is not None))
    if used:  # read, checked and their kernels compiled before the clock starts
        llm.generate([[1, 2, 3, 4]] * len(used), SamplingParams(max_tokens=8), use_tqdm=False,
                     lora_request=used)
    if device.type == "cuda":
        warm_up_largest_steps(llm, engine.scheduler.max_num_seqs,
                              engine.scheduler.max_num_batched_tokens, engine.max_model_len,
                              used, sampling)
    params = [SamplingParams(**sampling, ignore_eos=True, max_tokens=m) for m in work.max_tokens]
    if engine.step_timer is not None:  # --step-timing / NOVAINFER_STEP_TIMING=1
        engine.step_timer.reset()  # time the measured run only, not the warm-up
    round_seconds = []
    strict = StrictCheck.for_device(device) if args.strict else None
    for _ in range(args.rounds):
        if not llm.reset_prefix_cache():  # each round computes every prompt, as the first
            raise RuntimeError("the prefix cache could not be emptied between rounds")
        steps_before = engine.num_steps
        _sync(device)
        with strict.round(work.output_tokens) if strict else nullcontext() as checked:
            with around_round(llm) if around_round else nullcontext():
                start = time.perf_counter()
                outputs = llm.generate(work.prompts, params, use_tqdm=False, lora_request=loras)
                _sync(device)
                round_seconds.append(time.perf_counter() - start)
            produced = sum(len(o.outputs[0].token_ids) for o in outputs)
            if checked is not None:
                checked.produced = produced
        if produced != work.output_tokens and strict is None:  # --strict reports it at the end
            raise RuntimeError(f"produced {produced} tokens, expected {work.output_tokens}")
    adapters.cleanup()
    steps = engine.num_steps - steps_before  # of one round
    seconds = statistics.mean(round_seconds)
    floor = floor_seconds(llm, work, steps, measure_bandwidth(device), measure_matmul(device, engine.runner.dtype))
    result = {
        "model": args.model or preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(engine.runner.dtype).replace("torch.", ""),
        "kv_cache_dtype": str(engine.runner.kv_cache.dtype).replace("torch.", ""),
        "attention_backend": engine.runner.backend.name,
        "cuda_graphs": engine.runner.graphs is not None,
        "num_seqs": num_seqs,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": engine.scheduler.max_num_batched_tokens,
        "max_model_len": engine.max_model_len,
        "kv_blocks": engine.runner.num_blocks,
        "tensor_parallel_size": engine.runner.tp.size,
        "lora_adapters": len({lora for lora in loras if lora is not None}),
        "prompt_tokens": work.prompt_tokens,
        "output_tokens": produced,
        "steps": steps,
        "seconds": round(seconds, 3),
        "output_tok_s": round(produced / seconds, 1),
        "rounds_tok_s": [round(produced / t, 1) for t in round_seconds],
        "seed": args.seed,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "draw_order": args.draw_order,
        "floor_s": round(floor["floor_s"], 3),
        "floor_tok_s": round(produced / floor["floor_s"], 1),
        "fraction_of_floor": round(floor["floor_s"] / seconds, 3),
        "bandwidth_TBps": round(floor["bandwidth_Bps"] / 1e12, 3),
        "matmul_TFLOPs": round(floor["matmul_flops"] / 1e12, 1),
        "kv_read_TB": round(floor["kv_read_bytes"] / 1e12, 3),
        "weight_read_TB": round(floor["weight_read_bytes"] / 1e12, 3),
    }
    if strict is not None:
        result["strict"] = strict.summary()
    if engine.step_timer is not None:
        result["step_timing"] = engine.step_timer.summary()
        engine.step_timer.reported = True  # print_report shows it
    if args.compare == "hf":
        from novainfer.bench_hf import run_hf_continuous_batching

        del llm, engine, outputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        hf_s = run_hf_continuous_batching(model, bool(preset), work, device)
        result["hf_seconds"] = round(hf_s, 3)
        result["hf_output_tok_s"] = round(work.output_tokens / hf_s, 1)
    return result


def print_report(result: dict, as_json: bool) -> None:
    keys = ["model", "device", "dtype", "kv_cache_dtype", "attention_backend", "cuda_graphs", "num_seqs",
            "max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_blocks",
            "tensor_parallel_size", "lora_adapters", "steps"]
    print("configuration: " + ", ".join(f"{k}={result[k]}" for k in keys))
    print(f"total: {result['prompt_tokens']} prompt + {result['output_tokens']} output tokens "
          f"in {result['seconds']:.2f} s")
    rounds = result["rounds_tok_s"]
    spread = (f" (mean of {len(rounds)} rounds, sd {statistics.stdev(rounds):,.1f}: "
              + ", ".join(f"{r:,.1f}" for r in rounds) + ")") if len(rounds) > 1 else ""
    print(f"throughput: {result['output_tok_s']:,.1f} output tok/s{spread}")
    print(f"floor: {result['floor_s']:.2f} s = {result['floor_tok_s']:,.1f} tok/s "
          f"(KV reads {result['kv_read_TB']} TB + weights {result['weight_read_TB']} TB over "
          f"{result['bandwidth_TBps']} TB/s, matmuls at {result['matmul_TFLOPs']} TFLOP/s); "
          f"achieved {100 * result['fraction_of_floor']:.1f}% of it")
    if "hf_output_tok_s" in result:
        print(f"transformers continuous batching: {result['hf_output_tok_s']:,.1f} tok/s "
              f"({result['hf_seconds']:.2f} s); novainfer is "
              f"{result['output_tok_s'] / result['hf_output_tok_s']:.1f}x")
    if "strict" in result:
        strict = result["strict"]
        memory = "" if strict["memory_checked"] else " (device memory not checked on the CPU)"
        print("strict: " + ("ok: no compiles, no new device memory, token totals as expected"
                            + memory if strict["ok"] else
                            "FAILED:\n  " + "\n  ".join(strict["violations"])))
    if "step_timing" in result:
        from novainfer.engine.step_timer import format_summary

        print(format_summary(result["step_timing"]))
    if as_json:
        print(json.dumps(result))
