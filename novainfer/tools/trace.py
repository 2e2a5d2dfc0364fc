"""`novainfer trace`: which modules run, how often, in which order, with which shapes.

Forward pre/post hooks go on every module of the model (and the attention backend's
`forward`, which is not a module) for one short generation; they only record, and are
removed afterwards. A module shared by several parents (the rotary table, shared by all
layers) is named after the parent that called it. CUDA graphs are off while tracing
(hooks do not run inside a graph replay).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def _shapes(value: Any) -> Any:
    """Shapes of the tensors in a value (tuples/lists kept); None for non-tensors."""
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if isinstance(value, (tuple, list)):
        inner = [_shapes(v) for v in value]
        inner = [v for v in inner if v is not None]
        return inner if inner else None
    return None


@dataclass
class Call:
    index: int  # order of entry (pre-hook) over the whole trace
    forward: int  # which model forward (0-based) it belongs to
    name: str  # qualified name ("model.layers.0.input_layernorm")
    type: str  # module class name
    depth: int
    inputs: Any = None
    outputs: Any = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TraceResult:
    num_layers: int
    calls: list[Call] = field(default_factory=list)
    num_forwards: int = 0

    def forward_calls(self, forward: int = 0) -> list[Call]:
        return [c for c in self.calls if c.forward == forward]

    def type_counts(self, forward: int | None = 0) -> Counter:
        calls = self.calls if forward is None else self.forward_calls(forward)
        return Counter(c.type for c in calls)

    def name_counts(self) -> Counter:
        return Counter(c.name for c in self.calls)

    def layer_calls(self, layer: int = 0, forward: int = 0) -> list[Call]:
        prefix = f"{_layers_prefix(self)}{layer}."
        root = prefix[:-1]
        return [c for c in self.forward_calls(forward) if c.name == root or c.name.startswith(prefix)]

    def to_json(self, top: int = 10) -> dict:
        return {
            "num_layers": self.num_layers,
            "num_forwards": self.num_forwards,
            "type_counts_first_forward": dict(self.type_counts(0)),
            "type_counts_total": dict(self.type_counts(None)),
            "top_modules": self.name_counts().most_common(top),
            "calls": [c.as_dict() for c in self.calls],
        }


def _layers_prefix(result: TraceResult) -> str:
    for c in result.calls:
        if ".layers." in c.name:
            return c.name[: c.name.index(".layers.") + len(".layers.")]
    return "model.layers."


class Tracer:
    """Context manager: hooks on entry, all removed on exit (even after an error)."""

    def __init__(self, model: nn.Module, backend: Any = None) -> None:
        self.model = model
        self.backend = backend
        self.result = TraceResult(num_layers=getattr(getattr(model, "config", None), "num_layers", 0))
        self._handles: list = []
        self._stack: list[Call] = []
        self._forward = -1
        self._aliases: dict[int, list[str]] = defaultdict(list)
        self._patched_backend = False
        self._open: dict[int, list[Call]] = {}

    def __enter__(self) -> Tracer:
        for name, module in self.model.named_modules(remove_duplicate=False):
            self._aliases[id(module)].append(name or type(module).__name__)
        seen: set[int] = set()
        for module in self.model.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post))
        if self.backend is not None and not isinstance(self.backend, nn.Module):
            original = self.backend.forward
            tracer = self

            def traced_forward(*args, **kwargs):
                call = tracer._enter(f"{type(tracer.backend).__name__}", None, args)
                out = original(*args, **kwargs)
                tracer._exit(call, out)
                return out

            self.backend.forward = traced_forward  # instance attribute shadows the method
            self._patched_backend = True
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._patched_backend:
            del self.backend.forward
            self._patched_backend = False
        self.result.num_forwards = self._forward + 1

    # hooks

    def _name(self, module: nn.Module) -> str:
        names = self._aliases.get(id(module), [type(module).__name__])
        if len(names) > 1 and self._stack:
            parent = self._stack[-1].name
            for n in names:
                if n.rsplit(".", 1)[0] == parent:
                    return n
        return names[0]

    def _enter(self, type_name: str, module: nn.Module | None, args: tuple) -> Call:
        if module is self.model:
            self._forward += 1
        if module is not None:
            name = self._name(module)
        else:
            name = (self._stack[-1].name + ".backend") if self._stack else "backend"
        call = Call(len(self.result.calls), max(self._forward, 0), name, type_name,
                    len(self._stack), _shapes(list(args)))
        self.result.calls.append(call)
        self._stack.append(call)
        return call

    def _exit(self, call: Call, output: Any) -> None:
        call.outputs = _shapes(output)
        while self._stack:
            if self._stack.pop() is call:
                break

    def _pre(self, module: nn.Module, args: tuple) -> None:
        self._open.setdefault(id(module), []).append(self._enter(type(module).__name__, module, args))

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        pending = self._open.get(id(module))
        if pending:
            self._exit(pending.pop(), output)


def trace_generation(llm, prompt, params=None) -> TraceResult:
    """Run one generation of `prompt` with every module hooked; return what was recorded."""
    from novainfer import SamplingParams

    runner = llm.llm_engine.runner
    params = params or SamplingParams(temperature=0.0, max_tokens=4)
    with Tracer(runner.model, runner.backend) as tracer:
        llm.generate([prompt], params, use_tqdm=False)
    return tracer.result


def _formula(calls: list[Call], layers: int) -> str:
    """'4L+1' style description of a per-forward count: calls per layer x L + calls outside."""
    if layers <= 0:
        return ""
    inside = sum(1 for c in calls if ".layers." in c.name)
    outside = len(calls) - inside
    if inside % layers:
        return ""
    per = inside // layers
    if per == 0:
        return str(outside)
    return f"{per if per > 1 else ''}L" + (f"+{outside}" if outside else "")


def _fmt_shape(s: Any) -> str:
    if s is None:
        return "-"
    if s and isinstance(s[0], list) and len(s) == 1:
        s = s[0]
    return str(tuple(s)) if s and not isinstance(s[0], list) else ", ".join(_fmt_shape(x) for x in s)


def format_report(result: TraceResult, layer: int = 0, detail: bool = False,
                  filters: list[str] | None = None, top: int = 10) -> str:
    def keep(type_name: str) -> bool:
        return not filters or any(f.lower() in type_name.lower() for f in filters)

    L = result.num_layers
    lines = [f"traced {result.num_forwards} forward passes of a {L}-layer model, "
             f"{len(result.calls)} module calls"]
    lines.append("")
    lines.append(f"module calls in one forward (the first; L = {L}):")
    counts = result.type_counts(0)
    order = {c.type: c.index for c in reversed(result.forward_calls(0))}
    for type_name, n in sorted(counts.items(), key=lambda kv: order[kv[0]]):
        if keep(type_name):
            typed = [c for c in result.forward_calls(0) if c.type == type_name]
            lines.append(f"  {type_name:<28} {n:>5}   {_formula(typed, L)}")
    totals = result.type_counts(None)
    lines.append("")
    lines.append(f"call order inside decoder layer {layer} (first forward), input -> output shapes:")
    for i, c in enumerate((c for c in result.layer_calls(layer) if keep(c.type)), 1):
        short = c.name.split(f".{layer}.", 1)[-1] if f".{layer}." in c.name else c.name
        lines.append(f"  {i:>2}. {'  ' * max(c.depth - 2, 0)}[{c.type}] {short}")
        lines.append(f"      {'  ' * max(c.depth - 2, 0)}in: {_fmt_shape(c.inputs)}  out: {_fmt_shape(c.outputs)}")
    lines.append("")
    lines.append(f"top {top} most-called modules over the whole generation:")
    names = [(n, k) for n, k in result.name_counts().items()]
    types = {c.name: c.type for c in result.calls}
    first = {}
    for c in result.calls:
        first.setdefault(c.name, c.index)
    names = [x for x in names if keep(types[x[0]])]
    names.sort(key=lambda x: (-x[1], first[x[0]]))
    for i, (name, n) in enumerate(names[:top], 1):
        lines.append(f"  {i:>2}. {types[name]}:{name}  {n} calls")
    if detail:
        lines.append("")
        lines.append("all modules by type (calls over the whole generation; first call's shapes):")
        by_type: dict[str, list[str]] = defaultdict(list)
        for name in sorted(first, key=first.get):
            by_type[types[name]].append(name)
        name_counts = result.name_counts()
        first_call = {}
        for c in result.calls:
            first_call.setdefault(c.name, c)
        for type_name, mod_names in by_type.items():
            if not keep(type_name):
                continue
            lines.append(f"  {type_name} ({totals[type_name]} calls, {len(mod_names)} modules)")
            for name in mod_names:
                c = first_call[name]
                lines.append(f"    {name}: {name_counts[name]} calls, in {_fmt_shape(c.inputs)} "
                             f"-> out {_fmt_shape(c.outputs)}")
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from novainfer.tools.common import model_args

    model_args(parser)
    parser.add_argument("--prompt", default="The capital of France is", help="prompt text")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens generated")
    parser.add_argument("--detail", action="store_true", help="qualified names grouped by type")
    parser.add_argument("--filter", default=None, help="comma-separated module types, e.g. RMSNorm,Attention (default: all)")
    parser.add_argument("--layer", type=int, default=0, help="decoder layer whose call order is shown")
    parser.add_argument("--top", type=int, default=10, help="most-called modules listed")
    parser.add_argument("--output", default=None, help="write the full trace as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    from novainfer import SamplingParams
    from novainfer.tools.common import load_llm, prompt_ids

    llm = load_llm(args, enforce_eager=True)
    L = llm.llm_engine.model_config.num_layers
    if not 0 <= args.layer < L:
        raise ValueError(f"--layer must be in [0, {L}), got {args.layer}")
    prompt = prompt_ids(llm, args.prompt)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    result = trace_generation(llm, prompt, params)
    filters = [f.strip() for f in args.filter.split(",") if f.strip()] if args.filter else None
    print(format_report(result, args.layer, args.detail, filters, args.top))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result.to_json(args.top), f, indent=1)
        print(f"\nwrote {args.output}", file=sys.stderr)
    return 0
