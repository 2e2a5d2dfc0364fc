"""The server's edge, before any body is parsed: the API key (401) and the body size (413)."""

from __future__ import annotations

import hmac
import json
from typing import Any

from novainfer.server.context import ServerSettings
from novainfer.server.errors import error_body
from novainfer.server.metrics import Metrics


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
