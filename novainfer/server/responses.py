"""Response bodies: OpenAI's logprobs shapes, vLLM's prompt_logprobs, and the SSE stream of
one request group (deltas held back while a stop string may still be forming)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from novainfer.outputs import CompletionOutput, PositionLogprobs
from novainfer.server.engine_client import EngineClient, Failed, Group
from novainfer.server.errors import error_body


def finite(x: float | None) -> float | None:
    if x is None:
        return None
    return x if math.isfinite(x) else -9999.0


def completion_logprobs(c: CompletionOutput, start: int, k: int, offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for pos in range(start, len(c.logprobs or [])):
        entry = c.logprobs[pos]
        tid = c.token_ids[pos]
        chosen = entry.get(tid)
        text = (chosen.decoded_token if chosen else None) or ""
        tokens.append(text)
        token_lps.append(finite(chosen.logprob if chosen else None))
        tops.append({(lp.decoded_token or ""): finite(lp.logprob)
                     for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
                     if (lp.rank is not None and lp.rank <= k) or t == tid})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(c: CompletionOutput, start: int, k: int) -> dict:
    content = []
    for pos in range(start, len(c.logprobs or [])):
        entry = c.logprobs[pos]
        tid = c.token_ids[pos]
        chosen = entry.get(tid)
        text = (chosen.decoded_token if chosen else None) or ""
        top = [{"token": lp.decoded_token or "", "logprob": finite(lp.logprob),
                "bytes": list((lp.decoded_token or "").encode())}
               for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
               if lp.rank is not None and lp.rank <= k]
        content.append({"token": text, "logprob": finite(chosen.logprob if chosen else None),
                        "bytes": list(text.encode()), "top_logprobs": top})
    return {"content": content}


def prompt_logprobs_json(entries: list[PositionLogprobs | None] | None) -> list | None:
    """vLLM's shape: one entry per prompt token, None for the first, else
    {token id: {"logprob", "rank", "decoded_token"}}."""
    if entries is None:
        return None
    return [None if e is None else {
        str(tid): {"logprob": finite(lp.logprob), "rank": lp.rank,
                   "decoded_token": lp.decoded_token}
        for tid, lp in e.items()} for e in entries]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage object; cached_tokens are prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, allow_nan=False)}\n\n"


@dataclass
class StreamSpec:
    """One streamed response: its id and object type, and what each chunk carries."""

    base: str
    created: int
    model: str
    chat: bool
    n: int
    stops: list[str]
    include_usage: bool
    logprobs: int | None  # top-k for the logprobs field, None for none
    prompt_tokens: int


def stream_response(engine: EngineClient, group: Group, spec: StreamSpec) -> StreamingResponse:
    index_of = {rid: i for i, rid in enumerate(group.request_ids)}
    total = len(group.request_ids) * spec.n
    obj = "chat.completion.chunk" if spec.chat else "text_completion"
    hold_back = max((len(s) for s in spec.stops), default=1) - 1
    k = spec.logprobs

    def chunk(choices: list[dict], usage: dict | None = None, **extra: Any) -> str:
        body: dict[str, Any] = {"id": spec.base, "object": obj, "created": spec.created,
                                "model": spec.model, "choices": choices, **extra}
        if spec.include_usage:
            body["usage"] = usage
        return sse(body)

    async def gen():
        sent_text: dict[int, str] = {}
        sent_lp: dict[int, int] = {}
        tokens: dict[int, int] = {}
        done: set[int] = set()
        prompt_lp_sent: set[int | str] = set()  # choice indices, or request ids (chat)
        cached: dict[str, int] = {}
        try:
            if spec.chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None} for i in range(total)])
            while len(done) < total:
                ev = await group.queue.get()
                if isinstance(ev, Failed):
                    yield sse(error_body(500 if not ev.client_error else 400, str(ev.error)))
                    break
                p_index = index_of[ev.request_id]
                cached[ev.request_id] = ev.num_cached_tokens
                choices = []
                for c in ev.outputs:
                    i = p_index * spec.n + c.index
                    if i in done:
                        continue
                    hold = hold_back if c.finish_reason is None else 0
                    prev = sent_text.get(i, "")
                    text = c.text[: max(len(prev), len(c.text) - hold)]
                    delta = text[len(prev):]
                    sent_text[i] = text
                    tokens[i] = len(c.token_ids)
                    lp_start = sent_lp.get(i, 0)
                    new_lp = k is not None and c.logprobs is not None and len(c.logprobs) > lp_start
                    if not delta and not new_lp and c.finish_reason is None:
                        continue
                    lp = None
                    if new_lp:
                        lp = (chat_logprobs(c, lp_start, k) if spec.chat else
                              completion_logprobs(c, lp_start, k, len(prev)))
                        sent_lp[i] = len(c.logprobs)
                    choice: dict[str, Any] = {"index": i, "logprobs": lp,
                                              "finish_reason": c.finish_reason}
                    if spec.chat:
                        choice["delta"] = {"content": delta} if delta else {}
                    else:
                        choice["text"] = delta
                        if ev.prompt_logprobs is not None and i not in prompt_lp_sent:
                            choice["prompt_logprobs"] = prompt_logprobs_json(ev.prompt_logprobs)
                            prompt_lp_sent.add(i)
                    if c.finish_reason is not None:
                        choice["stop_reason"] = c.stop_reason
                        done.add(i)
                    choices.append(choice)
                if choices:
                    extra = {}
                    if spec.chat and ev.prompt_logprobs is not None and (
                            ev.request_id not in prompt_lp_sent):
                        extra["prompt_logprobs"] = prompt_logprobs_json(ev.prompt_logprobs)
                        prompt_lp_sent.add(ev.request_id)
                    yield chunk(choices, **extra)
            if spec.include_usage:
                yield chunk([], usage(spec.prompt_tokens, sum(tokens.values()),
                                      sum(cached.values())))
            yield "data: [DONE]\n\n"
        finally:
            if len(done) < total:
                engine.abort(group)

    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
