"""Prompt forms accepted at the edge, as vLLM accepts them.

A prompt is a string, a list of token ids, or a dict: `{"prompt": str}` (vLLM's
`TextPrompt`) or `{"prompt_token_ids": [...]}` (`TokensPrompt`), either with an optional
`"cache_salt"`. `parse_prompt` checks the shape and names what is wrong; tokenization and
the vocabulary check happen in the engine (`LLMEngine.process_prompt`).
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

