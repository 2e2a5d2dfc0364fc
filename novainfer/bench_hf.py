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
        _collect(manager, {"warmup"})
        _sync(device)
        start = time.perf_counter()
        ids = set()
        for i, (prompt, m) in enumerate(zip(work.prompts, work.max_tokens)):
            ids.add(manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=m,
                                        eos_token_id=-1) or f"r{i}")
        _collect(manager, ids)
        _sync(device)
        return time.perf_counter() - start
    finally:
        manager.stop(block=True)


def _collect(manager, ids: set[str], timeout: float = 3600.0) -> None:
    """Wait for a finished result of every id (results arrive in completion order)."""
    pending = set(ids)
    deadline = time.monotonic() + timeout
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"transformers did not finish {len(pending)} requests in time")
        result = manager.get_result(timeout=1.0)
        if result is None:
            if not manager.is_running():
                raise RuntimeError("transformers' continuous batching stopped early")
            continue
        pending.discard(result.request_id)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
