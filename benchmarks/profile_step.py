"""Where a decode-heavy step spends its time: host functions (cProfile) and GPU kernels.

    python benchmarks/profile_step.py --preset qwen3-0.6b [--skip 100] [--steps 100]
        [--kv-cache-dtype fp8] [--rows 25]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch


def main() -> None:
    from novainfer import LLM, SamplingParams
    from novainfer.bench import make_workload
    from novainfer.presets import PRESETS, preset_folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="qwen3-0.6b")
    parser.add_argument("--skip", type=int, default=100, help="steps run before profiling")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"])
    parser.add_argument("--rows", type=int, default=25, help="rows of each table")
    args = parser.parse_args()
    llm = LLM(str(preset_folder(args.preset)), load_format="dummy", skip_tokenizer_init=True,
              max_model_len=4096, kv_cache_dtype=args.kv_cache_dtype)
    engine = llm.llm_engine
    work = make_workload(256, 1024, 1024)
    for i, (p, m) in enumerate(zip(work.prompts, work.max_tokens)):
        engine.add_request(str(i), p, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m))
    for _ in range(args.skip):
        engine.step()
    cuda = engine.runner.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        engine.step()
    prof.disable()
    wall = (time.perf_counter() - start) / args.steps
    print(f"{args.steps} steps, batch {len(engine.scheduler.running)}: {wall * 1e3:.2f} ms/step")
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.rows)
    if cuda:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(10):
                engine.step()
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
