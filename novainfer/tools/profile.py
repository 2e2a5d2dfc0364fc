"""`novainfer profile`: torch.profiler over prefill and decode steps, grouped by category.

While profiling, every module call and the attention backend / KV-cache write are wrapped
in profiler ranges (`novainfer.cat::<category>`) and the engine phases in
`novainfer::<phase>` ranges, so each op (CPU) or kernel (CUDA, through the op or range that
launched it) is attributed to the innermost category range around it; kernels that no
range covers (CUDA graph replays) fall back to rules on their names. On the CPU the table
holds CPU ops' self time; on CUDA, device kernel time (memcpy/memset included).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CATEGORIES = ("attention", "GEMM", "norm", "rotary", "activation", "sampling",
              "KV-cache write", "communication", "memcpy/memset", "other")

# Which project source launches each category (backend-specific entries chosen at run time).
SOURCES = {
    "GEMM": "novainfer/layers/linear.py (Linear, QKVLinear, MergedLinear, RowParallelLinear); "
            "layers/embedding.py (LMHead)",
    "communication": "novainfer/distributed/parallel.py (all_reduce, gather_last_dim: "
                     "tensor parallelism)",
    "norm": "novainfer/layers/norm.py (rms_norm, add_rms_norm)",
    "rotary": "novainfer/layers/rotary.py (apply_rope)",
    "activation": "novainfer/layers/activation.py (silu_and_mul)",
    "sampling": "novainfer/engine/sampler.py (sample), kernels/sampling.py on CUDA",
    "memcpy/memset": "novainfer/engine/model_runner.py (prepare/_upload), layers/*",
    "other": "novainfer/layers/embedding.py, models/decoder.py (views, residual glue)",
}
BACKEND_SOURCES = {
    "torch": ("novainfer/layers/attention/torch_ref.py (forward)",
              "novainfer/layers/attention/torch_ref.py (write_kv)"),
    "cpu": ("novainfer/kernels/cpu_decode_attention.c (layers/attention/cpu_backend.py), "
            + "prefills: layers/attention/torch_ref.py",
            "novainfer/kernels/cpu_elementwise.c (store_kv_f32)"),
    "flash_attn": ("flash_attn (layers/attention/flash_attn_backend.py)",
                   "novainfer/kernels/kv_cache.py (store_kv)"),
    "triton": ("novainfer/kernels/decode_attention.py, kernels/prefill_attention.py "
               "(layers/attention/triton_backend.py)",
               "novainfer/kernels/kv_cache.py (store_kv)"),
}

# Name rules, first match wins; used where no category range covers an op / kernel.
NAME_RULES: list[tuple[str, re.Pattern]] = [
    ("communication", re.compile(r"nccl|all_?reduce|all_?gather|c10d::|gloo", re.I)),
    ("memcpy/memset", re.compile(r"memcpy|memset|^aten::(copy_|fill_|zero_|zeros|to|_to_copy)$", re.I)),
    ("KV-cache write", re.compile(r"store_kv|reshape_and_cache|index_copy", re.I)),
    ("attention", re.compile(r"attention|attn|sdpa|scaled_dot_product|flash|fmha|_decode_split|"
                             r"_decode_reduce|_prefill_kernel", re.I)),
    ("GEMM", re.compile(r"gemm|matmul|^aten::(mm|addmm|bmm|linear)$|cutlass|cublas|nvjet|xmma|"
                        r"mkldnn|_linear_pointwise|sm\d\d_", re.I)),
    ("norm", re.compile(r"rms|norm|rsqrt", re.I)),
    ("rotary", re.compile(r"rope|rotary|fused_.*cat.*neg", re.I)),
    ("activation", re.compile(r"silu|gelu|act_and_mul", re.I)),
    ("sampling", re.compile(r"sort|softmax|argmax|topk|multinomial|exponential|cumsum|"
                            r"searchsorted|chunk_stats|pick_token", re.I)),
]
CAT_PREFIX = "novainfer.cat::"
PHASE_PREFIX = "novainfer::"


def classify_name(name: str) -> str:
    for category, pattern in NAME_RULES:
        if pattern.search(name):
            return category
    return "other"


class CategoryRanges:
    """Profiler ranges around modules, the attention backend and the KV-cache write."""

    MODULE_CATEGORIES = {
        "RMSNorm": "norm", "RotaryEmbedding": "rotary", "Linear": "GEMM", "QKVLinear": "GEMM",
        "MergedLinear": "GEMM", "RowParallelLinear": "GEMM", "LMHead": "GEMM",
        "MLP": "activation", "Embedding": "other",
    }

    def __init__(self, model: torch.nn.Module, backend: Any) -> None:
        self.model, self.backend = model, backend
        self._handles: list = []
        self._open: dict[int, list] = defaultdict(list)
        self._patches: list[tuple[Any, str, Any, bool]] = []

    def _wrap(self, owner: Any, attr: str, category: str) -> None:
        original = getattr(owner, attr)
        had_own = attr in vars(owner) if not isinstance(owner, type) else True

        def wrapped(*args, **kwargs):
            with torch.profiler.record_function(CAT_PREFIX + category):
                return original(*args, **kwargs)

        setattr(owner, attr, wrapped)
        self._patches.append((owner, attr, original, had_own))

    def __enter__(self) -> CategoryRanges:
        for module in self.model.modules():
            category = self.MODULE_CATEGORIES.get(type(module).__name__)
            if category is None:
                continue

            def pre(mod, args, category=category):
                rf = torch.profiler.record_function(CAT_PREFIX + category)
                rf.__enter__()
                self._open[id(mod)].append(rf)

            def post(mod, args, out):
                if self._open[id(mod)]:
                    self._open[id(mod)].pop().__exit__(None, None, None)

            self._handles.append(module.register_forward_pre_hook(pre))
            self._handles.append(module.register_forward_hook(post))
        if self.backend is not None:
            self._wrap(self.backend, "forward", "attention")
            if hasattr(self.backend, "write"):  # the torch and cpu backends' KV-cache write
                self._wrap(self.backend, "write", "KV-cache write")
        try:
            import novainfer.layers.attention.triton_backend as triton_backend

            self._wrap(triton_backend, "store_kv", "KV-cache write")
        except Exception:  # noqa: BLE001  (triton missing: nothing to wrap)
            pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for owner, attr, original, had_own in reversed(self._patches):
            if had_own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)
        self._patches.clear()


@dataclass
class Record:
    name: str
    us: float
    category: str


def _category_of(event: Any) -> str | None:
    """Innermost category range around an event (itself included), or the phase it ran in."""
    e = event
    phase = None
    while e is not None:
        if e.name.startswith(CAT_PREFIX):
            return e.name[len(CAT_PREFIX):]
        if phase is None and e.name.startswith(PHASE_PREFIX):
            phase = e.name[len(PHASE_PREFIX):]
        e = e.cpu_parent
    if phase == "sample":
        return "sampling"
    return None


def _is_range(name: str) -> bool:
    return name.startswith(CAT_PREFIX) or name.startswith(PHASE_PREFIX)


def collect_records(events: Any, cuda: bool) -> list[Record]:
    """CPU: every op's self CPU time. CUDA: every device kernel / memcpy / memset."""
    from torch.autograd import DeviceType

    records: list[Record] = []
    if not cuda:
        for e in events:
            if e.device_type != DeviceType.CPU or e.is_async or _is_range(e.name):
                continue
            if e.name.startswith("ProfilerStep") or e.name.startswith("## "):
                continue
            name_cat = classify_name(e.name)
            cat = "memcpy/memset" if name_cat == "memcpy/memset" and _category_of(e) is None else (
                _category_of(e) or name_cat)
            records.append(Record(e.name, float(e.self_cpu_time_total), cat))
        return records
    import bisect

    cpu_by_id = {e.id: e for e in events if e.device_type == DeviceType.CPU}
    # GPU-side user ranges (the profiler mirrors record_function ranges onto the device
    # timeline): a kernel belongs to the innermost category range that contains it in time.
    ranges = []
    for e in events:
        if e.device_type != DeviceType.CPU and _is_range(e.name):
            if e.name.startswith(CAT_PREFIX):
                ranges.append((e.time_range.start, e.time_range.end, e.name[len(CAT_PREFIX):]))
            elif e.name == PHASE_PREFIX + "sample":
                ranges.append((e.time_range.start, e.time_range.end, "sampling"))
    ranges.sort()
    starts = [r[0] for r in ranges]

    def by_time(start: float, end: float) -> str | None:
        i = bisect.bisect_right(starts, start) - 1
        for j in range(i, max(i - 256, -1), -1):  # nested ranges start later: first hit is innermost
            lo, hi, cat = ranges[j]
            if lo <= start and end <= hi:
                return cat
        return None

    for e in events:
        if e.device_type == DeviceType.CPU or _is_range(e.name) or getattr(e, "is_user_annotation", False):
            continue
        if e.name.startswith("ProfilerStep"):
            continue
        us = float(e.time_range.end - e.time_range.start)
        name_cat = classify_name(e.name)
        if name_cat == "memcpy/memset":
            records.append(Record(e.name, us, name_cat))
            continue
        cat = by_time(e.time_range.start, e.time_range.end)
        if cat is None:
            parent = cpu_by_id.get(getattr(e, "linked_correlation_id", 0) or -1)
            cat = _category_of(parent) if parent is not None else None
        records.append(Record(e.name, us, cat or name_cat))
    return records


def summarize(records: list[Record], top: int = 30) -> dict:
    by_name: dict[str, list] = defaultdict(lambda: [0.0, 0, defaultdict(float)])
    for r in records:
        row = by_name[r.name]
        row[0] += r.us
        row[1] += 1
        row[2][r.category] += r.us
    kernels = sorted(
        ({"name": n, "total_ms": v[0] / 1e3, "calls": v[1], "avg_ms": v[0] / 1e3 / v[1],
          "category": max(v[2], key=v[2].get)} for n, v in by_name.items()),
        key=lambda k: -k["total_ms"],
    )
    cats = {c: {"total_ms": 0.0, "calls": 0} for c in CATEGORIES}
    for r in records:
        cats[r.category]["total_ms"] += r.us / 1e3
        cats[r.category]["calls"] += 1
    total = sum(r.us for r in records) / 1e3
    for c in cats.values():
        c["share"] = c["total_ms"] / total if total else 0.0
    return {"total_ms": total, "top": kernels[:top], "num_distinct": len(kernels), "categories": cats}


def format_tables(summary: dict, sources: dict[str, str], what: str, top: int = 30) -> str:
    lines = [f"top {top} {what} by total time", "-" * 100]
    for i, k in enumerate(summary["top"], 1):
        name = k["name"] if len(k["name"]) <= 70 else k["name"][:67] + "..."
        lines.append(f"{i:>3}. {name}")
        lines.append(f"     total {k['total_ms']:>10.3f} ms | calls {k['calls']:>6} | "
                     f"avg {k['avg_ms']:>9.4f} ms | {k['category']}")
    lines += ["", f"time by category ({what})", "-" * 100,
              f"{'category':<15} {'total ms':>11} {'share':>7} {'calls':>7}  launched from"]
    for c, v in summary["categories"].items():
        lines.append(f"{c:<15} {v['total_ms']:>11.3f} {100 * v['share']:>6.1f}% {v['calls']:>7}  "
                     f"{sources.get(c, '')}")
    lines.append(f"{'total':<15} {summary['total_ms']:>11.3f} {100.0:>6.1f}% "
                 f"{sum(v['calls'] for v in summary['categories'].values()):>7}")
    return "\n".join(lines)


def draw_chart(summary: dict, path: Path, title: str) -> str | None:
    """PNG bar chart of time per category; returns a message instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipped the PNG chart (pip install matplotlib)"
    cats = [c for c in CATEGORIES]
    vals = [summary["categories"][c]["total_ms"] for c in cats]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bars = ax.barh(cats[::-1], vals[::-1], color="#4477aa")
    for bar, v in zip(bars, vals[::-1]):
        share = v / summary["total_ms"] * 100 if summary["total_ms"] else 0
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.2f} ms ({share:.1f}%)",
                va="center", fontsize=8)
    ax.set_xlabel("time (ms)")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max(vals + [1e-6]) * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def profile_engine(llm, num_seqs: int, prompt_len: int, steps: int, nvtx: bool = False,
                   warmup: bool = True) -> tuple[Any, dict]:
    """Profile `steps` engine steps of `num_seqs` fresh requests (prefill, then decode)."""
    from torch.profiler import ProfilerActivity, profile

    from novainfer import SamplingParams

    engine = llm.llm_engine
    runner = engine.runner
    cuda = runner.device.type == "cuda"
    vocab = engine.vocab_size
    max_tokens = max(1, min(steps + 8, engine.max_model_len - prompt_len))
    if warmup:
        llm.generate([[(5 + i) % vocab for i in range(min(prompt_len, 32))]],
                     SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    for i in range(num_seqs):
        ids = [(7 + 13 * i + 31 * j) % vocab for j in range(prompt_len)]
        engine.add_request(f"profile-{i}", ids, SamplingParams(temperature=0.6, ignore_eos=True,
                                                               max_tokens=max_tokens, seed=i))
    previous = engine.step_timer
    engine.enable_step_timing(record=True, nvtx=nvtx, profiler_ranges=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    kinds = {"prefill/mixed": 0, "decode": 0}
    start = time.perf_counter()
    try:
        with CategoryRanges(runner.model, runner.backend), profile(activities=activities) as prof:
            for _ in range(steps):
                if not engine.has_unfinished_requests():
                    break
                engine.step()
            if cuda:
                torch.cuda.synchronize(runner.device)
        timer = engine.step_timer
    finally:
        engine.step_timer = runner.step_timer = previous
        for i in range(num_seqs):
            engine.abort_request(f"profile-{i}")
    wall = time.perf_counter() - start
    for s in timer.steps:
        kinds["decode" if s.decode_only else "prefill/mixed"] += 1
    info = {"steps": len(timer.steps), "step_kinds": kinds, "wall_s": wall, "cuda": cuda,
            "backend": runner.backend.name, "step_timing": timer.summary()}
    return prof, info


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from novainfer.tools.common import model_args

    model_args(parser)
    parser.add_argument("--steps", type=int, default=12, help="engine steps profiled (prefill first)")
    parser.add_argument("--num-seqs", type=int, default=4, help="requests in the batch")
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    parser.add_argument("--output-dir", default="profile_out",
                        help="report, Chrome trace and chart go here")
    parser.add_argument("--top", type=int, default=30, help="kernels listed")
    parser.add_argument("--nvtx", action="store_true",
                        help="NVTX ranges around engine steps and phases (for nsys; no-op on CPU)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="profile with CUDA graphs on (kernels then categorised by name only)")
    return parser


def run(args: argparse.Namespace) -> int:
    from novainfer.engine.step_timer import format_summary
    from novainfer.tools.common import load_llm

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    llm = load_llm(args, enforce_eager=not args.cuda_graphs)
    prof, info = profile_engine(llm, args.num_seqs, args.prompt_len, args.steps, nvtx=args.nvtx)
    records = collect_records(prof.events(), info["cuda"])
    summary = summarize(records, args.top)
    backend_attn, backend_kv = BACKEND_SOURCES.get(info["backend"], ("?", "?"))
    sources = dict(SOURCES, attention=backend_attn, **{"KV-cache write": backend_kv})
    what = "CUDA kernels (device time)" if info["cuda"] else "CPU ops (self CPU time)"
    device = torch.cuda.get_device_name(0) if info["cuda"] else "cpu"
    header = (f"novainfer profile: {args.model or args.preset or 'default model'} on {device}, "
              f"backend {info['backend']}, {info['steps']} steps "
              f"({info['step_kinds']['prefill/mixed']} prefill/mixed, {info['step_kinds']['decode']} decode), "
              f"{args.num_seqs} seqs x {args.prompt_len} prompt tokens, {info['wall_s']:.2f} s wall "
              f"(profiled)")
    tables = format_tables(summary, sources, what, args.top)
    print(header)
    print()
    print(tables)
    report = out / "profiler_report.txt"
    trace = out / "trace.json"
    chart = out / "categories.png"
    sort_key = "self_cuda_time_total" if info["cuda"] else "self_cpu_time_total"
    with open(report, "w") as f:
        f.write(header + "\n\n" + tables + "\n\n")
        f.write("engine phases while profiling (profiler overhead included)\n")
        f.write(format_summary(info["step_timing"]) + "\n\n")
        f.write("torch.profiler key averages\n")
        try:
            f.write(prof.key_averages().table(sort_by=sort_key, row_limit=200))
        except Exception:  # noqa: BLE001  (older column names)
            f.write(prof.key_averages().table(row_limit=200))
        f.write("\n")
    prof.export_chrome_trace(str(trace))
    note = draw_chart(summary, chart, f"{what}: {args.model or args.preset or 'default'}, {device}")
    print()
    print(f"wrote {report}, {trace} (open in chrome://tracing or ui.perfetto.dev)"
          + ("" if note else f", {chart}"))
    if note:
        print(note, file=sys.stderr)
    return 0
