"""CPU throughput: novainfer vs transformers' batched `generate`, same weights, same process.

Workload: N requests (default 32) with prompts of 32-256 random token ids and outputs of
16-256 tokens (ignore_eos). transformers pads the batch and runs every row to the longest
output; both engines are credited only the requested tokens.

    python benchmarks/cpu_vs_transformers.py [--threads 2] [--num-requests 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import torch


def workload(n: int, vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randint(0, vocab - 1) for _ in range(rng.randint(32, 256))] for _ in range(n)]
    outputs = [rng.randint(16, 256) for _ in range(n)]
    return prompts, outputs


def run_novainfer(folder: str, prompts: list[list[int]], outputs: list[int]) -> float:
    from novainfer import LLM, SamplingParams

    llm = LLM(folder, dtype="float32", device="cpu")
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=m) for m in outputs]
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(r.outputs[0].token_ids) for r in results)
    if produced != sum(outputs):
        raise RuntimeError(f"novainfer produced {produced} tokens, expected {sum(outputs)}")
    return elapsed


def run_transformers(folder: str, prompts: list[list[int]], outputs: list[int]) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pad = 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    longest = max(outputs)
    with torch.inference_mode():
        model.generate(ids[:1, -16:], attention_mask=mask[:1, -16:], max_new_tokens=4,
                       do_sample=False, pad_token_id=pad)  # warm-up
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                       do_sample=False, pad_token_id=pad)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="HF folder (default: the built-in model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true", help="only run novainfer")
    parser.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from novainfer.loader.model_path import resolve_model
    from novainfer.models.config import ModelConfig

    folder = str(resolve_model(args.model))
    vocab = ModelConfig.from_folder(folder).vocab_size
    prompts, outputs = workload(args.num_requests, vocab, args.seed)
    credited = sum(outputs)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "torch": torch.__version__,
        "requests": args.num_requests,
        "prompt_tokens": sum(len(p) for p in prompts),
        "output_tokens": credited,
    }
    t_nova = run_novainfer(folder, prompts, outputs)
    result["novainfer_s"] = round(t_nova, 2)
    result["novainfer_tok_s"] = round(credited / t_nova, 1)
    print(f"novainfer     {credited} tokens in {t_nova:7.2f} s = {credited / t_nova:8.1f} tok/s")
    if not args.skip_hf:
        # The engine adapts torch's thread count to the free cores (novainfer/threads.py):
        # give transformers the same count novainfer started with.
        torch.set_num_threads(args.threads)
        t_hf = run_transformers(folder, prompts, outputs)
        result["transformers_s"] = round(t_hf, 2)
        result["transformers_tok_s"] = round(credited / t_hf, 1)
        result["speedup"] = round(t_hf / t_nova, 2)
        print(f"transformers  {credited} tokens in {t_hf:7.2f} s = {credited / t_hf:8.1f} tok/s")
        print(f"speedup       {t_hf / t_nova:.2f}x")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
