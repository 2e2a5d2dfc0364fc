"""FastAPI app: OpenAI-compatible completions and chat completions, models, health, metrics.

Every error leaves in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`:
validation at the edge (pydantic, SamplingParams) and engine-side validation (prompt too
long, token ids) are 400 for that request only; the engine keeps serving the others.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from novainfer.outputs import CompletionOutput, RequestOutput
from novainfer.sampling_params import SamplingParams
from novainfer.server.async_engine import Accepted, AsyncEngine, Failed, Group
from novainfer.server.metrics import Metrics
from novainfer.server.protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger("novainfer.server")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}
SAMPLING_FIELDS = {
    "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "max_tokens", "min_tokens", "ignore_eos", "stop", "stop_token_ids",
    "seed", "logprobs", "prompt", "messages",
}


@dataclass
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_waiting_requests: int = 1024
    max_model_len: int = 0
    vocab_size: int = 0


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code if code is not None else status}}


def _param_of(message: str) -> str | None:
    word = message.split(" ", 1)[0]
    return word if word in SAMPLING_FIELDS else None


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    return x if math.isfinite(x) else -9999.0


# ------------------------------------------------------------------------------ middleware


class EdgeMiddleware:
    """API key (401) and body size (413), checked before the body is parsed."""

    def __init__(self, app: Any, settings: ServerSettings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self._key = settings.api_key.encode() if settings.api_key else None

    async def _reject(self, send: Any, status: int, message: str, code: str,
                      headers: dict[str, str] | None = None) -> None:
        self.metrics.count_request(f"rejected_{status}")
        body = json.dumps(error_body(status, message, None, code)).encode()
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self._key is not None and scope["path"].startswith("/v1"):
            auth = headers.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self._key):
                await self._reject(send, 401, "invalid or missing API key", "invalid_api_key",
                                   {"www-authenticate": "Bearer"})
                return
        limit = self.settings.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                too_big = False
            if too_big:
                await self._reject(send, 413, f"request body exceeds {limit} bytes",
                                   "request_too_large")
                return
            await self.app(scope, receive, send)
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked): read the body here, up to the limit, then replay it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await self._reject(send, 413, f"request body exceeds {limit} bytes",
                                   "request_too_large")
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ------------------------------------------------------------------------------ helpers


def _chat_prompt(engine: Any, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    tokenizer = engine.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    ids = list(ids)
    if not ids:
        raise ValueError("messages rendered to an empty prompt")
    return ids


def _sampling_kwargs(body: Any) -> dict:
    kw: dict[str, Any] = {"n": body.n, "ignore_eos": body.ignore_eos, "min_tokens": body.min_tokens}
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "seed", "stop", "stop_token_ids"):
        value = getattr(body, name)
        if value is not None:
            kw[name] = value
    return kw


def _completion_logprobs(c: CompletionOutput, start: int, k: int, offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for pos in range(start, len(c.logprobs or [])):
        entry = c.logprobs[pos]
        tid = c.token_ids[pos]
        chosen = entry.get(tid)
        text = (chosen.decoded_token if chosen else None) or ""
        tokens.append(text)
        token_lps.append(_finite(chosen.logprob if chosen else None))
        tops.append({(lp.decoded_token or ""): _finite(lp.logprob)
                     for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
                     if (lp.rank is not None and lp.rank <= k) or t == tid})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def _chat_logprobs(c: CompletionOutput, start: int, k: int) -> dict:
    content = []
    for pos in range(start, len(c.logprobs or [])):
        entry = c.logprobs[pos]
        tid = c.token_ids[pos]
        chosen = entry.get(tid)
        text = (chosen.decoded_token if chosen else None) or ""
        top = [{"token": lp.decoded_token or "", "logprob": _finite(lp.logprob),
                "bytes": list((lp.decoded_token or "").encode())}
               for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
               if lp.rank is not None and lp.rank <= k]
        content.append({"token": text, "logprob": _finite(chosen.logprob if chosen else None),
                        "bytes": list(text.encode()), "top_logprobs": top})
    return {"content": content}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, allow_nan=False)}\n\n"


# ------------------------------------------------------------------------------ the app


def build_app(engine: AsyncEngine, settings: ServerSettings, metrics: Metrics) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="novainfer", version="0.1.0", lifespan=lifespan)
    app.add_middleware(EdgeMiddleware, settings=settings, metrics=metrics)
    model_name = settings.served_model_name

    def reject(status: int, message: str, param: str | None = None, code: Any = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.count_request(f"rejected_{status}")
        return JSONResponse(error_body(status, message, param, code), status_code=status,
                            headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return reject(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        parts, param = [], None
        for err in errors[:5]:
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            if param is None and loc:
                param = loc[0]
            parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
        if any(e.get("type") == "json_invalid" for e in errors):
            message = "request body is not valid JSON: " + "; ".join(parts)
        else:
            message = "; ".join(parts) or "invalid request"
        return reject(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        return reject(status, str(exc.detail), None, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return reject(500, f"internal error: {type(exc).__name__}")

    def check(body: Any) -> None:
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"model '{body.model}' does not exist; this server serves "
                           f"'{model_name}'", "model", "model_not_found")
        if not engine.alive:
            raise APIError(503, "the engine is not running", None, "engine_unavailable",
                           {"Retry-After": "5"})
        waiting = engine.num_waiting()
        if waiting >= settings.max_waiting_requests:
            raise APIError(503, f"server overloaded: {waiting} requests waiting "
                           f"(limit {settings.max_waiting_requests}); retry later",
                           None, "overloaded", {"Retry-After": "1"})

    def params_or_400(**kw: Any) -> SamplingParams:
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as exc:
            raise APIError(400, str(exc), _param_of(str(exc))) from None

    async def start(group: Group, request: Request) -> Accepted:
        ev = await _next_event(group, request)
        if isinstance(ev, Failed):
            if ev.client_error:
                raise APIError(400, str(ev.error), _param_of(str(ev.error)))
            raise APIError(503, f"the engine failed: {ev.error}", None, "engine_error",
                           {"Retry-After": "1"})
        assert isinstance(ev, Accepted)
        return ev

    async def _next_event(group: Group, request: Request) -> Any:
        """The group's next event; aborts the group if the client goes away meanwhile."""
        task = asyncio.ensure_future(group.queue.get())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=1.0)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise asyncio.CancelledError("client disconnected")
        except BaseException:
            engine.abort(group)
            raise
        finally:
            if not task.done():
                task.cancel()

    async def collect(group: Group, request: Request) -> dict[str, RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        while len(finals) < len(group.request_ids):
            ev = await _next_event(group, request)
            if isinstance(ev, Failed):
                raise APIError(503, f"the engine failed: {ev.error}", None, "engine_error",
                               {"Retry-After": "1"})
            if ev.finished:
                finals[ev.request_id] = ev
        return finals

    # -- endpoints -------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        snap = engine.snapshot
        body = {"status": "ok" if engine.alive else "engine_stopped",
                "kv_free_blocks": snap.get("kv_free_blocks"),
                "kv_total_blocks": snap.get("kv_total_blocks"),
                "initial_free_blocks": engine.initial_free_blocks,
                "num_requests_running": snap.get("num_requests_running"),
                "num_requests_waiting": snap.get("num_requests_waiting")}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def prom() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{
            "id": model_name, "object": "model", "created": int(time.time()),
            "owned_by": "novainfer", "max_model_len": settings.max_model_len,
            "vocab_size": settings.vocab_size}]})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check(body)
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts: list[Any] = [prompt]
        elif isinstance(prompt[0], (list, str)):  # a batch of prompts
            prompts = list(prompt)
        else:  # one prompt of token ids
            prompts = [prompt]
        kw = _sampling_kwargs(body)
        kw["max_tokens"] = body.max_tokens if body.max_tokens is not None else 16
        if body.logprobs is not None:
            kw["logprobs"] = body.logprobs
        params = params_or_400(**kw)
        base = f"cmpl-{uuid.uuid4().hex}"
        rids = [f"{base}-{i}" for i in range(len(prompts))]
        makes = [(lambda _e, p=p: (p, params)) for p in prompts]
        group = engine.submit(rids, makes, body.stream)
        accepted = await start(group, request)
        created = int(time.time())
        k = body.logprobs
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _stream(group, accepted, params, base, created, "text_completion",
                           include_usage, k, chat=False)
        finals = await collect(group, request)
        choices = []
        completion_tokens = 0
        for p_index, rid in enumerate(rids):
            for c in finals[rid].outputs:
                completion_tokens += len(c.token_ids)
                choices.append({
                    "index": p_index * params.n + c.index, "text": c.text,
                    "logprobs": _completion_logprobs(c, 0, k, 0) if k is not None else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        prompt_tokens = sum(len(i) for i in accepted.prompt_token_ids)
        return JSONResponse({
            "id": base, "object": "text_completion", "created": created, "model": model_name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check(body)
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            messages.append({"role": m.role, "content": content or ""})
        kw = _sampling_kwargs(body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        k = (body.top_logprobs or 0) if body.logprobs else None
        if k is not None:
            kw["logprobs"] = k
        # reject bad values before queueing (max_tokens is final once the prompt is known)
        checked = params_or_400(**kw, max_tokens=max_tokens or max(kw.get("min_tokens", 0), 1))
        add_gen = body.add_generation_prompt

        def make(e: Any) -> tuple[list[int], SamplingParams]:
            ids = _chat_prompt(e, messages, add_gen)
            mt = max_tokens if max_tokens is not None else max(e.max_model_len - len(ids), 1)
            return ids, SamplingParams(**kw, max_tokens=mt)

        base = f"chatcmpl-{uuid.uuid4().hex}"
        group = engine.submit([base], [make], body.stream)
        accepted = await start(group, request)
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _stream(group, accepted, checked, base, created, "chat.completion.chunk",
                           include_usage, k, chat=True)
        final = (await collect(group, request))[base]
        choices = []
        completion_tokens = 0
        for c in final.outputs:
            completion_tokens += len(c.token_ids)
            choices.append({
                "index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(c, 0, k) if k is not None else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        prompt_tokens = len(accepted.prompt_token_ids[0])
        return JSONResponse({
            "id": base, "object": "chat.completion", "created": created, "model": model_name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}})

    def _stream(group: Group, accepted: Accepted, params: SamplingParams, base: str,
                created: int, obj: str, include_usage: bool, k: int | None,
                chat: bool) -> StreamingResponse:
        n = params.n
        stops = params.stop_list
        index_of = {rid: i for i, rid in enumerate(group.request_ids)}
        prompt_tokens = sum(len(i) for i in accepted.prompt_token_ids)
        total = len(group.request_ids) * n

        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            body: dict[str, Any] = {"id": base, "object": obj, "created": created,
                                    "model": model_name, "choices": choices}
            if include_usage:
                body["usage"] = usage
            return _sse(body)

        async def gen():
            sent_text: dict[int, str] = {}
            sent_lp: dict[int, int] = {}
            tokens: dict[int, int] = {}
            done: set[int] = set()
            try:
                if chat:
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None} for i in range(total)])
                while len(done) < total:
                    ev = await group.queue.get()
                    if isinstance(ev, Failed):
                        yield _sse(error_body(500 if not ev.client_error else 400, str(ev.error)))
                        break
                    p_index = index_of[ev.request_id]
                    choices = []
                    for c in ev.outputs:
                        i = p_index * n + c.index
                        if i in done:
                            continue
                        hold = 0
                        if c.finish_reason is None and stops:
                            hold = max(len(s) for s in stops) - 1
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
                            lp = (_chat_logprobs(c, lp_start, k) if chat else
                                  _completion_logprobs(c, lp_start, k, len(prev)))
                            sent_lp[i] = len(c.logprobs)
                        choice: dict[str, Any] = {"index": i, "logprobs": lp,
                                                  "finish_reason": c.finish_reason}
                        if chat:
                            choice["delta"] = {"content": delta} if delta else {}
                        else:
                            choice["text"] = delta
                        if c.finish_reason is not None:
                            choice["stop_reason"] = c.stop_reason
                            done.add(i)
                        choices.append(choice)
                    if choices:
                        yield chunk(choices)
                if include_usage:
                    completion_tokens = sum(tokens.values())
                    yield chunk([], {"prompt_tokens": prompt_tokens,
                                     "completion_tokens": completion_tokens,
                                     "total_tokens": prompt_tokens + completion_tokens})
                yield "data: [DONE]\n\n"
            finally:
                if len(done) < total:
                    engine.abort(group)

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app

