"""Bad input is rejected with ValueError/TypeError whose message names the offending field
(never AssertionError/IndexError), and the same LLM keeps serving good requests exactly."""

from __future__ import annotations

import json
import os

import pytest
from conftest import VOCAB_SIZE, copy_checkpoint, hf_greedy, make_llm, random_prompts

from novainfer import LLM, SamplingParams
from novainfer.inputs import PromptInputs

MAX_MODEL_LEN = 64
GOOD_PROMPT = random_prompts([10], seed=3)[0]
GOOD_PARAMS = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(checkpoint):
    return checkpoint("llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    return make_llm(model_dir, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def good_expected(model_dir):
    return hf_greedy(model_dir, [GOOD_PROMPT], GOOD_PARAMS["max_tokens"])[0]


def assert_still_serves(llm, good_expected):
    """The engine answers a good request exactly, and only that request."""
    outs = llm.generate([GOOD_PROMPT], SamplingParams(**GOOD_PARAMS), use_tqdm=False)
    assert len(outs) == 1
    assert outs[0].prompt_token_ids == GOOD_PROMPT
    assert list(outs[0].outputs[0].token_ids) == good_expected


def test_token_ids_beyond_the_model_vocabulary_on_every_path(llm, good_expected):
    """Ids also reach the engine as PromptInputs (a chat template's rendering, the server's
    frontend, which tokenizes): a tokenizer that knows more tokens than the model has rows of
    embedding must give a ValueError there too, not an out-of-range index on the device."""
    engine = llm.llm_engine
    for ids, bad in (([5, VOCAB_SIZE], VOCAB_SIZE), ([-1, 5], -1)):
        with pytest.raises(ValueError, match=f"prompt token id {bad} is out of range"):
            engine.add_request("big", PromptInputs(ids), SamplingParams(max_tokens=2))
    assert not engine.has_unfinished_requests()
    assert_still_serves(llm, good_expected)


# --------------------------------------------------------------------------- generate()

BAD_REQUESTS = [
    # (id, prompts, sampling-params kwargs, exception, message regex)
    ("empty_string_prompt", "", {}, ValueError, r"(?i)prompt"),
    ("empty_token_list_prompt", [[]], {}, ValueError, r"(?i)prompt"),
    ("no_prompts", [], {}, ValueError, r"(?i)prompt"),
    (
        "prompt_longer_than_max_model_len",
        [list(range(5, 5 + MAX_MODEL_LEN + 1))],
        {},
        ValueError,
        r"max_model_len",
    ),
    (
        "prompt_plus_max_tokens_too_long",
        [list(range(5, 5 + MAX_MODEL_LEN - 4))],
        {"max_tokens": 10},
        ValueError,
        r"max_tokens|max_model_len",
    ),
    ("token_id_equal_vocab_size", [[5, 6, VOCAB_SIZE]], {}, ValueError, r"(?i)token"),
    ("token_id_far_too_large", [[5, 10**6]], {}, ValueError, r"(?i)token"),
    ("negative_token_id", [[5, -1, 6]], {}, ValueError, r"(?i)token"),
    ("bad_prompt_among_good_ones", [GOOD_PROMPT, [7, -3]], {}, ValueError, r"(?i)token"),
    (
        "too_long_prompt_among_good_ones",
        [GOOD_PROMPT, list(range(5, 5 + 200))],
        {},
        ValueError,
        r"max_model_len",
    ),
]


@pytest.mark.parametrize(
    "prompts, params, exc, match", [r[1:] for r in BAD_REQUESTS], ids=[r[0] for r in BAD_REQUESTS]
)
def test_bad_request_then_good_one(llm, good_expected, prompts, params, exc, match):
    sp = SamplingParams(temperature=0.0, **params)
    with pytest.raises(exc, match=match):
        llm.generate(prompts, sp, use_tqdm=False)
    assert_still_serves(llm, good_expected)


@pytest.mark.parametrize("n_params", [1, 3])
def test_sampling_params_list_length_mismatch(llm, good_expected, n_params):
    prompts = [GOOD_PROMPT, GOOD_PROMPT[:5]]
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(prompts, [SamplingParams()] * n_params, use_tqdm=False)
    assert_still_serves(llm, good_expected)


BAD_SAMPLING = [
    # (kwargs, field name the message must contain)
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.2}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"n": 0}, r"\bn\b"),
    ({"n": -1}, r"\bn\b"),
]


@pytest.mark.parametrize("kwargs, field", BAD_SAMPLING, ids=[str(k) for k, _ in BAD_SAMPLING])
def test_bad_sampling_params_via_generate(llm, good_expected, kwargs, field):
    with pytest.raises(ValueError, match=field):
        llm.generate([GOOD_PROMPT], SamplingParams(**kwargs), use_tqdm=False)
    assert_still_serves(llm, good_expected)


# --------------------------------------------------------------------------- SamplingParams alone


@pytest.mark.parametrize("kwargs, field", BAD_SAMPLING, ids=[str(k) for k, _ in BAD_SAMPLING])
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


BAD_TYPES = [
    ({"max_tokens": "8"}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"n": 1.0}, r"\bn\b"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_k": 1.5}, "top_k"),
]


@pytest.mark.parametrize("kwargs, field", BAD_TYPES, ids=[str(k) for k, _ in BAD_TYPES])
def test_sampling_params_wrong_types(kwargs, field):
    with pytest.raises((TypeError, ValueError), match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"temperature": 0.0},
        {"top_p": 1.0, "top_k": -1},
        {"top_p": 0.01, "top_k": 1},
        {"n": 3, "max_tokens": 1},
        {"temperature": 2.0, "min_p": 0.5},
    ],
)
def test_valid_sampling_params_accepted(kwargs):
    sp = SamplingParams(**kwargs)
    for key, value in kwargs.items():
        assert getattr(sp, key) == value


# --------------------------------------------------------------------------- LLM construction


def test_missing_model_path(tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(ValueError, match="does_not_exist"):
        LLM(model=str(missing), dtype="float32", device="cpu")


def test_folder_without_config_json(tmp_path, model_dir):
    folder = copy_checkpoint(model_dir, tmp_path / "noconfig")
    os.remove(folder / "config.json")
    with pytest.raises(ValueError, match=r"config\.json"):
        LLM(model=str(folder), dtype="float32", device="cpu")


def test_unsupported_architecture(tmp_path, model_dir):
    folder = copy_checkpoint(model_dir, tmp_path / "badarch")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["FooBarForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="LlamaForCausalLM") as info:
        LLM(model=str(folder), dtype="float32", device="cpu")
    assert "FooBarForCausalLM" in str(info.value)


def test_truncated_safetensors(tmp_path, model_dir):
    folder = copy_checkpoint(model_dir, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        LLM(model=str(folder), dtype="float32", device="cpu")


def test_unknown_dtype(model_dir):
    with pytest.raises(ValueError, match="dtype"):
        LLM(model=str(model_dir), dtype="float7", device="cpu")


def test_loads_fine_after_failed_constructions(model_dir, good_expected, tmp_path):
    with pytest.raises(ValueError):
        LLM(model=str(tmp_path / "nope"), dtype="float32", device="cpu")
    assert_still_serves(make_llm(model_dir, max_model_len=MAX_MODEL_LEN), good_expected)
