"""Prometheus text exposition (format 0.0.4), written by hand: counters, gauges, histograms.

Updated and rendered on the frontend's event loop (one thread: no lock needed).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels.items()
    )
    return "{" + inner + "}"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def state(self) -> tuple[list[int], float, int]:
        return list(self.counts), self.sum, self.count

    def plus(self, states: list[tuple[list[int], float, int]]) -> Histogram:
        """This histogram with other processes' (same buckets) added."""
        total = Histogram(self.buckets)
        total.counts, total.sum, total.count = list(self.counts), self.sum, self.count
        for counts, sum_, count in states:
            total.counts = [a + b for a, b in zip(total.counts, counts)]
            total.sum += sum_
            total.count += count
        return total


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.requests: dict[str, int] = {}  # outcome -> count
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(TTFT_BUCKETS)
        # Gauges, and the token counters, come from the engine core's latest snapshot: the
        # same numbers whichever frontend process (--api-server-count) renders them.
        self.gauges: Callable[[], dict[str, float]] = dict
        # The other frontends' latest state() (relayed by the core), added when rendering so
        # that every frontend reports the whole server's requests and latencies.
        self.others: Callable[[], list[dict]] = list

    def state(self) -> dict:
        return {"requests": dict(self.requests), "ttft": self.ttft.state(),
                "itl": self.itl.state(), "e2e": self.e2e.state()}

    def count_request(self, outcome: str) -> None:
        self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def observe(self, ttft: list[float], itl: list[float], e2e: list[float]) -> None:
        for v in ttft:
            self.ttft.observe(v)
        for v in itl:
            self.itl.observe(v)
        for v in e2e:
            self.e2e.observe(v)

    def render(self) -> str:
        base = {"model_name": self.model_name}
        out: list[str] = []

        def metric(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        def sample(name: str, value: float, labels: dict[str, str] | None = None) -> None:
            out.append(f"{name}{_labels({**base, **(labels or {})})} {_fmt(value)}")

        def histogram(name: str, help_: str, h: Histogram) -> None:
            metric(name, "histogram", help_)
            cumulative = 0
            for bound, c in zip(h.buckets, h.counts):
                cumulative += c
                sample(f"{name}_bucket", cumulative, {"le": _fmt(bound)})
            sample(f"{name}_bucket", h.count, {"le": "+Inf"})
            sample(f"{name}_sum", h.sum)
            sample(f"{name}_count", h.count)

        g = self.gauges()
        others = self.others()
        requests = dict(self.requests)
        for other in others:
            for outcome, n in other["requests"].items():
                requests[outcome] = requests.get(outcome, 0) + n
        ttft = self.ttft.plus([o["ttft"] for o in others])
        itl = self.itl.plus([o["itl"] for o in others])
        e2e = self.e2e.plus([o["e2e"] for o in others])
        metric("novainfer_requests_total", "counter",
               "Requests by outcome (stop, length, abort, error, rejected_<status>).")
        for outcome in sorted(set(requests) | {"stop", "length", "abort"}):
            sample("novainfer_requests_total", requests.get(outcome, 0),
                   {"outcome": outcome})
        metric("novainfer_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.")
        sample("novainfer_prompt_tokens_total", g.get("prompt_tokens_total", 0))
        metric("novainfer_generation_tokens_total", "counter", "Generated tokens.")
        sample("novainfer_generation_tokens_total", g.get("generation_tokens_total", 0))
        histogram("novainfer_time_to_first_token_seconds",
                  "Time from arrival to the first generated token.", ttft)
        histogram("novainfer_inter_token_latency_seconds",
                  "Time between consecutive tokens of one sequence.", itl)
        histogram("novainfer_e2e_request_latency_seconds",
                  "Time from arrival to the end of a request.", e2e)
        gauges = [
            ("novainfer_num_requests_running", "Requests with sequences in the running batch."),
            ("novainfer_num_requests_waiting", "Requests waiting to be scheduled."),
            ("novainfer_kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1)."),
            ("novainfer_kv_free_blocks", "Free KV cache blocks."),
            ("novainfer_kv_total_blocks", "Total KV cache blocks."),
            ("novainfer_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache."),
            ("novainfer_prefix_cache_hits_total", "Prompt tokens found in the prefix cache."),
            ("novainfer_prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries."),
        ]
        for name, help_ in gauges:
            kind = "counter" if name.endswith("_total") else "gauge"
            metric(name, kind, help_)
            sample(name, float(g.get(name.removeprefix("novainfer_"), 0.0)))
        return "\n".join(out) + "\n"
