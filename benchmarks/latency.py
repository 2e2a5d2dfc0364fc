"""Batch-1 latency: time to first token and ms per decoded token at a given context.

    python benchmarks/latency.py --preset qwen3-0.6b [--context 1000] [--tokens 256]
        [--temperature 0.6]   # sampled, not greedy: the sampler's draw in every step
        [--kv-cache-dtype fp8]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from novainfer import LLM, SamplingParams
    from novainfer.presets import PRESETS, preset_folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="qwen3-0.6b")
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy (argmax); above: the sampler's draw")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "fp8_e4m3"], default="auto")
    parser.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    llm = LLM(str(preset_folder(args.preset)), load_format="dummy", skip_tokenizer_init=True,
              max_model_len=args.context + args.tokens + 8, max_num_seqs=8,
              enable_prefix_caching=False, enforce_eager=args.enforce_eager,
              tensor_parallel_size=args.tensor_parallel_size,
              kv_cache_dtype=args.kv_cache_dtype)
    device = llm.llm_engine.runner.device
    prompt = [(i * 7919) % 10000 for i in range(args.context)]

    def timed(max_tokens: int) -> float:
        params = SamplingParams(temperature=args.temperature, ignore_eos=True,
                                max_tokens=max_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(4)
    ttft = min(timed(1) for _ in range(3))
    full = min(timed(args.tokens + 1) for _ in range(2))
    per_token_ms = (full - ttft) / args.tokens * 1e3
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    tp = args.tensor_parallel_size
    name = f"{tp} x {name}" if tp > 1 else name
    print(f"{args.preset} on {name}: time to first token ({args.context}-token prompt) "
          f"{ttft * 1e3:.2f} ms; decode {per_token_ms:.3f} ms/token at batch 1"
          + (f", temperature {args.temperature}" if args.temperature else "")
          + (f", {args.kv_cache_dtype} KV cache" if args.kv_cache_dtype != "auto" else ""))
    if args.json:
        print(json.dumps({"preset": args.preset, "device": name, "tensor_parallel_size": tp,
                          "context": args.context, "temperature": args.temperature,
                          "kv_cache_dtype": args.kv_cache_dtype,
                          "ttft_ms": round(ttft * 1e3, 2), "decode_ms_per_token": round(per_token_ms, 3)}))
    llm.shutdown()


if __name__ == "__main__":
    main()
