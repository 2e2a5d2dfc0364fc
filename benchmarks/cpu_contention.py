"""CPU decode speed alone and beside rival engine processes, per thread configuration.

Batch-1 greedy decode (temperature 0, ignore_eos, a fixed prompt) on the default model, timed
from the first generated token to the last. Each configuration runs in a fresh process (the
OpenMP settings are read when torch loads), measured once on an otherwise idle machine and
once beside N rival processes that decode continuously (each warmed up and generating before
the measurement starts, killed after). Configurations alternate within each round; the
table gives the median over rounds and the spread (min-max).

    python benchmarks/cpu_contention.py [--config default today ...] [--rivals same|CONFIG]
        [--num-rivals 2] [--rounds 3] [--tokens 128] [--max-other 0.05] [--json]

`--num-rivals 0` measures idle speed only; `--config NAME=K=V,K=V` adds an ad-hoc
configuration (environment variables).

The "other CPU" column is the CPU time used by processes outside the benchmark during the
measurements, as a share of one core (from /proc/stat): a value above a few percent means
someone else's load overlapped and the round should be discarded (`--max-other` does so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from novainfer.threads import busy_seconds

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
READY_TIMEOUT_S = 600.0

# Environment of each configuration, applied before the worker imports torch. "default": the
# thread count follows the cores other processes leave free (novainfer/threads.py); "today":
# the behaviour before that (torch's thread count, libgomp's ~3 ms of spinning).
CONFIGS: dict[str, dict[str, str]] = {
    "default": {},
    "today": {"NOVAINFER_CPU_THREADS": "off"},
    "passive": {"NOVAINFER_CPU_THREADS": "off", "OMP_WAIT_POLICY": "passive"},
    "spin-10k": {"NOVAINFER_CPU_THREADS": "off", "GOMP_SPINCOUNT": "10000"},
    "1-thread": {"NOVAINFER_CPU_THREADS": "1"},
}
CLEARED = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "NOVAINFER_CPU_THREADS")


def config_env(spec: str) -> dict[str, str]:
    """A named configuration, or NAME=K=V,K=V for an ad-hoc one."""
    if spec in CONFIGS:
        return CONFIGS[spec]
    _, sep, pairs = spec.partition("=")
    if not sep:
        raise SystemExit(f"unknown config {spec!r}: one of {list(CONFIGS)} or NAME=K=V,K=V")
    return dict(p.split("=", 1) for p in pairs.split(",") if p)


def config_name(spec: str) -> str:
    return spec.partition("=")[0]


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "kernel": platform.release(), "python": platform.python_version()}


# ---- workers (run in subprocesses) ----------------------------------------------------------


def _load():
    from novainfer import LLM, SamplingParams

    llm = LLM()
    return llm, SamplingParams


def _decode(llm, sampling_params, tokens: int, tag: str) -> dict:
    """One batch-1 greedy request; decode tok/s from the first token to the last."""
    engine = llm.llm_engine
    engine.add_request(tag, PROMPT, sampling_params(temperature=0.0, ignore_eos=True,
                                                    max_tokens=tokens))
    engine.step()  # the prompt fits one step: it ends with the first token
    first, cpu_first = time.perf_counter(), time.process_time()
    while engine.has_unfinished_requests():
        engine.step()
    wall = time.perf_counter() - first
    cpu = time.process_time() - cpu_first
    return {"tok_s": (tokens - 1) / wall, "cpu_per_wall": cpu / wall}


def worker_measure(tokens: int) -> None:
    llm, sp = _load()
    _decode(llm, sp, 16, "warm-0")
    _decode(llm, sp, tokens, "warm-1")
    print("ready", flush=True)
    for n, line in enumerate(sys.stdin):
        if line.strip() != "run":
            break
        print(json.dumps(_decode(llm, sp, tokens, f"run-{n}")), flush=True)


def worker_rival(tokens: int) -> None:
    parent = os.getppid()
    llm, sp = _load()
    _decode(llm, sp, 16, "warm")
    for n in range(1 << 62):
        _decode(llm, sp, tokens, f"rival-{n}")
        if n == 0:
            print("ready", flush=True)
        if os.getppid() != parent:  # the driver is gone
            return


# ---- driver ---------------------------------------------------------------------------------


def _spawn(role: str, env_over: dict[str, str], tokens: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(env_over)
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", role, "--tokens", str(tokens)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
    )


def _read_line(proc: subprocess.Popen, timeout: float = READY_TIMEOUT_S) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        raise RuntimeError(f"worker {proc.args[3]} (pid {proc.pid}) gave no answer "
                           f"(exit code {proc.poll()})")
    return line.strip()


def _tree_jiffies(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def _measure(proc: subprocess.Popen, others: list[subprocess.Popen]) -> dict:
    """One decode run; also the CPU that processes outside the benchmark used meanwhile."""
    pids = [os.getpid(), proc.pid, *(p.pid for p in others)]
    cpus = set(range(os.cpu_count() or 1))
    busy0, ours0, t0 = busy_seconds(cpus), _tree_jiffies(pids), time.perf_counter()
    proc.stdin.write("run\n")
    result = json.loads(_read_line(proc))
    busy1, ours1, t1 = busy_seconds(cpus), _tree_jiffies(pids), time.perf_counter()
    ours = (ours1 - ours0) / os.sysconf("SC_CLK_TCK")
    # What the thread control sees too (novainfer/threads.py): steal time counts as others'.
    result["other_cpu"] = max(0.0, (busy1 - busy0) - ours) / (t1 - t0)
    return result


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()
        for pipe in (p.stdin, p.stdout, p.stderr):
            if pipe is not None:
                pipe.close()


def run_round(spec: str, rival_spec: str, num_rivals: int, tokens: int) -> dict:
    env = config_env(spec)
    rival_env = env if rival_spec == "same" else config_env(rival_spec)
    proc = _spawn("measure", env, tokens)
    rivals: list[subprocess.Popen] = []
    try:
        if _read_line(proc) != "ready":
            raise RuntimeError("measure worker did not start")
        idle = _measure(proc, [])
        if num_rivals == 0:
            return {"idle": idle, "contended": None}
        rivals = [_spawn("rival", rival_env, tokens) for _ in range(num_rivals)]
        for r in rivals:
            if _read_line(r) != "ready":
                raise RuntimeError("rival worker did not start")
        contended = _measure(proc, rivals)
    finally:
        _stop(rivals)
        proc.stdin.close()
        _stop([proc])
    return {"idle": idle, "contended": contended}


def _summary(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", nargs="+", default=["default", "today"],
                        help=f"configurations to compare: {list(CONFIGS)} or NAME=K=V,K=V")
    parser.add_argument("--rivals", default="same",
                        help="the rivals' configuration: 'same' as the measured one, or a name")
    parser.add_argument("--num-rivals", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--max-other", type=float, default=None,
                        help="drop rounds where other processes used more than this many cores")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=["measure", "rival"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "measure":
        return worker_measure(args.tokens)
    if args.worker == "rival":
        return worker_rival(args.tokens)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the workers are stopped too
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
          f"kernel {info['kernel']}; {args.num_rivals} rivals ({args.rivals}), "
          f"{args.tokens} tokens, {args.rounds} rounds", flush=True)
    results: dict[str, list[dict]] = {config_name(c): [] for c in args.config}
    for r in range(args.rounds):
        order = args.config if r % 2 == 0 else args.config[::-1]
        for spec in order:
            res = run_round(spec, args.rivals, args.num_rivals, args.tokens)
            runs = [(k, v) for k, v in res.items() if v is not None]
            print(f"  round {r + 1} {config_name(spec):>12}: " + ", ".join(
                f"{k} {v['tok_s']:6.1f} tok/s (cpu/wall {v['cpu_per_wall']:.2f}, "
                f"other {v['other_cpu']:.2f})" for k, v in runs), flush=True)
            other = max(v["other_cpu"] for _, v in runs)
            if args.max_other is not None and other > args.max_other:
                print(f"    dropped: other processes used {other:.2f} cores", flush=True)
                continue
            results[config_name(spec)].append(res)

    print(f"\n| config | idle tok/s | contended tok/s ({args.num_rivals} rivals, {args.rivals}) "
          "| slowdown | rounds |")
    print("|---|---|---|---|---|")
    rows = []
    for spec in args.config:
        runs = results[config_name(spec)]
        idle = [x["idle"]["tok_s"] for x in runs]
        cont = [x["contended"]["tok_s"] for x in runs if x["contended"] is not None]
        slow = [a / b for a, b in zip(idle, cont)]
        print(f"| {config_name(spec)} | {_summary(idle)} | {_summary(cont)} | "
              f"{f'{statistics.median(slow):.2f}x' if slow else '-'} | {len(runs)} |")
        rows.append({"config": config_name(spec), "env": config_env(spec), "idle_tok_s": idle,
                     "contended_tok_s": cont, "slowdown": slow, "rounds": runs})
    if args.json:
        print(json.dumps({"machine": info, "rivals": args.rivals, "num_rivals": args.num_rivals,
                          "tokens": args.tokens, "results": rows}))


if __name__ == "__main__":
    main()
