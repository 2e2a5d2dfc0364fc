"""`novainfer bench serve --base-url URL`: online serving benchmark against a running server.

N streaming requests (random token-id prompts of given lengths, or one given prompt), sent
all at once or at a Poisson rate; reports request throughput, output tok/s and TTFT, TPOT
and ITL mean/median/p90/p99 in the layout vLLM's `benchmark_serving` prints. Needs httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field


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
                   help="requests in flight at once (default: no limit)")
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


async def run(args: argparse.Namespace) -> dict:
    import httpx

    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.base_url.rstrip("/")
    limits = httpx.Limits(max_connections=max(args.num_prompts, 1) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30), limits=limits) as client:
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
        sem = asyncio.Semaphore(args.max_concurrency or len(bodies) or 1)

        async def limited(body: dict) -> Result:
            async with sem:
                return await _one(client, url, body, headers, chat)

        start = time.perf_counter()
        tasks = []
        for body in bodies:
            tasks.append(asyncio.create_task(limited(body)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
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
    try:
        import httpx  # noqa: F401
    except ImportError:
        print("error: bench serve needs httpx (pip install httpx)", file=sys.stderr)
        return 2
    res = asyncio.run(run(args))
    print_report(res, args.json)
    return 0 if res["failed"] == 0 else 1
