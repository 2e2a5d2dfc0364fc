"""`novainfer serve` as processes: the HTTP frontend(s) and the engine core.

The same greedy tokens served as offline; two frontends on one port; a hung-up stream is
aborted in the core and its blocks freed; killing the core fails in-flight requests with a
500 and takes the server down with a non-zero exit; killing a frontend takes the core down;
no process is left behind. Requests that must not finish are held by the gate
(tests/gated_serve.py), so nothing here depends on the machine's speed; deadlines are hang
guards only.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import make_llm
from test_server import (
    MODEL,
    PROMPT,
    Server,
    _alive,
    _child_pids,
    _gauge,
    _good_stream,
    _headers,
    _post,
    _until,
)

from novainfer import SamplingParams


@pytest.fixture(scope="module")
def model_dir(checkpoint):
    return checkpoint("llama")


def _named(pids: set[int], name: str) -> int:
    """The one process among `pids` whose /proc comm is `name`."""
    found = [p for p in pids if Path(f"/proc/{p}/comm").read_text().strip() == name]
    assert len(found) == 1, (name, found)
    return found[0]


def _gone(pids, what: str) -> None:
    deadline = time.monotonic() + 120  # a hang guard, not a speed limit
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"{what} {pids} outlived the server"
        time.sleep(0.05)


async def _hold_stream(url: str, first_chunk: asyncio.Event, hang_up: bool) -> list[dict]:
    """A stream that cannot finish while the gate is shut; its chunks (error chunks too)."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 100, "stream": True,
            "ignore_eos": True}
    chunks = []
    async with httpx.AsyncClient(timeout=600) as c, \
            c.stream("POST", url + "/v1/completions", json=body, headers=_headers()) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
                first_chunk.set()
                if hang_up:
                    return chunks
    return chunks


@pytest.mark.parametrize("overlap", [[], ["--async-scheduling"]], ids=["sync", "async"])
def test_served_greedy_tokens_equal_offline(model_dir, tmp_path, overlap):
    prompts = [PROMPT, "w1 w2 w3 w4", "the capital"]
    llm = make_llm(model_dir, max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.shutdown()
    srv = Server(model_dir, tmp_path / "srv.log", *overlap)
    try:
        got = _post(srv, "/v1/completions", {"prompt": prompts, "max_tokens": 12,
                                             "temperature": 0, "ignore_eos": True})
        assert [c["text"] for c in sorted(got["choices"], key=lambda c: c["index"])] == want
    finally:
        srv.stop()


def test_two_frontends_share_the_port_and_the_core(model_dir, tmp_path):
    srv = Server(model_dir, tmp_path / "two.log", "--api-server-count", "2")
    try:
        children = _child_pids(srv.proc.pid)
        core = _named(children, "novainfer-core")
        api1 = _named(children, "novainfer-api1")
        seen = set()
        deadline = time.monotonic() + 300  # a hang guard
        while seen != {0, 1}:  # new connections spread over both (SO_REUSEPORT)
            seen.add(httpx.get(srv.url + "/health", timeout=60).json()["frontend"])
            assert time.monotonic() < deadline, seen

        async def many() -> list[str]:
            async def one(i: int) -> str:
                async with httpx.AsyncClient(timeout=600) as c:
                    r = await c.post(srv.url + "/v1/completions", headers=_headers(),
                                     json={"model": MODEL, "prompt": PROMPT, "max_tokens": 8,
                                           "temperature": 0, "ignore_eos": True})
                    assert r.status_code == 200, r.text
                    return r.json()["choices"][0]["text"]
            return await asyncio.gather(*(one(i) for i in range(12)))

        texts = asyncio.run(many())
        assert len(set(texts)) == 1  # greedy: every frontend got the same tokens
        # Generated-token counters come from the core: every frontend reports all 96.
        for _ in range(6):
            assert _gauge(srv.metrics(), "novainfer_generation_tokens_total") == 96
        # Request counts live in each frontend; the core relays them (once a second), so
        # that every frontend soon reports all 12.
        length = f'novainfer_requests_total{{model_name="{MODEL}",outcome="length"'
        while True:
            seen = [_gauge(srv.metrics(), length) for _ in range(6)]
            if seen == [12] * 6:
                break
            assert max(seen) <= 12 and time.monotonic() < deadline, seen
            time.sleep(0.2)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(300) == 0
        _gone({core, api1}, "processes")
    finally:
        srv.stop()


def test_hung_up_stream_is_aborted_in_the_core(model_dir, tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    srv = Server(model_dir, tmp_path / "gate.log", hold=hold, hold_after=2)
    try:
        start = srv.health()

        async def main() -> None:
            await _hold_stream(srv.url, asyncio.Event(), hang_up=True)
            await _until(srv, "num_requests_running", 0)

        asyncio.run(main())
        assert srv.health()["kv_free_blocks"] == start["kv_free_blocks"]
        m = srv.metrics()
        assert _gauge(m, f'novainfer_requests_total{{model_name="{MODEL}",outcome="abort"') == 1
        hold.unlink()
    finally:
        srv.stop()


def test_killed_core_fails_requests_and_the_server_exits_nonzero(model_dir, tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    srv = Server(model_dir, tmp_path / "core.log", hold=hold, hold_after=2)
    try:
        children = _child_pids(srv.proc.pid)
        core = _named(children, "novainfer-core")

        async def main():
            first = asyncio.Event()
            stream = asyncio.ensure_future(_hold_stream(srv.url, first, hang_up=False))
            await first.wait()
            async with httpx.AsyncClient(timeout=600) as c:
                plain = asyncio.ensure_future(c.post(
                    srv.url + "/v1/completions", headers=_headers(),
                    json={"model": MODEL, "prompt": PROMPT, "max_tokens": 50}))
                await _until(srv, "num_requests_waiting", 1)  # the gate admits no more
                os.kill(core, signal.SIGKILL)
                return await stream, await plain

        chunks, resp = asyncio.run(main())
        assert resp.status_code == 500
        assert "engine core" in resp.json()["error"]["message"]
        assert "error" in chunks[-1] and "engine core" in chunks[-1]["error"]["message"]
        try:  # unhealthy (503) while it shuts down, or already gone
            assert httpx.get(srv.url + "/health", timeout=60).status_code == 503
        except httpx.HTTPError:
            pass
        assert srv.proc.wait(300) != 0
        _gone(children, "processes")
    finally:
        srv.stop()


@pytest.mark.parametrize("which", ["main", "api1"])
def test_killed_frontend_takes_the_core_down(model_dir, tmp_path, which):
    """SIGKILL to the main process (frontend 0) or to a second frontend while a stream is in
    flight (held by the gate): the core exits (and with it the other frontend; the main one
    exits non-zero)."""
    hold = tmp_path / "hold"
    hold.touch()
    srv = Server(model_dir, tmp_path / f"{which}.log", "--api-server-count", "2", hold=hold,
                 hold_after=2)
    try:
        children = _child_pids(srv.proc.pid)
        core = _named(children, "novainfer-core")
        api1 = _named(children, "novainfer-api1")

        async def kill_mid_stream() -> None:
            first = asyncio.Event()
            task = asyncio.ensure_future(_hold_stream(srv.url, first, hang_up=False))
            await first.wait()
            if which == "main":
                srv.proc.kill()
            else:
                os.kill(api1, signal.SIGKILL)
            try:  # the stream ends with an error chunk or a broken connection
                await task
            except (httpx.HTTPError, AssertionError):
                pass

        asyncio.run(kill_mid_stream())
        if which == "main":
            _gone({core, api1}, "processes")
        else:
            _gone({core}, "the core")
            assert srv.proc.wait(300) != 0
    finally:
        srv.stop()


def test_api_server_count_default_and_bad_value():
    import subprocess
    import sys

    import torch

    from novainfer.server.serve import default_api_server_count

    assert default_api_server_count("cpu", 64) == 1
    assert default_api_server_count("cuda", 64) == 2
    assert default_api_server_count("cuda", 4) == 1
    assert default_api_server_count("auto", 64) == (2 if torch.cuda.is_available() else 1)
    out = subprocess.run([sys.executable, "-m", "novainfer.cli", "serve", "--api-server-count",
                          "0"], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 2
    assert "--api-server-count must be at least 1, got 0" in out.stderr


def test_sigterm_drains_streams_on_every_frontend(model_dir, tmp_path):
    """Two frontends, streams in flight (held by the gate), SIGTERM: a frontend with nothing
    left to drain says goodbye while the other still streams; every stream still ends with
    all its tokens, and everything exits 0."""
    hold = tmp_path / "hold"
    hold.touch()
    srv = Server(model_dir, tmp_path / "drain.log", "--api-server-count", "2",
                 "--shutdown-grace", "600", hold=hold, hold_after=2)
    try:
        children = _child_pids(srv.proc.pid)

        async def main():
            streams = [asyncio.ensure_future(_good_stream(srv.url, max_tokens=20))
                       for _ in range(4)]
            deadline = time.monotonic() + 300  # a hang guard
            while True:
                h = await asyncio.to_thread(srv.health)
                if h["num_requests_running"] + h["num_requests_waiting"] == 4:
                    break
                assert time.monotonic() < deadline, h
                await asyncio.sleep(0.05)
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.0)  # let an idle frontend leave first (not needed to pass)
            hold.unlink()
            return await asyncio.gather(*streams)

        assert asyncio.run(main()) == [("length", 20)] * 4
        assert srv.proc.wait(300) == 0
        _gone(children, "processes")
    finally:
        srv.stop()
