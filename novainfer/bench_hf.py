"""transformers' continuous batching (`paged|sdpa`) on the bench workload, for --compare hf."""

from __future__ import annotations

import time

import torch


def run_hf_continuous_batching(model: str, random_weights: bool, work, device: torch.device) -> float:
    """Seconds transformers takes for the workload (per-request max_new_tokens, ignore EOS)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if random_weights:
        config = AutoConfig.from_pretrained(model)
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation="paged|sdpa"
            )
    else:
        hf = AutoModelForCausalLM.from_pretrained(
            model, dtype=dtype, attn_implementation="paged|sdpa"
        ).to(device)
    hf.eval()
    gen = GenerationConfig(do_sample=True, temperature=0.6, max_new_tokens=max(work.max_tokens),
                           eos_token_id=-1, pad_token_id=0)
    manager = hf.init_continuous_batching(generation_config=gen)
    manager.start()
    try:
        manager.add_request([1, 2, 3, 4], request_id="warmup", max_new_tokens=8, eos_token_id=-1)
        manager.get_result(request_id="warmup", timeout=600)
        _sync(device)
        start = time.perf_counter()
        for i, (prompt, m) in enumerate(zip(work.prompts, work.max_tokens)):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=m, eos_token_id=-1)
        for i in range(len(work.prompts)):
            if manager.get_result(request_id=f"r{i}", timeout=3600) is None:
                raise RuntimeError(f"transformers returned no result for request r{i}")
        _sync(device)
        return time.perf_counter() - start
    finally:
        manager.stop(block=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
