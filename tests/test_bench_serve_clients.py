"""`novainfer bench serve --num-clients N` and the server-side throughput row, against a tiny
fake OpenAI-compatible streaming server (no model, nothing that depends on machine speed)."""

import asyncio
import json
import socket
import threading
import time

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

# At module level, not inside FakeServer: FastAPI resolves endpoint annotations here.
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from novainfer.server import bench_serve


class FakeServer:
    """/v1/models, streaming /v1/completions (exactly max_tokens one-token chunks, then usage)
    and, unless `metrics` is False, /metrics with novainfer's token counters."""

    def __init__(self, metrics: bool = True) -> None:
        self.requests: list[dict] = []  # bodies of /v1/completions, as received
        self.metrics_auth: list[str | None] = []
        self.generation_tokens = 0
        self.prompt_tokens = 0
        self.in_flight = self.peak_in_flight = 0
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict:
            return {"object": "list", "data": [{"id": "m", "object": "model", "vocab_size": 1000}]}

        @app.post("/v1/completions")
        async def completions(request: Request) -> StreamingResponse:
            body = await request.json()
            self.requests.append(body)
            prompt = body["prompt"]
            n_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.split())
            self.prompt_tokens += n_prompt

            async def stream():
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                for _ in range(body["max_tokens"]):
                    self.generation_tokens += 1  # counted before it is sent, as novainfer does
                    chunk = {"object": "text_completion", "model": "m",
                             "choices": [{"index": 0, "text": "x", "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                    await asyncio.sleep(0)
                # Out before the client can see the end, so a follow-up request never overlaps.
                self.in_flight -= 1
                usage = {"prompt_tokens": n_prompt, "completion_tokens": body["max_tokens"],
                         "total_tokens": n_prompt + body["max_tokens"]}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        if metrics:
            @app.get("/metrics")
            async def prometheus(request: Request) -> PlainTextResponse:
                self.metrics_auth.append(request.headers.get("authorization"))
                text = (
                    "# TYPE novainfer_generation_tokens_total counter\n"
                    f'novainfer_generation_tokens_total{{model_name="m"}} {self.generation_tokens}\n'
                    "# TYPE novainfer_prompt_tokens_total counter\n"
                    f'novainfer_prompt_tokens_total{{model_name="m"}} {self.prompt_tokens}\n')
                return PlainTextResponse(text)

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "fake server failed"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def fake_server():
    servers: list[FakeServer] = []

    def start(metrics: bool = True) -> FakeServer:
        servers.append(FakeServer(metrics))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def _bench(capsys, url: str, *extra: str) -> tuple[int, dict, str]:
    """Runs bench_serve.main; returns (exit code, the --json result, the printed report)."""
    code = bench_serve.main(["--base-url", url, "--num-prompts", "6", "--random-input-len", "8",
                             "--random-output-len", "5", "--random-range-ratio", "0.5",
                             "--json", *extra])
    out = capsys.readouterr().out
    return code, json.loads(out.strip().splitlines()[-1]), out


def _received(server: FakeServer) -> list[tuple]:
    return sorted((tuple(b["prompt"]), b["max_tokens"]) for b in server.requests)


def test_two_clients_send_what_one_sends(fake_server, capsys):
    one, two = fake_server(), fake_server()
    code, res1, _ = _bench(capsys, one.url)
    assert code == 0 and res1["num_clients"] == 1
    code, res2, out = _bench(capsys, two.url, "--num-clients", "2", "--api-key", "k")
    assert code == 0, out
    assert res2["num_clients"] == 2
    assert res2["completed"] == 6 and res2["failed"] == 0
    # Each request reached the server exactly once, and they are the requests one client sends.
    assert len(two.requests) == 6
    assert _received(two) == _received(one)
    assert len({p for p, _ in _received(two)}) == 6
    sent_tokens = sum(b["max_tokens"] for b in two.requests)
    assert res2["total_output_tokens"] == sent_tokens == res1["total_output_tokens"]
    assert res2["total_input_tokens"] == res1["total_input_tokens"] == sum(
        len(b["prompt"]) for b in two.requests)
    # The server's own count over the window matches the client's.
    assert res2["server_generation_tokens"] == res2["total_output_tokens"]
    assert res1["server_generation_tokens"] == res1["total_output_tokens"]
    assert res2["server_prompt_tokens"] == res2["total_input_tokens"]
    assert res2["server_output_throughput"] > 0
    assert two.metrics_auth == ["Bearer k", "Bearer k"]  # the api key goes to /metrics too
    lines = out.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("Output token throughput"))
    assert lines[i + 1].startswith("Server output throughput (tok/s):")


def test_concurrency_is_a_total_over_clients(fake_server, capsys):
    server = fake_server()
    code, res, out = _bench(capsys, server.url, "--num-clients", "2", "--max-concurrency", "2",
                            "--request-rate", "1000")
    assert code == 0, out
    assert res["completed"] == 6 and res["request_rate"] == 1000
    assert 1 <= server.peak_in_flight <= 2  # one in flight per client, whatever the speed


@pytest.mark.parametrize("clients", ["0", "7"])
def test_num_clients_out_of_range(fake_server, capsys, clients):
    server = fake_server()
    code = bench_serve.main(["--base-url", server.url, "--num-prompts", "6",
                             "--num-clients", clients])
    assert code == 2
    assert "--num-clients" in capsys.readouterr().err
    assert server.requests == []


def test_no_metrics_endpoint(fake_server, capsys):
    server = fake_server(metrics=False)
    code, res, out = _bench(capsys, server.url, "--num-clients", "2")
    assert code == 0, out
    assert res["completed"] == 6
    assert res["server_output_throughput"] is None and res["server_generation_tokens"] is None
    row = next(line for line in out.splitlines() if line.startswith("Server output throughput"))
    assert row.split()[-1] == "n/a"


def test_prometheus_sum():
    text = ('# HELP novainfer_generation_tokens_total Generated tokens.\n'
            'novainfer_generation_tokens_total{model_name="a b",x="}"} 3\n'
            'novainfer_generation_tokens_total{model_name="c"} 4.5 1700000000\n'
            'novainfer_generation_tokens_total_other 100\n'
            'novainfer_prompt_tokens_total 7\n')
    assert bench_serve._prometheus_sum(text, "novainfer_generation_tokens_total") == 7.5
    assert bench_serve._prometheus_sum(text, "novainfer_prompt_tokens_total") == 7
    assert bench_serve._prometheus_sum(text, "novainfer_missing_total") is None
    assert bench_serve._prometheus_sum("<html>not found</html>", "x") is None


def test_concurrency_shares():
    assert [bench_serve._share_of(5, 2, i) for i in range(2)] == [3, 2]
    assert [bench_serve._share_of(1, 3, i) for i in range(3)] == [1, 1, 1]
    assert bench_serve._share_of(None, 4, 0) is None
