"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure,
whether pydantic, SamplingParams, the engine or an unknown route raised it."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from novainfer.server.metrics import Metrics

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
# Request fields an engine-side message may start with; it becomes the error's `param`.
REQUEST_FIELDS = {
    "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "max_tokens", "min_tokens", "ignore_eos", "stop", "stop_token_ids",
    "seed", "logprobs", "prompt_logprobs", "cache_salt", "prompt", "messages",
}


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


def param_of(message: str) -> str | None:
    word = message.split(" ", 1)[0]
    return word if word in REQUEST_FIELDS else None


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
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
        return reject(exc.status_code, str(exc.detail), None, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return reject(500, f"internal error: {type(exc).__name__}")
