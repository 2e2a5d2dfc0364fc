"""Greedy parity with transformers on every supported architecture / config variant.

For each tiny checkpoint (see conftest.CHECKPOINTS) one batch of prompts with lengths
spread over 1..300 is decoded greedily by novainfer (fp32, CPU, EOS ignored) and by
transformers (one prompt at a time).  Token ids must match exactly, and the log-prob that
novainfer reports for each sampled token must match transformers' log_softmax.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    CHECKPOINTS,
    hf_greedy,
    hf_logprobs,
    make_llm,
    random_prompts,
)

# Covers length 1, block-size boundaries (15/16/17, 32/33) and long prompts (~300).
PROMPT_LENGTHS = [1, 2, 7, 15, 16, 17, 33, 64, 100, 200, 255, 300]
MAX_TOKENS = 32
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def case(request, checkpoint):
    """(name, folder, prompts, novainfer outputs, transformers greedy tokens) per checkpoint."""
    from novainfer import SamplingParams

    name = request.param
    model_dir = checkpoint(name)
    prompts = random_prompts(PROMPT_LENGTHS, seed=7)
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)

    llm = make_llm(model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    del llm
    return name, model_dir, prompts, outputs, expected


def test_greedy_tokens_match_transformers(case):
    name, _, prompts, outputs, expected = case
    assert len(outputs) == len(prompts)
    mismatches = []
    for prompt, out, exp in zip(prompts, outputs, expected):
        assert out.prompt_token_ids == prompt
        assert len(out.outputs) == 1
        got = list(out.outputs[0].token_ids)
        if got != exp:
            first = next((i for i, (a, b) in enumerate(zip(got, exp)) if a != b), None)
            mismatches.append(
                f"prompt len {len(prompt)}: first diff at step {first}; "
                f"novainfer {got[:12]}... vs transformers {exp[:12]}..."
            )
    assert not mismatches, f"[{name}] greedy mismatch:\n" + "\n".join(mismatches)


def test_finish_reason_length(case):
    _, _, _, outputs, _ = case
    for out in outputs:
        assert out.finished
        comp = out.outputs[0]
        assert len(comp.token_ids) == MAX_TOKENS
        assert comp.finish_reason == "length"


def test_sampled_token_logprobs_match_transformers(case):
    name, model_dir, prompts, outputs, _ = case
    worst = 0.0
    for prompt, out in zip(prompts, outputs):
        comp = out.outputs[0]
        assert comp.logprobs is not None and len(comp.logprobs) == len(comp.token_ids)
        ref = hf_logprobs(model_dir, prompt, comp.token_ids)
        ref_cum = 0.0
        for step, (tok, pos) in enumerate(zip(comp.token_ids, comp.logprobs)):
            assert tok in pos, f"sampled token {tok} missing from logprobs at step {step}"
            # greedy: the sampled token is the argmax -> rank 1
            assert pos[tok].rank == 1, f"[{name}] step {step}: rank {pos[tok].rank}"
            expected = ref[step, tok].item()
            ref_cum += expected
            diff = abs(pos[tok].logprob - expected)
            worst = max(worst, diff)
            assert diff <= LOGPROB_ATOL, (
                f"[{name}] prompt len {len(prompt)} step {step}: logprob "
                f"{pos[tok].logprob:.6f} vs transformers {expected:.6f}"
            )
        assert comp.cumulative_logprob == pytest.approx(ref_cum, abs=1e-3)


def test_reference_checkpoints_are_discriminative(checkpoint):
    """Guards the power of the parity tests: the tiny random models are not degenerate.

    - long-prompt greedy continuations are not a single repeated token;
    - the llama3 rope scaling changes the greedy output (so a wrong/missing scaling
      implementation cannot pass the llama3_rope parity test by accident).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    prompts = random_prompts([100, 200, 300], seed=7)
    model_dir = checkpoint("llama3_rope")
    scaled = hf_greedy(model_dir, prompts, MAX_TOKENS)
    for toks in scaled:
        assert len(set(toks)) > 3

    config = AutoConfig.from_pretrained(model_dir)
    assert config.rope_parameters["rope_type"] == "llama3"
    config.rope_parameters = {
        "rope_type": "default",
        "rope_theta": config.rope_parameters["rope_theta"],
    }
    plain = AutoModelForCausalLM.from_pretrained(
        model_dir, config=config, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        for prompt, toks in zip(prompts, scaled):
            full = torch.tensor([prompt + toks])
            unscaled_argmax = plain(full).logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
            assert unscaled_argmax != toks
