"""fp8 KV cache vs the model-dtype cache: agreement of greedy continuations on a preset.

    python benchmarks/fp8_accuracy.py --preset qwen3-0.6b [--calculate-kv-scales] [--json]

The reference engine (kv_cache_dtype="auto") decodes random prompts greedily; then
- free-running: the fp8 engine decodes the same prompts; the fraction of positions with the
  same token, and the mean number of tokens before the first difference;
- teacher-forced: the fp8 engine reads each reference continuation back as a prompt
  (prompt_logprobs), so every position is judged on the same prefix: top-1 agreement with
  the reference token and |logprob error| of that token (mean, p99, max).
Two figures put those in context: the reference's own teacher-forced agreement (its decode
path against its prefill path: the model dtype's noise floor) and the median top-1/top-2
margin of the reference (random dummy weights give near-flat distributions, where any
perturbation flips tokens; real checkpoints have far larger margins).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics

import torch


def _engine(args, kv_cache_dtype: str):
    from novainfer import LLM
    from novainfer.presets import preset_folder

    return LLM(str(preset_folder(args.preset)), load_format="dummy", skip_tokenizer_init=True,
               max_model_len=args.prompt_len + args.tokens + 8, max_num_seqs=args.num_prompts,
               num_kv_blocks=args.num_prompts * ((args.prompt_len + args.tokens) // 16 + 2),
               kv_cache_dtype=kv_cache_dtype,
               calculate_kv_scales=args.calculate_kv_scales and kv_cache_dtype != "auto",
               seed=args.seed)


def _teacher_forced(llm, full, prompt_len, top):
    """Per continuation position: (logprob of the reference token, top-1 id, top-1/top-2 margin)."""
    from novainfer import SamplingParams

    outs = llm.generate(full, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=top),
                        use_tqdm=False)
    rows = []
    for o, f in zip(outs, full):
        for pos in range(prompt_len, len(f)):
            ranked = sorted(o.prompt_logprobs[pos].items(), key=lambda e: -e[1].logprob)
            margin = ranked[0][1].logprob - ranked[1][1].logprob if len(ranked) > 1 else 0.0
            rows.append((o.prompt_logprobs[pos][f[pos]].logprob, ranked[0][0], margin))
    return rows


def main() -> None:
    from novainfer import SamplingParams
    from novainfer.presets import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="qwen3-0.6b")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calculate-kv-scales", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    vocab = PRESETS[args.preset]["vocab_size"]
    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(10, vocab, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.num_prompts)]
    greedy = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)

    ref_llm = _engine(args, "auto")
    ref_tokens = [list(o.outputs[0].token_ids)
                  for o in ref_llm.generate(prompts, greedy, use_tqdm=False)]
    full = [p + t for p, t in zip(prompts, ref_tokens)]
    ref_rows = _teacher_forced(ref_llm, full, args.prompt_len, top=2)
    device = str(ref_llm.llm_engine.runner.device)
    del ref_llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the fp8 engine sizes nothing from free memory, but be tidy

    fp8 = _engine(args, "fp8")
    backend = fp8.llm_engine.runner.backend.name
    fp8_tokens = [list(o.outputs[0].token_ids) for o in fp8.generate(prompts, greedy, use_tqdm=False)]
    fp8_rows = _teacher_forced(fp8, full, args.prompt_len, top=1)
    scales = fp8.llm_engine.runner.worker.kv_scales

    refs = [t for f in full for t in f[args.prompt_len:]]
    same = [a == b for x, y in zip(ref_tokens, fp8_tokens) for a, b in zip(x, y)]
    first_diff = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                  for x, y in zip(ref_tokens, fp8_tokens)]
    errs = sorted(abs(a[0] - b[0]) for a, b in zip(ref_rows, fp8_rows))
    result = {
        "preset": args.preset, "device": device, "attention_backend": backend,
        "calculate_kv_scales": args.calculate_kv_scales,
        "kv_scales_range": [round(float(scales.min()), 6), round(float(scales.max()), 6)],
        "positions": len(same),
        "free_running_agreement": round(sum(same) / len(same), 4),
        "mean_tokens_before_first_difference": round(statistics.mean(first_diff), 1),
        "teacher_forced_top1_agreement": round(
            sum(r[1] == t for r, t in zip(fp8_rows, refs)) / len(refs), 4),
        "reference_self_agreement": round(
            sum(r[1] == t for r, t in zip(ref_rows, refs)) / len(refs), 4),
        "logprob_err_mean": round(statistics.mean(errs), 5),
        "logprob_err_p99": round(errs[int(0.99 * (len(errs) - 1))], 5),
        "logprob_err_max": round(errs[-1], 5),
        "reference_median_margin": round(statistics.median(r[2] for r in ref_rows), 5),
    }
    print(f"{args.preset} ({device}, {backend}): fp8 vs auto over {len(same)} positions: "
          f"free-running {100 * result['free_running_agreement']:.1f}% "
          f"({result['mean_tokens_before_first_difference']} tokens before the first "
          f"difference); teacher-forced top-1 {100 * result['teacher_forced_top1_agreement']:.1f}% "
          f"(the reference against itself {100 * result['reference_self_agreement']:.1f}%); "
          f"|logprob error| mean {result['logprob_err_mean']} p99 {result['logprob_err_p99']} "
          f"max {result['logprob_err_max']}; reference median top-1/top-2 margin "
          f"{result['reference_median_margin']} nats")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
