"""Prompt forms accepted at the edge, as vLLM accepts them.

A prompt is a string, a list of token ids, or a dict: `{"prompt": str}` (vLLM's
`TextPrompt`) or `{"prompt_token_ids": [...]}` (`TokensPrompt`), either with an optional
`"cache_salt"`. `parse_prompt` checks the shape and names what is wrong; `prompt_inputs`
tokenizes text and checks token ids against the vocabulary (the engine calls it, and the
server's frontend process, which tokenizes before the engine core sees a request).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TEXT_KEYS = {"prompt", "cache_salt"}
TOKENS_KEYS = {"prompt_token_ids", "cache_salt"}
PROMPT_FORMS = (
    "a string, a list of token ids, {'prompt': str} or {'prompt_token_ids': [int, ...]} "
    "(each dict optionally with 'cache_salt')"
)


@dataclass
class PromptInputs:
    """A validated prompt: its token ids, its text when it was given as text, and its
    prefix-cache salt (requests with different salts never share cached KV)."""

    token_ids: list[int]
    text: str | None = None
    cache_salt: str | None = None


def check_cache_salt(salt: Any) -> str | None:
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt:
        raise ValueError(f"cache_salt must be a non-empty string, got {salt!r}")
    return salt


def parse_prompt(prompt: Any) -> tuple[str | None, list[int] | None, str | None]:
    """(text, token ids, cache_salt) of one prompt, exactly one of text / ids set."""
    salt = None
    if isinstance(prompt, dict):
        if "prompt" in prompt and "prompt_token_ids" in prompt:
            raise ValueError("a prompt dict takes 'prompt' or 'prompt_token_ids', not both")
        allowed = TOKENS_KEYS if "prompt_token_ids" in prompt else TEXT_KEYS
        unknown = sorted(set(prompt) - allowed)
        if unknown or not ({"prompt", "prompt_token_ids"} & set(prompt)):
            raise ValueError(
                f"prompt dict has keys {sorted(prompt)}; allowed: {sorted(allowed)} "
                "(with 'prompt' or 'prompt_token_ids')"
            )
        salt = check_cache_salt(prompt.get("cache_salt"))
        if "prompt" in prompt:
            if not isinstance(prompt["prompt"], str):
                raise TypeError(
                    f"prompt['prompt'] must be a string, got {type(prompt['prompt']).__name__}"
                )
            return prompt["prompt"], None, salt
        prompt = prompt["prompt_token_ids"]
        if not isinstance(prompt, (list, tuple)):
            raise TypeError(
                f"prompt['prompt_token_ids'] must be a list of ints, got {type(prompt).__name__}"
            )
    if isinstance(prompt, str):
        return prompt, None, salt
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"prompt must be {PROMPT_FORMS}; got {type(prompt).__name__}")
    return None, list(prompt), salt


def prompt_inputs(prompt: Any, tokenizer: Any, vocab_size: int) -> PromptInputs:
    """Validate one prompt in any accepted form, tokenize text (`tokenizer` None: token ids
    only), and return its token ids; raises ValueError/TypeError naming what is wrong."""
    if isinstance(prompt, PromptInputs):
        return prompt
    text, ids, salt = parse_prompt(prompt)
    if text is not None:
        if not text:
            raise ValueError("prompt must not be empty")
        if tokenizer is None:
            raise ValueError("prompt must be token ids when skip_tokenizer_init=True")
        ids = tokenizer.encode(text)
        if not ids:
            raise ValueError(
                f"prompt {text[:40]!r} tokenizes to no tokens; give text with some content "
                "or token ids"
            )
        return PromptInputs(ids, text, salt)
    if not ids:
        raise ValueError("prompt must not be empty (got no token ids)")
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool):
            raise TypeError(f"prompt token ids must be ints, got {type(t).__name__}")
        if not 0 <= t < vocab_size:
            raise ValueError(
                f"prompt token id {t} is out of range; allowed: 0 <= id < {vocab_size}"
            )
    return PromptInputs(ids, None, salt)


def check_request(inputs: PromptInputs, params: Any, max_model_len: int, vocab_size: int
                  ) -> str | None:
    """The checks that need the model's limits: the prompt's ids are in the model's
    vocabulary (a tokenizer or chat template may know more tokens than the model has rows
    of embedding), the prompt and max_tokens fit max_model_len, stop_token_ids are in the
    vocabulary, one cache_salt. Returns the request's salt."""
    ids = inputs.token_ids
    if ids and not 0 <= min(ids) <= max(ids) < vocab_size:
        bad = max(ids) if max(ids) >= vocab_size else min(ids)
        raise ValueError(f"prompt token id {bad} is out of range; allowed: 0 <= id < "
                         f"{vocab_size} (the model's vocabulary)")
    check_length(len(ids), params.max_tokens, max_model_len)
    bad = [t for t in params.stop_token_ids if t >= vocab_size]
    if bad:
        raise ValueError(f"stop_token_ids {bad} are out of range; allowed: 0 <= id < {vocab_size}")
    if inputs.cache_salt and params.cache_salt and inputs.cache_salt != params.cache_salt:
        raise ValueError(
            "cache_salt differs between the prompt and SamplingParams; give it in one place"
        )
    return inputs.cache_salt or params.cache_salt


def check_length(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    if num_prompt_tokens >= max_model_len:
        raise ValueError(
            f"prompt has {num_prompt_tokens} tokens; max_model_len is {max_model_len}, "
            f"so the prompt must have fewer than {max_model_len} tokens"
        )
    if num_prompt_tokens + max_tokens > max_model_len:
        raise ValueError(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds "
            f"max_model_len ({max_model_len}); lower max_tokens to at most "
            f"{max_model_len - num_prompt_tokens}"
        )


def render_chat(
    tokenizer: Any,
    messages: list[dict],
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
) -> PromptInputs:
    """A conversation through the chat template, rendered once: the text and its token ids
    (the template's own special tokens and none added, as `tokenize=True` gives them)."""
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, chat_template=chat_template,
        tokenize=False,
    )
    return PromptInputs(list(tokenizer.encode(text, add_special_tokens=False)), text)

