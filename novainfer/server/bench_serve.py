"""`novainfer bench serve --base-url URL`: online serving benchmark against a running server.

N streaming requests (random token-id prompts of given lengths, or one given prompt), sent
all at once or at a Poisson rate; reports request throughput, output tok/s and TTFT, TPOT
and ITL mean/median/p90/p99 in the layout vLLM's `benchmark_serving` prints. Needs httpx.

`--num-clients N` sends the requests from N processes, so that one Python event loop parsing
SSE streams is never the bottleneck; the server's own output throughput (the delta of its
`/metrics` token counter over the timed window) is reported alongside the client's count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


def build_parser() -> argparse.ArgumentParser:
    from novainfer.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="novainfer bench serve", formatter_class=HelpFormatter,
                                description="online serving benchmark (streaming requests)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's address")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="/v1/completions or /v1/chat/completions")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' "
                   "(default: none)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests sent")
    p.add_argument("--random-input-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--random-output-len", type=int, default=128, help="output tokens per request")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn from [len*(1-r), len*(1+r)]")
    p.add_argument("--prompt", default=None, help="send this text prompt instead of random ids")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests/s (Poisson arrivals); inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at once, over all clients (default: no limit)")
    p.add_argument("--num-clients", type=int, default=1,
                   help="client processes the requests are split over (round-robin); "
                   "--request-rate and --max-concurrency are totals over all of them")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


def _lengths(base: int, ratio: float, n: int, rng: random.Random) -> list[int]:
    lo, hi = max(1, int(base * (1 - ratio))), max(1, int(base * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


async def _one(client, url: str, body: dict, headers: dict, chat: bool) -> Result:
    res = Result()
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = obj["error"].get("message", "error")
                    return res
                if obj.get("usage"):
                    res.prompt_tokens = obj["usage"]["prompt_tokens"]
                    res.output_tokens = obj["usage"]["completion_tokens"]
                now = time.perf_counter()
                has_text = any((c.get("delta", {}).get("content") if chat else c.get("text"))
                               for c in obj.get("choices", []))
                if has_text:
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
        res.latency = time.perf_counter() - start
        res.ok = True
    except Exception as exc:  # noqa: BLE001 - reported per request
        res.error = f"{type(exc).__name__}: {exc}"
    return res


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0}
    v = sorted(values)

    def pct(q: float) -> float:
        k = (len(v) - 1) * q
        lo = int(k)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return {"mean": sum(v) / len(v), "median": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}


def _prometheus_sum(text: str, name: str) -> float | None:
    """The sum of metric `name` over its label sets in Prometheus text; None if it is absent."""
    total, seen = 0.0, False
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # `name{labels} value [timestamp]`: a label value may hold spaces, so cut at the '}'.
        if "{" in line:
            cut = line.rfind("}") + 1
            key, rest = line[:cut], line[cut:]
        else:
            key, _, rest = line.partition(" ")
        if key.split("{", 1)[0] != name:
            continue
        try:
            total += float(rest.split()[0])
            seen = True
        except (IndexError, ValueError):
            continue
    return total if seen else None


async def _server_tokens(client, base: str, headers: dict) -> dict[str, float | None]:
    """The server's token counters; None where /metrics fails or lacks them (another server,
    metrics off): the benchmark goes on without them."""
    try:
        r = await client.get(base + "/metrics", headers=headers)
        text = r.text if r.status_code == 200 else ""
    except Exception:  # noqa: BLE001 - a missing /metrics only loses the server-side row
        text = ""
    return {kind: _prometheus_sum(text, f"novainfer_{kind}_tokens_total")
            for kind in ("generation", "prompt")}


async def _send(url: str, headers: dict, chat: bool, bodies: list[dict], gaps: list[float],
                concurrency: int | None,
                ready: Callable[[], None] | None = None) -> tuple[list[Result], float, float]:
    """Sends `bodies` (gaps[i] seconds between request i and i+1, at most `concurrency` in
    flight); returns the results and the window's start and end as time.time() stamps, which
    compare across processes. `ready()` blocks until every client may start."""
    import httpx

    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30), limits=limits) as client:
        sem = asyncio.Semaphore(concurrency or len(bodies) or 1)

        async def limited(body: dict) -> Result:
            async with sem:
                return await _one(client, url, body, headers, chat)

        if ready is not None:
            ready()  # blocking is fine: nothing runs on this loop yet
        start = time.time()
        tasks = []
        for i, body in enumerate(bodies):
            if i and gaps[i - 1] > 0:  # no sleep after the last one: it would pad the window
                await asyncio.sleep(gaps[i - 1])
            tasks.append(asyncio.create_task(limited(body)))
        results = list(await asyncio.gather(*tasks))
        end = time.time()
    return results, start, end


Share = tuple[list[dict], list[float], int | None]  # one client's bodies, gaps, concurrency


def _client_proc(index: int, url: str, headers: dict, chat: bool, share: Share, conn) -> None:
    """A spawned client process: says "ready", sends its share once the parent says "go",
    and reports (results as dicts, start, end, error) through `conn`."""

    def ready() -> None:
        conn.send("ready")
        conn.recv()  # "go"; EOFError if the parent is gone

    try:
        results, start, end = asyncio.run(_send(url, headers, chat, *share, ready=ready))
        conn.send(([asdict(r) for r in results], start, end, ""))
    except Exception as exc:  # noqa: BLE001 - reported as failed requests of this share
        conn.send(([], 0.0, 0.0, f"client {index}: {type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _run_clients(url: str, headers: dict, chat: bool,
                 shares: list[Share]) -> tuple[list[Result], float, float]:
    """Sends each share from its own process. They start together: the parent says "go" once
    all are ready (through pipes, not a multiprocessing Barrier or Event: a client that dies
    waiting on one of those leaves the others blocked for ever). The window runs from the first
    client's start to the last one's end."""
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("spawn")  # no fork: the parent may hold threads, CUDA
    procs, conns = [], []

    def collect(indices: list[int]) -> dict:
        """The next message of each of these clients; a client's death reads as EOF."""
        got, pending = {}, {conns[i]: i for i in indices}
        while pending:
            for conn in wait(list(pending)):
                i = pending.pop(conn)
                try:
                    got[i] = conn.recv()
                except EOFError:  # killed, or failed to start
                    procs[i].join()
                    got[i] = ([], 0.0, 0.0, f"client {i} exited with code {procs[i].exitcode}")
        return got

    try:
        for i, share in enumerate(shares):
            conn, child_conn = ctx.Pipe()
            proc = ctx.Process(target=_client_proc, daemon=True,
                               args=(i, url, headers, chat, share, child_conn))
            proc.start()
            child_conn.close()  # the child then holds the only copy: its death reads as EOF
            procs.append(proc)
            conns.append(conn)
        reports = collect(list(range(len(shares))))
        ready = [i for i, msg in reports.items() if msg == "ready"]
        for i in ready:  # the others failed before their start: their report says why
            try:
                conns[i].send("go")
            except OSError:
                pass  # died just now: collect() reports it
        reports.update(collect(ready))
    except BaseException:  # Ctrl-C, or a failed start: leave no client behind
        for p in procs:
            p.terminate()
        raise
    finally:
        for p, conn in zip(procs, conns):
            p.join()
            conn.close()
    results, starts, ends = [], [], []
    for i, (bodies, _, _) in enumerate(shares):
        dicts, start, end, error = reports[i]
        if error:
            results += [Result(error=error) for _ in bodies]
        else:
            results += [Result(**d) for d in dicts]
            starts.append(start)
            ends.append(end)
    return results, min(starts, default=0.0), max(ends, default=0.0)


def _share_of(total: int | None, n: int, i: int) -> int | None:
    """Client i's part of a total concurrency limit (the parts add up to it, at least 1 each)."""
    if not total:  # None or 0: no limit
        return total
    return max(1, total // n + (i < total % n))


async def run(args: argparse.Namespace) -> dict:
    import httpx

    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.base_url.rstrip("/")
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30)) as client:
        models = (await client.get(base + "/v1/models", headers=headers)).json()["data"]
        model = args.model or models[0]["id"]
        vocab = int(models[0].get("vocab_size") or 32000)
        rng = random.Random(args.seed)
        in_lens = _lengths(args.random_input_len, args.random_range_ratio, args.num_prompts, rng)
        out_lens = _lengths(args.random_output_len, args.random_range_ratio, args.num_prompts, rng)
        chat = args.endpoint == "chat"
        url = base + ("/v1/chat/completions" if chat else "/v1/completions")
        bodies = []
        for n_in, n_out in zip(in_lens, out_lens):
            body = {"model": model, "max_tokens": n_out, "ignore_eos": True, "stream": True,
                    "temperature": 0.0, "stream_options": {"include_usage": True}}
            if chat:
                text = args.prompt or " ".join(f"w{rng.randrange(400)}" for _ in range(n_in))
                body["messages"] = [{"role": "user", "content": text}]
            elif args.prompt:
                body["prompt"] = args.prompt
            else:
                lo = min(max(vocab // 10, 5), vocab - 1)
                body["prompt"] = [rng.randrange(lo, vocab) for _ in range(n_in)]
            bodies.append(body)
        n = args.num_clients if bodies else 1
        # Each client sends at rate/n: n Poisson streams add up to one at the total rate.
        # (Drawn after the bodies, as before, so one client sends what it always sent.)
        rate = args.request_rate / n
        gaps = [rng.expovariate(rate) if rate != float("inf") else 0.0 for _ in bodies]
        before = await _server_tokens(client, base, headers)
        if n == 1:
            results, start, end = await _send(url, headers, chat, bodies, gaps,
                                              args.max_concurrency)
        else:  # round-robin shares, so each client gets the same mix of lengths
            shares = [(bodies[i::n], gaps[i::n], _share_of(args.max_concurrency, n, i))
                      for i in range(n)]
            results, start, end = await asyncio.to_thread(_run_clients, url, headers, chat,
                                                          shares)
        after = await _server_tokens(client, base, headers)
    duration = max(end - start, 1e-9)
    server = {kind: None if before[kind] is None or after[kind] is None
              else round(after[kind] - before[kind]) for kind in before}
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    ms = 1000.0
    return {
        "model": model, "endpoint": args.endpoint, "num_prompts": args.num_prompts,
        "request_rate": None if args.request_rate == float("inf") else args.request_rate,
        "completed": len(ok), "failed": len(errors),
        "errors": errors[:5], "duration_s": duration, "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens, "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        **{f"{k}_ttft_ms": v * ms for k, v in _stats([r.ttft for r in ok]).items()},
        **{f"{k}_tpot_ms": v * ms for k, v in _stats(tpot).items()},
        **{f"{k}_itl_ms": v * ms for k, v in _stats([x for r in ok for x in r.itl]).items()},
        **{f"{k}_e2el_ms": v * ms for k, v in _stats([r.latency for r in ok]).items()},
        "num_clients": n, "server_generation_tokens": server["generation"],
        "server_prompt_tokens": server["prompt"],
        "server_output_throughput": (None if server["generation"] is None
                                     else server["generation"] / duration),
    }


def print_report(res: dict, as_json: bool) -> None:
    def row(label: str, value: object) -> None:
        print(f"{label:<40}{value:<10.2f}" if isinstance(value, float) else f"{label:<40}{value:<10}")

    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="))
    row("Successful requests:", res["completed"])
    row("Failed requests:", res["failed"])
    row("Benchmark duration (s):", res["duration_s"])
    row("Total input tokens:", res["total_input_tokens"])
    row("Total generated tokens:", res["total_output_tokens"])
    row("Request throughput (req/s):", res["request_throughput"])
    row("Output token throughput (tok/s):", res["output_throughput"])
    server = res.get("server_output_throughput")  # None: the server has no usable /metrics
    row("Server output throughput (tok/s):", "n/a" if server is None else server)
    row("Total Token throughput (tok/s):", res["total_token_throughput"])
    for key, title, name in (("ttft", "Time to First Token", "TTFT"),
                             ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                             ("itl", "Inter-token Latency", "ITL")):
        print("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        row(f"Mean {name} (ms):", res[f"mean_{key}_ms"])
        row(f"Median {name} (ms):", res[f"median_{key}_ms"])
        row(f"P90 {name} (ms):", res[f"p90_{key}_ms"])
        row(f"P99 {name} (ms):", res[f"p99_{key}_ms"])
    print("=" * 50)
    for err in res["errors"]:
        print(f"error: {err}", file=sys.stderr)
    if as_json:
        print(json.dumps(res))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_clients < 1 or (args.num_prompts > 0 and args.num_clients > args.num_prompts):
        most = f" and at most --num-prompts ({args.num_prompts})" if args.num_prompts > 0 else ""
        print(f"error: --num-clients must be at least 1{most}, got {args.num_clients}",
              file=sys.stderr)
        return 2
    try:
        import httpx  # noqa: F401
    except ImportError:
        print("error: bench serve needs httpx (pip install httpx)", file=sys.stderr)
        return 2
    res = asyncio.run(run(args))
    print_report(res, args.json)
    return 0 if res["failed"] == 0 else 1
