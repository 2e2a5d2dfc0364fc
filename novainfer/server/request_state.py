"""A served request as its frontend process sees it: the token ids the engine core sent, the
text made from them (incremental detokenization, stop strings), logprobs with token texts,
and the RequestOutput that the responses are built from.

The core finishes sequences on token rules (EOS, stop token ids, max_tokens, max_model_len);
stop strings are found here, where the text is, and reported back to the core. Tokens that
arrive for a sequence after it stopped here are dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from novainfer.engine.detokenizer import (
    IncrementalDetokenizer,
    decorate,
    output_text,
    stop_string_hit,
)
from novainfer.inputs import PromptInputs
from novainfer.outputs import CompletionOutput, PositionLogprobs, RequestMetrics, RequestOutput
from novainfer.sampling_params import SamplingParams


@dataclass
class SeqState:
    index: int
    detok: IncrementalDetokenizer | None
    token_ids: list[int]  # prompt + output, as the detokenizer reads them
    logprobs: list[PositionLogprobs] | None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    last_token_at: float | None = None


@dataclass
class RequestState:
    cid: int
    request_id: str
    inputs: PromptInputs
    params: SamplingParams
    stream: bool
    group: Any  # the server's Group this request belongs to
    seqs: list[SeqState] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.time()))

    @staticmethod
    def new(cid: int, request_id: str, inputs: PromptInputs, params: SamplingParams,
            stream: bool, group: Any, tokenizer: Any) -> RequestState:
        ids = inputs.token_ids
        text = stream or bool(params.stop_list)
        seqs = [SeqState(i, IncrementalDetokenizer(tokenizer, ids, params.skip_special_tokens,
                                                   params.spaces_between_special_tokens)
                         if text else None, list(ids),
                         [] if params.logprobs is not None else None)
                for i in range(params.n)]
        return RequestState(cid, request_id, inputs, params, stream, group, seqs,
                            [None] if params.prompt_logprobs is not None else None)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    def add_token(self, index: int, token: int, finish: str | None, stop_token: int,
                  lp: PositionLogprobs | None, tokenizer: Any, texts: dict) -> str | None:
        """Apply one token from the core; the stop string it completed, if any (the core
        must then be told to finish the sequence)."""
        seq = self.seqs[index]
        if seq.finish_reason is not None:  # already stopped here by a stop string
            return None
        params = self.params
        seq.token_ids.append(token)
        if lp is not None:
            lp = decorate(tokenizer, texts, lp)
            seq.logprobs.append(lp)
            seq.cumulative_logprob += lp[token].logprob
        stop = None
        if seq.detok is not None and finish in (None, "length"):
            # a stop string in the last token's text wins over the length limit, as offline
            past_min = len(seq.token_ids) - len(self.inputs.token_ids) >= params.min_tokens
            stop = stop_string_hit(seq.detok, seq.token_ids, params, past_min)
        if stop is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop
        elif finish is not None:
            seq.finish_reason = finish
            seq.stop_reason = stop_token if stop_token >= 0 else None
        return stop

    def abort(self) -> None:
        for seq in self.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"

    def output(self, tokenizer: Any) -> RequestOutput:
        n = len(self.inputs.token_ids)
        params = self.params
        completions = []
        for seq in self.seqs:
            out_ids = seq.token_ids[n:]
            completions.append(CompletionOutput(
                index=seq.index,
                text=output_text(tokenizer, seq.detok, out_ids, params, seq.finish_reason,
                                 seq.stop_reason),
                token_ids=out_ids,
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            ))
        return RequestOutput(
            request_id=self.request_id, prompt=self.inputs.text,
            prompt_token_ids=self.inputs.token_ids, outputs=completions, finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs else None,
            metrics=replace(self.metrics))
