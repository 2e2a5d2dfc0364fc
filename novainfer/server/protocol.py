"""Request bodies of the OpenAI-compatible endpoints (pydantic, strict types).

Types are strict (no "1" -> 1, no true -> 1) and floats must be finite; ranges that the
engine cannot serve safely (n, seed, number of prompts) are bounded here so that a request
that passes validation can always be queued. Finer checks (prompt length against
max_model_len, token ids against the vocabulary) happen in the engine and come back as 400.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

MAX_N = 16
MAX_PROMPTS = 64
MAX_STOP = 16
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
TokenId = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Base):
    include_usage: StrictBool | None = False


class _Sampling(_Base):
    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1, le=INT64_MAX)] | None = None
    temperature: Annotated[Float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1, le=INT64_MAX)] | None = None
    min_p: Annotated[Float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stop: Stop = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX - MAX_N)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[Float, Field(gt=0.0, le=100.0)] | None = None
    ignore_eos: StrictBool = False
    min_tokens: Annotated[StrictInt, Field(ge=0, le=INT64_MAX)] = 0
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    # vLLM's extra fields
    prompt_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    cache_salt: Annotated[StrictStr, Field(min_length=1)] | None = None


class CompletionRequest(_Sampling):
    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None


class TextPart(_Base):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | Annotated[list[TextPart], Field(max_length=256)] | None = None
    name: StrictStr | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=INT64_MAX)] | None = None
    logprobs: StrictBool | None = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    add_generation_prompt: StrictBool = True
