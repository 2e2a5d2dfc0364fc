"""The endpoints, each on its own: health, metrics, models, completions, chat completions.
They read the shared ServerContext from `app.state.ctx` (server/app.py sets it)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from novainfer.sampling_params import SamplingParams
from novainfer.server.context import (
    ServerContext,
    chat_prompt,
    params_or_400,
    sampling_kwargs,
)
from novainfer.server.protocol import ChatCompletionRequest, CompletionRequest
from novainfer.server.responses import (
    StreamSpec,
    chat_logprobs,
    completion_logprobs,
    prompt_logprobs_json,
    stream_response,
    usage,
)

router = APIRouter()


def _ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    ctx = _ctx(request)
    engine = ctx.engine
    snap = engine.snapshot
    body = {"status": "ok" if engine.alive else "engine_stopped",
            "frontend": ctx.settings.frontend_index,
            "kv_free_blocks": snap.get("kv_free_blocks"),
            "kv_total_blocks": snap.get("kv_total_blocks"),
            "initial_free_blocks": engine.initial_free_blocks,
            "num_requests_running": snap.get("num_requests_running"),
            "num_requests_waiting": snap.get("num_requests_waiting")}
    return JSONResponse(body, status_code=200 if engine.alive else 503)


@router.get("/metrics")
async def prometheus(request: Request) -> PlainTextResponse:
    return PlainTextResponse(_ctx(request).metrics.render(),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    settings = _ctx(request).settings
    created = int(time.time())
    base = settings.served_model_name
    data = [{"id": base, "object": "model", "created": created, "owned_by": "novainfer",
             "root": base, "parent": None, "max_model_len": settings.max_model_len,
             "vocab_size": settings.vocab_size}]
    data += [{"id": name, "object": "model", "created": created, "owned_by": "novainfer",
              "root": str(lora.lora_path), "parent": base,
              "max_model_len": settings.max_model_len, "vocab_size": settings.vocab_size}
             for name, lora in settings.lora_modules.items()]
    return JSONResponse({"object": "list", "data": data})


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    ctx = _ctx(request)
    lora = ctx.check(body)
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt[0], (list, str)):  # a batch of prompts
        prompts = list(prompt)
    else:  # one prompt of token ids
        prompts = [prompt]
    kw = sampling_kwargs(body)
    kw["max_tokens"] = body.max_tokens if body.max_tokens is not None else 16
    if body.logprobs is not None:
        kw["logprobs"] = body.logprobs
    params = params_or_400(**kw)
    base = f"cmpl-{uuid.uuid4().hex}"
    rids = [f"{base}-{i}" for i in range(len(prompts))]
    makes = [(lambda _e, p=p: (p, params)) for p in prompts]
    group = ctx.engine.submit(rids, makes, body.stream, lora)
    accepted = await ctx.start(group, request)
    created = int(time.time())
    name = lora.lora_name if lora is not None else ctx.settings.served_model_name
    prompt_tokens = sum(len(i) for i in accepted.prompt_token_ids)
    k = body.logprobs
    if body.stream:
        return stream_response(ctx.engine, group, StreamSpec(
            base, created, name, chat=False, n=params.n, stops=params.stop_list,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            logprobs=k, prompt_tokens=prompt_tokens))
    finals = await ctx.collect(group, request)
    choices = []
    completion_tokens = 0
    for p_index, rid in enumerate(rids):
        final = finals[rid]
        prompt_lp = (prompt_logprobs_json(final.prompt_logprobs)
                     if params.prompt_logprobs is not None else None)  # once per prompt
        for c in final.outputs:
            completion_tokens += len(c.token_ids)
            choice = {
                "index": p_index * params.n + c.index, "text": c.text,
                "logprobs": completion_logprobs(c, 0, k, 0) if k is not None else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            if params.prompt_logprobs is not None:
                choice["prompt_logprobs"] = prompt_lp
            choices.append(choice)
    return JSONResponse({
        "id": base, "object": "text_completion", "created": created, "model": name,
        "choices": choices, "usage": usage(prompt_tokens, completion_tokens,
                                           sum(f.num_cached_tokens for f in finals.values()))})


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    ctx = _ctx(request)
    lora = ctx.check(body)
    messages = []
    for m in body.messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        messages.append({"role": m.role, "content": content or ""})
    kw = sampling_kwargs(body)
    max_tokens = body.max_completion_tokens or body.max_tokens
    k = (body.top_logprobs or 0) if body.logprobs else None
    if k is not None:
        kw["logprobs"] = k
    # reject bad values before queueing (max_tokens is final once the prompt is known)
    checked = params_or_400(**kw, max_tokens=max_tokens or max(kw.get("min_tokens", 0), 1))
    add_gen = body.add_generation_prompt

    def make(e: Any) -> tuple[Any, SamplingParams]:
        prompt = chat_prompt(e, messages, add_gen)
        mt = max_tokens if max_tokens is not None else max(
            e.max_model_len - len(prompt.token_ids), 1)
        return prompt, SamplingParams(**kw, max_tokens=mt)

    base = f"chatcmpl-{uuid.uuid4().hex}"
    group = ctx.engine.submit([base], [make], body.stream, lora)
    accepted = await ctx.start(group, request)
    created = int(time.time())
    name = lora.lora_name if lora is not None else ctx.settings.served_model_name
    prompt_tokens = len(accepted.prompt_token_ids[0])
    if body.stream:
        return stream_response(ctx.engine, group, StreamSpec(
            base, created, name, chat=True, n=checked.n, stops=checked.stop_list,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            logprobs=k, prompt_tokens=prompt_tokens))
    final = (await ctx.collect(group, request))[base]
    choices = []
    completion_tokens = 0
    for c in final.outputs:
        completion_tokens += len(c.token_ids)
        choices.append({
            "index": c.index, "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(c, 0, k) if k is not None else None,
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    response = {
        "id": base, "object": "chat.completion", "created": created, "model": name,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens, final.num_cached_tokens)}
    if checked.prompt_logprobs is not None:
        response["prompt_logprobs"] = prompt_logprobs_json(final.prompt_logprobs)
    return JSONResponse(response)
