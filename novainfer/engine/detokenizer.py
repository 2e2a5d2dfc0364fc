"""Incremental detokenization and stop-string detection for one sequence.

Decoding only a short window around the newest tokens keeps each step O(1) in the output
length; multi-byte characters split across tokens are held back until complete.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        # A little prompt context so the first output token decodes with its leading space.
        self.prefix_offset = max(len(prompt_ids) - 5, 0)
        self.read_offset = len(prompt_ids)
        self.text = ""

    def step(self, token_ids: list[int]) -> str:
        """Consume the newest token of `token_ids` (prompt + output); return the new text."""
        decode = self.tokenizer.decode
        prefix = decode(token_ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(token_ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        self.text += delta
        return delta


def find_stop(text: str, delta_len: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the last `delta_len` characters of `text`."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(0, len(text) - delta_len - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    return best
