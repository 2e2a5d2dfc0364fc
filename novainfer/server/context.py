"""What every endpoint shares: the settings, the engine client, the metrics, and the steps of
handling one request (admission checks, SamplingParams from the body, waiting for the
engine's events while watching for a client that went away)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from novainfer.inputs import PromptInputs, render_chat
from novainfer.outputs import RequestOutput
from novainfer.sampling_params import SamplingParams
from novainfer.server.engine_client import Accepted, EngineClient, Failed, Group
from novainfer.server.errors import APIError, param_of
from novainfer.server.metrics import Metrics

# Body fields that go to SamplingParams unchanged when the client sets them.
PASSED_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "seed", "stop", "stop_token_ids", "prompt_logprobs", "cache_salt",
)
ALWAYS_FIELDS = (
    "n", "ignore_eos", "min_tokens", "include_stop_str_in_output", "skip_special_tokens",
    "spaces_between_special_tokens",
)


@dataclass
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_waiting_requests: int = 1024
    max_model_len: int = 0
    vocab_size: int = 0
    frontend_index: int = 0  # which of --api-server-count frontend processes this is
    lora_modules: dict = field(default_factory=dict)  # served adapter name -> LoRARequest


@dataclass
class ServerContext:
    engine: EngineClient
    settings: ServerSettings
    metrics: Metrics

    def check(self, body: Any) -> Any:
        """The model name, a live engine, room in the waiting queue; the LoRARequest of the
        adapter the request names as its model (None: the base model)."""
        name = self.settings.served_model_name
        adapters = self.settings.lora_modules
        if body.model is not None and body.model != name and body.model not in adapters:
            served = ", ".join(f"'{n}'" for n in [name, *adapters])
            raise APIError(404, f"model '{body.model}' does not exist; this server serves "
                           f"{served}", "model", "model_not_found")
        if not self.engine.alive:
            raise APIError(503, "the engine is not running", None, "engine_unavailable",
                           {"Retry-After": "5"})
        waiting = self.engine.num_waiting()
        if waiting >= self.settings.max_waiting_requests:
            raise APIError(503, f"server overloaded: {waiting} requests waiting "
                           f"(limit {self.settings.max_waiting_requests}); retry later",
                           None, "overloaded", {"Retry-After": "1"})
        return adapters.get(body.model)

    async def start(self, group: Group, request: Request) -> Accepted:
        """Wait until the engine took (or refused) the group's requests."""
        ev = await self.next_event(group, request)
        if isinstance(ev, Failed):
            if ev.client_error:
                raise APIError(400, str(ev.error), param_of(str(ev.error)))
            raise engine_error(ev)
        return ev

    async def next_event(self, group: Group, request: Request) -> Any:
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
            self.engine.abort(group)
            raise
        finally:
            if not task.done():
                task.cancel()

    async def collect(self, group: Group, request: Request) -> dict[str, RequestOutput]:
        """The final output of each of the group's requests."""
        finals: dict[str, RequestOutput] = {}
        while len(finals) < len(group.request_ids):
            ev = await self.next_event(group, request)
            if isinstance(ev, Failed):
                raise engine_error(ev)
            if ev.finished:
                finals[ev.request_id] = ev
        return finals


def engine_error(ev: Failed) -> APIError:
    """A dead engine core is a 500 (the server is going down); a failed step is a 503."""
    if ev.fatal:
        return APIError(500, f"the engine core died: {ev.error}", None, "engine_dead")
    return APIError(503, f"the engine failed: {ev.error}", None, "engine_error",
                    {"Retry-After": "1"})


def sampling_kwargs(body: Any) -> dict:
    kw: dict[str, Any] = {name: getattr(body, name) for name in ALWAYS_FIELDS}
    for name in PASSED_FIELDS:
        value = getattr(body, name)
        if value is not None:
            kw[name] = value
    return kw


def params_or_400(**kw: Any) -> SamplingParams:
    try:
        return SamplingParams(**kw)
    except (ValueError, TypeError) as exc:
        raise APIError(400, str(exc), param_of(str(exc))) from None


def chat_prompt(engine: Any, messages: list[dict], add_generation_prompt: bool) -> PromptInputs:
    """The conversation through the model's chat template: token ids and the rendered text.
    Runs on the frontend's event loop, which owns the tokenizer."""
    tokenizer = engine.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
    prompt = render_chat(tokenizer, messages, add_generation_prompt)
    if not prompt.token_ids:
        raise ValueError("messages rendered to an empty prompt")
    return prompt
