"""`novainfer serve`: a real server process on 127.0.0.1 with a tiny checkpoint, driven by the
official `openai` client (and httpx for raw HTTP: bad bodies, disconnects, load).

Needs the `server` and `test` extras (fastapi, uvicorn, pydantic, openai, httpx; schemathesis
for the fuzz test); skipped when they are missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

API_KEY = "sk-novainfer-test"
MODEL = "tiny-llama"
MAX_MODEL_LEN = 128
BODY_LIMIT = 64 * 1024
PROMPT = "hello the capital of france is"
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `novainfer serve` process. With `hold` (a file path), the engine stops stepping
    after `hold_after` steps while that file exists (tests/gated_serve.py)."""

    def __init__(self, folder: Path, log: Path, *extra: str, hold: Path | None = None,
                 hold_after: int = 0) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        entry = ["-m", "novainfer.cli"] if hold is None else [str(ROOT / "tests" / "gated_serve.py")]
        cmd = [sys.executable, *entry, "serve", "--model", str(folder),
               "--port", str(self.port), "--device", "cpu", "--dtype", "float32",
               "--served-model-name", MODEL, "--api-key", API_KEY,
               "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "1024",
               "--log-level", "warning", *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        if hold is not None:
            env.update(NOVAINFER_TEST_HOLD=str(hold), NOVAINFER_TEST_HOLD_AFTER=str(hold_after),
                       PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
        self.log = log
        with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)
        try:
            self._wait_healthy(log)
        except BaseException:  # Ctrl-C or any error while waiting: leave no server behind
            self.stop()
            raise

    def _wait_healthy(self, log: Path) -> None:
        deadline = time.monotonic() + 600  # a hang guard, not a speed limit
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=300).json()

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=300).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def model_dir(checkpoint):
    return checkpoint("llama")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = Server(model_dir, tmp_path_factory.mktemp("srv") / "server.log",
                 "--max-request-body-bytes", str(BODY_LIMIT))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _gauge(metrics: dict[str, float], name: str) -> float:
    return next(v for k, v in metrics.items()
                if k == name or k.startswith(name + "{") or ("{" in name and k.startswith(name)))


# ------------------------------------------------------------------------------ openai client


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = server.health()
    assert h["status"] == "ok" and h["kv_free_blocks"] == h["kv_total_blocks"] == 1024


def test_completion_usage_matches_tokenizer(client, tokenizer):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=9, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL and r.id and r.created
    assert r.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert r.usage.completion_tokens == 9
    assert r.usage.total_tokens == r.usage.prompt_tokens + 9
    assert r.choices[0].finish_reason == "length"
    assert len(tokenizer.encode(r.choices[0].text, add_special_tokens=False)) == 9


def test_chat_usage_matches_template(client, tokenizer):
    messages = [{"role": "system", "content": "hi"}, {"role": "user", "content": PROMPT}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7,
                                       temperature=0, extra_body={"ignore_eos": True})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "input_ids") or isinstance(ids, dict) else ids
    assert r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 7
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content


def _stream_completion(client, **kw) -> tuple[dict[int, str], dict[int, str], object]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(model=MODEL, stream=True,
                                           stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


def _stream_chat(client, **kw) -> tuple[dict[int, str], dict[int, str], object]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in client.chat.completions.create(model=MODEL, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


@pytest.mark.parametrize("prompt", [PROMPT, [5, 17, 99, 300, 41], "what is the capital"])
def test_stream_equals_non_stream_completion(client, prompt):
    kw = {"prompt": prompt, "max_tokens": 24, "temperature": 0}
    full = client.completions.create(model=MODEL, **kw)
    texts, reasons, usage = _stream_completion(client, **kw)
    assert texts[0] == full.choices[0].text
    assert reasons[0] == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_stream_equals_non_stream_chat(client):
    kw = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 20, "temperature": 0}
    full = client.chat.completions.create(model=MODEL, **kw)
    texts, reasons, usage = _stream_chat(client, **kw)
    assert texts[0] == full.choices[0].message.content
    assert reasons[0] == full.choices[0].finish_reason
    assert usage.total_tokens == full.usage.total_tokens


def test_n2_and_seed_reproducible(client):
    kw = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "n": 2, "seed": 1234}
    a = client.completions.create(model=MODEL, **kw)
    b = client.completions.create(model=MODEL, **kw)
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text  # siblings get different seeds
    texts, _, usage = _stream_completion(client, **kw)
    assert [texts[0], texts[1]] == [c.text for c in a.choices]
    assert usage.completion_tokens == a.usage.completion_tokens
    c = client.completions.create(model=MODEL, **dict(kw, seed=4321))
    assert [x.text for x in c.choices] != [x.text for x in a.choices]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8, temperature=1.0, n=2, seed=5)
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_multiple_prompts(client):
    r = client.completions.create(model=MODEL, prompt=[PROMPT, "hi"], max_tokens=4, n=2,
                                  temperature=0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]


def test_stop_strings(client):
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    words = base.choices[0].text.split(" ")
    assert len(words) > 6
    # a stop string spanning two words: streaming must hold back the first half
    stop = " ".join(words[4:6])[:-1]
    kw = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stop": [stop, "zzz"]}
    r = client.completions.create(model=MODEL, **kw)
    assert r.choices[0].finish_reason == "stop"
    expected = base.choices[0].text[: base.choices[0].text.index(stop)]
    assert r.choices[0].text == expected
    texts, reasons, _ = _stream_completion(client, **kw)
    assert texts[0] == expected and reasons[0] == "stop"
    chat_kw = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
               "temperature": 0}
    chat_base = client.chat.completions.create(model=MODEL, **chat_kw).choices[0].message.content
    chat_stop = chat_base.split(" ")[3]
    r = client.chat.completions.create(model=MODEL, stop=chat_stop, **chat_kw)
    assert r.choices[0].message.content == chat_base[: chat_base.index(chat_stop)]
    texts, _, _ = _stream_chat(client, stop=chat_stop, **chat_kw)
    assert texts[0] == r.choices[0].message.content


def test_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                  logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert val <= 0 and 3 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(val)  # greedy: the chosen token is the top one
    texts, _, _ = _stream_completion(client, prompt=PROMPT, max_tokens=6, temperature=0,
                                     logprobs=3, extra_body={"ignore_eos": True})
    assert texts[0] == r.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)


def test_sampling_fields_accepted(client):
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.3, seed=3, user="u1",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 4,
                    "ignore_eos": False})
    assert r.usage.completion_tokens >= 4
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=3, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 3


def _post(server, path: str, body: dict) -> dict:
    resp = httpx.post(server.url + path, json={"model": MODEL, **body}, headers=_headers(),
                      timeout=600)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_prompt_logprobs_match_transformers(server, model_dir, tokenizer):
    import torch
    from conftest import hf_model

    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(model_dir)(torch.tensor([ids])).logits[0, :-1].float(), -1)
    r = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0,
                                          "prompt_logprobs": 2})
    entries = r["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for p in range(1, len(ids)):
        got = entries[p][str(ids[p])]
        assert got["logprob"] == pytest.approx(float(ref[p - 1, ids[p]]), abs=1e-4)
        assert got["rank"] == int((ref[p - 1] > ref[p - 1, ids[p]]).sum()) + 1
        assert sum(1 for e in entries[p].values() if e["rank"] <= 2) == 2
    # Streaming: the first chunk of the choice carries them.
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "temperature": 0,
            "prompt_logprobs": 2, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=_headers(),
                      timeout=600) as resp:
        chunks = [json.loads(line[6:]) for line in resp.iter_lines()
                  if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["prompt_logprobs"] == entries
    chat = _post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "prompt_logprobs": 0})
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == \
        chat["usage"]["prompt_tokens"]


def test_include_stop_str_and_special_token_fields(server):
    base = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 20,
                                             "temperature": 0})["choices"][0]["text"]
    stop = " ".join(base.split(" ")[4:6])
    cut = base.index(stop)
    for include, expected in ((True, base[: cut + len(stop)]), (False, base[:cut])):
        body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stop": stop,
                "include_stop_str_in_output": include, "skip_special_tokens": False,
                "spaces_between_special_tokens": False}
        choice = _post(server, "/v1/completions", body)["choices"][0]
        assert choice["text"] == expected and choice["finish_reason"] == "stop"
        texts, reasons, _ = _stream_completion(
            openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                          timeout=600), **{k: v for k, v in body.items() if k in
                                          ("prompt", "max_tokens", "temperature", "stop")},
            extra_body={k: v for k, v in body.items() if k not in
                        ("prompt", "max_tokens", "temperature", "stop")})
        assert texts[0] == expected and reasons[0] == "stop"
    for field in ("include_stop_str_in_output", "skip_special_tokens",
                  "spaces_between_special_tokens"):
        resp = httpx.post(server.url + "/v1/completions", headers=_headers(), timeout=600,
                          json={"model": MODEL, "prompt": PROMPT, field: "yes"})
        _check_error(resp, 400, field)
        assert resp.json()["error"]["param"] == field


def test_cache_salt_isolates_tenants(server):
    prompt = " ".join([PROMPT] * 6)  # several full 16-token blocks

    def cached(salt: str | None, chat: bool = False) -> int:
        extra = {} if salt is None else {"cache_salt": salt}
        if chat:
            r = _post(server, "/v1/chat/completions", {
                "messages": [{"role": "user", "content": prompt}], "max_tokens": 1, **extra})
        else:
            r = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1, **extra})
        return r["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("tenant-a") == 0
    assert cached("tenant-a") >= 32
    assert cached("tenant-b") == 0
    assert cached("tenant-a", chat=True) == 0
    assert cached("tenant-a", chat=True) >= 32
    assert cached("tenant-b", chat=True) == 0
    assert cached(None, chat=True) == 0
    resp = httpx.post(server.url + "/v1/completions", headers=_headers(), timeout=600,
                      json={"model": MODEL, "prompt": prompt, "cache_salt": ""})
    _check_error(resp, 400, "empty cache_salt")


# ------------------------------------------------------------------------------ errors


def _headers(key: str | None = API_KEY) -> dict[str, str]:
    h = {"content-type": "application/json"}
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    return h


async def _good_stream(url: str, max_tokens: int = 48) -> tuple[str | None, int]:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    reason, tokens = None, 0
    async with httpx.AsyncClient(timeout=600) as c, \
            c.stream("POST", url + "/v1/completions", json=body, headers=_headers()) as r:
        assert r.status_code == 200
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        obj = json.loads(line[6:])
        for ch in obj["choices"]:
            reason = ch["finish_reason"] or reason
        if obj.get("usage"):
            tokens = obj["usage"]["completion_tokens"]
    return reason, tokens


def _error_cases() -> list[tuple[str, str, dict, bytes | None, int]]:
    """(name, path, headers, raw body, expected status)."""
    good = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4}

    def j(obj: object) -> bytes:
        return json.dumps(obj).encode()

    cmpl, chat = "/v1/completions", "/v1/chat/completions"
    return [
        ("invalid json", cmpl, _headers(), b'{"prompt": "hi", ', 400),
        ("not an object", cmpl, _headers(), b"[1, 2]", 400),
        ("wrong type", cmpl, _headers(), j({**good, "max_tokens": "4"}), 400),
        ("bool as int", cmpl, _headers(), j({**good, "n": True}), 400),
        ("temperature out of range", cmpl, _headers(), j({**good, "temperature": -1}), 400),
        ("top_p out of range", cmpl, _headers(), j({**good, "top_p": 0}), 400),
        ("nan", cmpl, _headers(), b'{"prompt": "hi", "temperature": NaN}', 400),
        ("missing prompt", cmpl, _headers(), j({"model": MODEL}), 400),
        ("empty prompt", cmpl, _headers(), j({**good, "prompt": ""}), 400),
        ("token id out of vocab", cmpl, _headers(), j({**good, "prompt": [1, 2, 10**6]}), 400),
        ("prompt too long", cmpl, _headers(),
         j({**good, "prompt": " ".join(["hello"] * (MAX_MODEL_LEN + 10))}), 400),
        ("prompt + max_tokens too long", cmpl, _headers(),
         j({**good, "max_tokens": MAX_MODEL_LEN}), 400),
        ("min_tokens > max_tokens", cmpl, _headers(), j({**good, "min_tokens": 10}), 400),
        ("empty stop string", cmpl, _headers(), j({**good, "stop": [""]}), 400),
        ("chat without messages", chat, _headers(), j({"model": MODEL}), 400),
        ("chat empty messages", chat, _headers(), j({"model": MODEL, "messages": []}), 400),
        ("chat bad role", chat, _headers(),
         j({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}), 400),
        ("chat too long", chat, _headers(),
         j({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 200}]}), 400),
        ("no api key", cmpl, _headers(None), j(good), 401),
        ("wrong api key", cmpl, _headers("sk-wrong"), j(good), 401),
        ("wrong api key chat", chat, _headers("x"), j({"messages": []}), 401),
        ("unknown model", cmpl, _headers(), j({**good, "model": "gpt-17"}), 404),
        ("unknown model chat", chat, _headers(),
         j({"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}), 404),
        ("body too large", cmpl, _headers(), j({**good, "prompt": "hi " * BODY_LIMIT}), 413),
    ]


def _check_error(resp: httpx.Response, status: int, name: str) -> None:
    assert resp.status_code == status, (name, resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, (name, err)
    assert isinstance(err["message"], str) and err["message"], name


def test_errors_with_concurrent_good_request(server):
    cases = _error_cases()

    async def bad(name: str, path: str, headers: dict, body: bytes, status: int) -> None:
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient(timeout=600) as c:
            resp = await c.post(server.url + path, content=body, headers=headers)
        _check_error(resp, status, name)

    async def main() -> tuple[str | None, int]:
        results = await asyncio.gather(_good_stream(server.url), *(bad(*c) for c in cases))
        return results[0]

    reason, tokens = asyncio.run(main())
    assert reason == "length" and tokens == 48


def test_error_via_openai_client(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi")
    assert e.value.response.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=10_000)
    assert "max_model_len" in e.value.message
    bad = openai.OpenAI(base_url=client.base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unknown_route_has_error_shape(server):
    resp = httpx.get(server.url + "/v1/nothing", headers=_headers())
    _check_error(resp, 404, "route")


async def _until(srv: Server, key: str, value: int) -> None:
    """Poll /health until `key` equals `value` (the deadline only guards against a hang)."""
    deadline = time.monotonic() + 300
    while True:
        h = await asyncio.to_thread(srv.health)
        if h[key] == value:
            return
        assert time.monotonic() < deadline, h
        await asyncio.sleep(0.01)


def test_overload_503_and_graceful_shutdown(model_dir, tmp_path):
    """A full waiting queue gets 503 + Retry-After; SIGTERM lets the in-flight stream finish.
    The gate holds the running request, so it is still running when the 503 is checked."""
    hold = tmp_path / "hold"
    hold.touch()
    srv = Server(model_dir, tmp_path / "small.log", "--max-num-seqs", "1",
                 "--max-waiting-requests", "1", "--shutdown-grace", "600",
                 "--max-model-len", "1024", hold=hold, hold_after=2)
    try:
        async def main():
            long = asyncio.ensure_future(_good_stream(srv.url, max_tokens=200))
            await _until(srv, "num_requests_running", 1)
            queued = asyncio.ensure_future(_good_stream(srv.url, max_tokens=8))
            await _until(srv, "num_requests_waiting", 1)
            async with httpx.AsyncClient(timeout=600) as c:
                resp = await c.post(srv.url + "/v1/completions", headers=_headers(),
                                    json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
            _check_error(resp, 503, "overloaded")
            assert int(resp.headers["retry-after"]) >= 1
            assert not long.done() and not queued.done()
            srv.proc.send_signal(signal.SIGTERM)
            hold.unlink()  # draining: both requests may now run to the end
            return await long, await queued

        (reason, tokens), (reason2, tokens2) = asyncio.run(main())
        assert (reason, tokens) == ("length", 200)
        assert (reason2, tokens2) == ("length", 8)
        assert srv.proc.wait(300) == 0
    finally:
        srv.stop()


def test_sigint_after_grace_aborts_and_exits_0(model_dir, tmp_path):
    """Past the grace period the rest is aborted: the stream still ends cleanly. The gate
    stops the request after its first tokens, so it cannot finish within the grace."""
    hold = tmp_path / "hold"
    hold.touch()
    srv = Server(model_dir, tmp_path / "grace.log", "--shutdown-grace", "1",
                 "--max-model-len", "1024", hold=hold, hold_after=2)
    try:
        async def main():
            long = asyncio.ensure_future(_good_stream(srv.url, max_tokens=1000))
            await _until(srv, "num_requests_running", 1)
            srv.proc.send_signal(signal.SIGINT)
            return await long

        reason, tokens = asyncio.run(main())
        assert reason == "abort" and 1 <= tokens <= 2
        assert srv.proc.wait(300) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(srv.url + "/health", timeout=2)
    finally:
        srv.stop()


def _child_pids(pid: int) -> set[int]:
    """Processes whose parent is `pid` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_tensor_parallel_server(model_dir, tmp_path):
    """`serve --tensor-parallel-size 2` (gloo on the CPU): the same greedy text as one rank,
    a disconnected stream frees its blocks, SIGTERM drains and exits 0 with no worker left."""
    one = Server(model_dir, tmp_path / "tp1.log")
    try:
        expected = _post(one, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12,
                                                  "temperature": 0})["choices"][0]["text"]
    finally:
        one.stop()
    hold = tmp_path / "hold"
    srv = Server(model_dir, tmp_path / "tp2.log", "--tensor-parallel-size", "2",
                 "--shutdown-grace", "600", hold=hold, hold_after=3)
    try:
        workers = _child_pids(srv.proc.pid)
        assert workers, "no worker process"
        got = _post(srv, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12,
                                             "temperature": 0})["choices"][0]["text"]
        assert got == expected
        start = srv.health()
        hold.touch()  # from here the engine holds: the stream below cannot finish

        async def drop_after_first_chunk() -> None:
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 500, "stream": True,
                    "ignore_eos": True}
            async with httpx.AsyncClient(timeout=600) as c, \
                    c.stream("POST", srv.url + "/v1/completions", json=body,
                             headers=_headers()) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        return  # hang up

        asyncio.run(drop_after_first_chunk())
        asyncio.run(_until(srv, "num_requests_running", 0))
        assert srv.health()["kv_free_blocks"] == start["kv_free_blocks"]
        hold.unlink()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(300) == 0
        deadline = time.monotonic() + 120  # a hang guard
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, f"workers {workers} outlived the server"
            time.sleep(0.05)
    finally:
        srv.stop()


# ------------------------------------------------------------------------------ load


def test_load_with_disconnects(server):
    """64 concurrent streams, a quarter hang up mid-stream: no 5xx, no leaked KV blocks, every
    request counted once. (Whether a hung-up stream is aborted or already finished depends on
    the machine's speed; tests/test_server_processes.py checks the abort deterministically.)"""
    start = server.health()
    before = server.metrics()
    num_clients, max_tokens = 64, 100

    async def one(i: int, c: httpx.AsyncClient) -> str:
        drop = i % 4 == 0
        body = {"model": MODEL, "prompt": f"{PROMPT} w{i}", "max_tokens": max_tokens,
                "stream": True, "ignore_eos": True, "temperature": 0.8, "seed": i}
        path = "/v1/completions"
        if i % 2:
            path = "/v1/chat/completions"
            body.pop("prompt")
            body["messages"] = [{"role": "user", "content": f"hi w{i}"}]
        async with c.stream("POST", server.url + path, json=body, headers=_headers()) as r:
            assert r.status_code == 200, r.status_code
            lines = []
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if drop and len(lines) >= 3:
                        return "dropped"  # leaving the block closes the connection
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][6:])
        assert last["choices"][-1]["finish_reason"] == "length"
        return "done"

    async def main():
        limits = httpx.Limits(max_connections=num_clients + 8)
        async with httpx.AsyncClient(timeout=600, limits=limits) as c:
            return await asyncio.wait_for(  # a hang guard, not a speed limit
                asyncio.gather(*(one(i, c) for i in range(num_clients))), 900)

    results = asyncio.run(main())
    assert results.count("dropped") == num_clients // 4
    assert results.count("done") == num_clients - num_clients // 4
    deadline = time.monotonic() + 300
    while True:
        h = server.health()
        if h["num_requests_running"] == 0 and h["kv_free_blocks"] == start["kv_free_blocks"]:
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.1)
    m = server.metrics()
    assert _gauge(m, "novainfer_num_requests_running") == 0
    assert _gauge(m, "novainfer_num_requests_waiting") == 0
    assert _gauge(m, "novainfer_kv_free_blocks") == start["kv_free_blocks"]
    ended = {o: _gauge(m, f'novainfer_requests_total{{model_name="tiny-llama",outcome="{o}"')
             - _gauge(before, f'novainfer_requests_total{{model_name="tiny-llama",outcome="{o}"')
             for o in ("abort", "length", "stop")}
    assert ended["abort"] + ended["length"] == num_clients and ended["stop"] == 0, ended
    assert ended["abort"] <= num_clients // 4, ended
    assert not any(k.startswith("novainfer_requests_total") and 'outcome="error"' in k
                   for k in m)


def test_metrics_format(server, client):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("novainfer_requests_total", "novainfer_num_requests_running",
                 "novainfer_num_requests_waiting", "novainfer_kv_cache_usage_perc",
                 "novainfer_prefix_cache_hit_rate", "novainfer_prompt_tokens_total",
                 "novainfer_generation_tokens_total",
                 "novainfer_time_to_first_token_seconds_bucket",
                 "novainfer_inter_token_latency_seconds_bucket"):
        assert f"\n{name}{{" in text, name
    assert "# TYPE novainfer_time_to_first_token_seconds histogram" in text
    m = server.metrics()
    assert _gauge(m, "novainfer_time_to_first_token_seconds_count") >= 1
    assert _gauge(m, "novainfer_generation_tokens_total") >= 3


def test_import_novainfer_has_no_server_deps():
    code = ("import sys, novainfer, novainfer.cli; novainfer.cli.build_parser(); "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'uvicorn', 'pydantic', 'starlette', 'httpx')]; print(bad); "
            "sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bench_serve(server):
    cmd = [sys.executable, "-m", "novainfer.cli", "bench", "serve", "--base-url", server.url,
           "--api-key", API_KEY, "--num-prompts", "8", "--random-input-len", "16",
           "--random-output-len", "8", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Serving Benchmark Result" in proc.stdout and "P99 ITL (ms):" in proc.stdout
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["completed"] == 8 and res["failed"] == 0
    assert res["total_output_tokens"] == 64 and res["total_input_tokens"] == 128
    assert res["output_throughput"] > 0 and res["mean_ttft_ms"] > 0


# ------------------------------------------------------------------------------ fuzz


def test_schemathesis_no_server_errors(server, tmp_path):
    st = pytest.importorskip("schemathesis")  # noqa: F841
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
           "--checks", "not_a_server_error", "--include-method", "POST",
           "--max-examples", "25", "--request-timeout", "600", "--seed", "1",
           "--phases", "examples,coverage,fuzzing", "-H", f"Authorization: Bearer {API_KEY}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=tmp_path,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert server.health()["status"] == "ok"
