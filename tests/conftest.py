"""Shared fixtures: tiny random checkpoints (built offline, once per session) and
transformers-based reference helpers.

Every checkpoint folder looks like a real Hugging Face model folder:
``config.json`` + ``model.safetensors`` + ``generation_config.json`` + tokenizer files
(a tiny byte-level word tokenizer with BOS/EOS, a post-processor that prepends BOS, and a
jinja chat template).

Weights are random but *scaled*: embeddings/lm_head have std 0.3 and the final norm
weight is ~1.5, so logits have a spread of a few units.  That gives greedy decoding
clear top-1/top-2 margins (fp32 summation-order noise cannot flip an argmax) while the
distributions are still far from one-hot (so log-prob comparisons and sampling tests
are meaningful).  The attention / MLP weights use ~1/sqrt(fan_in) so that context and
positions (RoPE) really change the prediction (attention/MLP output projections get an
extra gain so the residual stream is not dominated by the current token's embedding).
``hf_greedy`` checks the margins and fails loudly if a reference step is close to a tie.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

VOCAB_SIZE = 512
BOS_ID, EOS_ID = 1, 2
# Greedy reference steps whose top-1/top-2 logit gap is below this are considered ties
# (engine and transformers could legitimately disagree); the reference refuses them.
MIN_GREEDY_MARGIN = 2e-4

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)

# Checkpoint recipes.  `config_format` "hub" rewrites config.json the way checkpoints on the
# Hugging Face hub look (top-level rope_theta, optional "rope_scaling" dict); "v5" keeps the
# file exactly as transformers 5 writes it ("rope_parameters").
CHECKPOINTS: dict[str, dict] = {
    # 4 q heads / 2 kv heads, tied embeddings.
    "llama": {
        "arch": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
    },
    # Llama 3.x style rope scaling; original_max_position_embeddings=64 so scaling changes
    # the rotation of the low/medium frequencies for positions 0..~350.
    "llama3_rope": {
        "arch": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    # Same weights as llama3_rope (seed_offset), config.json exactly as transformers 5
    # save_pretrained writes it.
    "llama3_rope_v5cfg": {
        "arch": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "config_format": "v5",
        "seed_offset": 1,
    },
    # Untied lm_head, GQA ratio 4 (4 q heads share 1 kv head), 3 layers.
    "llama_untied": {
        "arch": "llama",
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
    },
    # Qwen2: q/k/v bias (made non-zero), GQA ratio 4 (8 q heads / 2 kv heads, head_dim 8), tied.
    "qwen2": {
        "arch": "qwen2",
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
    },
    # Qwen3: q/k RMSNorm (non-trivial weights), explicit head_dim 32 != hidden/heads (16).
    "qwen3": {
        "arch": "qwen3",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "tie_word_embeddings": False,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
    },
    # Llama with o_proj/down_proj biases (attention_bias, mlp_bias): a row-parallel layer's
    # bias is added once, after the sum over the ranks. Named to sort last: the other
    # checkpoints' seeds follow their sorted position.
    "z_llama_bias": {
        "arch": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "attention_bias": True,
        "mlp_bias": True,
    },
}


# --------------------------------------------------------------------------- tokenizer


SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
COMMON_WORDS = [
    "user",
    "assistant",
    "system",
    "hi",
    "hello",
    "the",
    "capital",
    "of",
    "france",
    "is",
    "what",
    "?",
    ".",
    ",",
    "!",
    "paris",
    "a",
    "and",
    "to",
    "in",
]


def _vocab_tokens() -> list[str]:
    # Byte-level style like GPT-2 / Llama 3 / Qwen tokenizers: "Ġ" marks a leading space,
    # so decoding is plain concatenation (no ambiguity about spaces between tokens).
    tokens = list(SPECIAL_TOKENS)
    tokens += COMMON_WORDS
    tokens += ["\u0120" + w for w in COMMON_WORDS]
    i = 0
    while len(tokens) < VOCAB_SIZE:
        tokens.append(f"\u0120w{i}")  # " w0", " w1", ...
        i += 1
    return tokens


def build_tokenizer():
    """A tiny word-level fast tokenizer whose vocab size equals the model vocab size.

    Text is split into words with their leading space (" w12"), mapped byte-level
    (space -> "Ġ") and looked up in a fixed vocab; decode is concatenation.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    tokens = _vocab_tokens()
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?[a-z0-9_]+| ?[^\sa-z0-9_]+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    # Like Llama tokenizers: encoding a plain string prepends BOS.
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    assert len(tok) == VOCAB_SIZE, len(tok)
    assert tok.bos_token_id == BOS_ID and tok.eos_token_id == EOS_ID
    return tok


# --------------------------------------------------------------------------- checkpoints


def _make_config(spec: dict):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    rope_parameters = {"rope_type": "default", "rope_theta": spec["rope_theta"]}
    if "rope_scaling" in spec:
        rope_parameters = dict(spec["rope_scaling"], rope_theta=spec["rope_theta"])
    common = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": spec["num_hidden_layers"],
        "num_attention_heads": spec["num_attention_heads"],
        "num_key_value_heads": spec["num_key_value_heads"],
        "head_dim": spec["head_dim"],
        "max_position_embeddings": 1024,
        "rms_norm_eps": spec["rms_norm_eps"],
        "tie_word_embeddings": spec["tie_word_embeddings"],
        "rope_parameters": rope_parameters,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "dtype": "float32",
    }
    common.update({k: spec[k] for k in ("attention_bias", "mlp_bias") if k in spec})
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[spec["arch"]]
    config = cls(**common)
    assert config.head_dim == spec["head_dim"]
    return config


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Scaled random init (see module docstring)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(shape, std):
        return torch.randn(shape, generator=g) * std

    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                p.copy_(rnd(p.shape, 0.3))
            elif name == "model.norm.weight":
                # final norm scales the logits: std of logits ~ 1.5 * 0.3 * sqrt(64) ~ 3.6
                p.copy_(1.5 + rnd(p.shape, 0.1))
            elif name.endswith("norm.weight"):  # input/post-attn norms and q_norm/k_norm
                p.copy_(1.0 + rnd(p.shape, 0.3))
            elif name.endswith(".bias"):  # qwen2's q/k/v bias, z_llama_bias's every bias
                # (a large v bias would add a constant direction to the residual stream)
                p.copy_(rnd(p.shape, 0.1 if "v_proj" in name else 0.5))
            elif p.dim() == 2:
                fan_in = p.shape[1]
                # Output projections get a large gain so the layers (attention: context and
                # positions) dominate the residual stream; otherwise, with tied embeddings,
                # the current token's own embedding wins and greedy decoding just repeats it.
                gain = 6.0 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                p.copy_(rnd(p.shape, gain / math.sqrt(fan_in)))
            else:
                raise AssertionError(f"unexpected parameter {name}")
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def _rewrite_config_hub_style(folder: Path, spec: dict) -> None:
    """Rewrite config.json like hub checkpoints: top-level rope_theta, "rope_scaling"."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = spec["rope_theta"]
    cfg["rope_scaling"] = dict(spec["rope_scaling"]) if "rope_scaling" in spec else None
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    path.write_text(json.dumps(cfg, indent=2))


def build_checkpoint(folder: Path, name: str) -> Path:
    from transformers import AutoModelForCausalLM, GenerationConfig

    spec = CHECKPOINTS[name]
    seed = 1000 + sorted(CHECKPOINTS).index(name) - spec.get("seed_offset", 0)
    config = _make_config(spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_(model, seed)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    if spec.get("config_format", "hub") == "hub":
        _rewrite_config_hub_style(folder, spec)

    # The folder must round-trip through transformers with the exact same weights/config.
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        a = model(ids).logits
        b = reloaded(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    return folder


@pytest.fixture(scope="session")
def checkpoints_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("novainfer_ckpts")


_BUILT: dict[str, Path] = {}


def get_checkpoint(root: Path, name: str) -> Path:
    if name not in _BUILT:
        _BUILT[name] = build_checkpoint(root / name, name)
    return _BUILT[name]


@pytest.fixture(scope="session")
def checkpoint(checkpoints_root):
    """`checkpoint(name)` -> folder of that tiny checkpoint (built on first use)."""
    return lambda name: get_checkpoint(checkpoints_root, name)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- reference


_HF_MODELS: dict[str, torch.nn.Module] = {}


def hf_model(model_dir) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    key = str(model_dir)
    if key not in _HF_MODELS:
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        m.eval()
        # Reference decoding never stops early: EOS handling is tested separately.
        m.generation_config.eos_token_id = None
        _HF_MODELS[key] = m
    return _HF_MODELS[key]


def hf_greedy(model_dir, prompts_token_ids, max_new_tokens: int, check_margin: bool = True):
    """transformers greedy decoding, one prompt at a time, EOS disabled.

    Returns a list (one per prompt) of exactly `max_new_tokens` generated token ids.
    Fails if any step's top-1/top-2 logit gap is below MIN_GREEDY_MARGIN (a near tie
    could legitimately be decided either way by another fp32 implementation).
    """
    from transformers import GenerationConfig

    model = hf_model(model_dir)
    gen_cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=BOS_ID,
        output_logits=True,
        return_dict_in_generate=True,
    )
    results = []
    for ids in prompts_token_ids:
        inp = torch.tensor([list(ids)], dtype=torch.long)
        with torch.no_grad():
            out = model.generate(
                inp, attention_mask=torch.ones_like(inp), generation_config=gen_cfg
            )
        new = out.sequences[0, inp.shape[1] :].tolist()
        assert len(new) == max_new_tokens, (len(new), max_new_tokens)
        if check_margin:
            for step, logits in enumerate(out.logits):
                top2 = torch.topk(logits[0].float(), 2).values
                gap = (top2[0] - top2[1]).item()
                assert gap > MIN_GREEDY_MARGIN, (
                    f"reference greedy step {step} of prompt (len {len(ids)}) is a near tie "
                    f"(gap {gap:.2e}); pick other prompts/seed for this test"
                )
        results.append(new)
    return results


def hf_logprobs(model_dir, prompt_token_ids, generated_token_ids) -> torch.Tensor:
    """log_softmax of transformers' logits at every generated position.

    One forward pass over prompt + generated; returns a [len(generated), vocab] tensor whose
    row i is the distribution the model predicted for generated token i.
    """
    model = hf_model(model_dir)
    full = list(prompt_token_ids) + list(generated_token_ids)
    with torch.no_grad():
        logits = model(torch.tensor([full], dtype=torch.long)).logits[0].float()
    p = len(prompt_token_ids)
    return torch.log_softmax(logits[p - 1 : len(full) - 1], dim=-1)


def hf_next_logits(model_dir, token_ids) -> torch.Tensor:
    """Raw next-token logits (fp32) after `token_ids`."""
    model = hf_model(model_dir)
    with torch.no_grad():
        return model(torch.tensor([list(token_ids)], dtype=torch.long)).logits[0, -1].float()


def random_prompts(lengths, seed: int, low: int = 5, high: int = VOCAB_SIZE) -> list[list[int]]:
    """Deterministic random token-id prompts (ids in [low, high), so no special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (n,), generator=g).tolist() for n in lengths]


# async_scheduling for engines that do not choose (tests/test_async_scheduling.py runs the
# engine feature tests again with it on; on the CPU the default is off).
ASYNC_SCHEDULING: list[bool | None] = [None]


# Engine settings that force chunked prefill (32-token chunks) and preemption (8 KV blocks of
# 16 tokens), with the prefix cache on.
TIGHT = {"num_kv_blocks": 8, "block_size": 16, "max_model_len": 128,
         "max_num_batched_tokens": 32}


def make_llm(model_dir, **kwargs):
    from novainfer import LLM

    kwargs.setdefault("async_scheduling", ASYNC_SCHEDULING[0])
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("device", "cpu")
    return LLM(model=str(model_dir), **kwargs)


def completion_tokens(outputs) -> list[list[int]]:
    """token_ids of the first completion of every RequestOutput."""
    return [list(o.outputs[0].token_ids) for o in outputs]


def make_paged_batch(
    query_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    num_pad_tokens: int = 0,
    seed: int = 0,
):
    """Random q/k/v, a random cache and the AttentionMetadata of one decodes-first step, as
    the model runner builds it: sequence i computes its last query_lens[i] of seq_lens[i]
    tokens, each sequence owns distinct random blocks (tables 0-padded), a row with seq_len 0
    is padding (slot -1), and `num_pad_tokens` trailing rows have slot -1. Shared by the
    attention-backend tests."""
    from novainfer.layers.attention.metadata import AttentionMetadata

    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(seq_lens), max(1, *need), dtype=torch.int32)
    slots: list[int] = []
    for i, (ql, sl) in enumerate(zip(query_lens, seq_lens)):
        row, perm = perm[: need[i]], perm[need[i] :]
        tables[i, : need[i]] = torch.tensor(row, dtype=torch.int32)
        if sl == 0:  # a padding row (as CUDA graphs pad a batch): slot -1, nothing attended
            slots += [-1] * ql
            continue
        slots += [row[p // block_size] * block_size + p % block_size for p in range(sl - ql, sl)]
    slots += [-1] * num_pad_tokens

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    cache = rnd(2, num_blocks, block_size, num_kv_heads, head_dim)
    q = rnd(len(slots), num_heads, head_dim)
    k = rnd(len(slots), num_kv_heads, head_dim)
    v = rnd(len(slots), num_kv_heads, head_dim)
    starts = [0]
    for ql in query_lens:
        starts.append(starts[-1] + ql)
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        num_decodes=num_decodes,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_host=list(query_lens),
        seq_lens_host=list(seq_lens),
    )
    return q, k, v, cache, meta
