"""End to end on the GPU: triton backend vs reference backend vs transformers, CUDA graphs.

Runs on the device (skipped without CUDA): greedy tokens identical to transformers in fp32
(triton backend, eager and with CUDA graphs); last-position logits within 1e-2 relative
error of transformers' fp32 logits in bf16, for both attention backends.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CHECKPOINTS, completion_tokens, hf_greedy, hf_next_logits, random_prompts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# The parity test's prompts (seed 7), whose reference greedy steps have clear margins.
PROMPT_LENGTHS = [1, 2, 7, 15, 16, 17, 33, 64, 100, 200, 255, 300]
MAX_TOKENS = 32


def _llm(model_dir, **kwargs):
    from novainfer import LLM

    return LLM(str(model_dir), device="cuda", max_model_len=512, max_num_seqs=16, **kwargs)


def _greedy(llm, prompts):
    from novainfer import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return completion_tokens(llm.generate(prompts, params, use_tqdm=False))


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_fp32_greedy_matches_transformers_eager_and_graphs(checkpoint, name):
    model_dir = checkpoint(name)
    prompts = random_prompts(PROMPT_LENGTHS, seed=7)
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    graphs = _llm(model_dir, dtype="float32", attention_backend="triton")
    assert graphs.llm_engine.runner.graphs is not None
    assert _greedy(graphs, prompts) == expected
    del graphs
    eager = _llm(model_dir, dtype="float32", attention_backend="triton", enforce_eager=True)
    assert eager.llm_engine.runner.graphs is None
    assert _greedy(eager, prompts) == expected


def _engine_logits(llm, prompt: list[int]) -> torch.Tensor:
    """Last-position logits of one prefill through the engine's own step path."""
    from novainfer import SamplingParams

    engine = llm.llm_engine
    engine.add_request("probe", prompt, SamplingParams(max_tokens=1))
    try:
        runner = engine.runner
        inputs = runner.prepare(engine.scheduler.schedule())
        with torch.inference_mode():
            hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_cache, inputs.meta)
            return runner.model.compute_logits(hidden[inputs.logits_indices])[0].float().cpu()
    finally:
        engine.abort_request("probe")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_bf16_logits_close_to_transformers(checkpoint, name, backend):
    model_dir = checkpoint(name)
    llm = _llm(model_dir, dtype="bfloat16", attention_backend=backend, enforce_eager=True)
    for prompt in random_prompts([5, 64, 300], seed=3):
        ours = _engine_logits(llm, prompt)
        ref = hf_next_logits(model_dir, prompt)
        rel = (ours - ref).norm() / ref.norm()
        assert rel <= 1e-2, f"{name}/{backend}: relative logits error {rel:.3e}"
