"""`novainfer bench --strict`: seed 003's discipline, checked on every timed round.

A timed round fails the check when, between its start and its end,
- anything compiles: a torch.compile frame (dynamo's compile-start callbacks, or its
  `frames` counter where those are missing) or a Triton kernel (triton's
  `knobs.runtime.jit_cache_hook`, which Triton calls on every miss of a kernel's in-memory
  cache, before compiling or loading it from the disk cache);
- the CUDA caching allocator takes new memory from the device: a new segment
  (`segment.all.allocated` of `torch.cuda.memory_stats()`, the count of cudaMalloc calls
  that went through) or an allocation retry (`num_alloc_retries`: it freed its cache and
  tried again). Tensors served from the allocator's cache are not counted: they cost no
  device call, and the step's activations are such tensors from the second step on;
- the generated tokens differ from the expected total (the sum of max_tokens: the bench
  sets ignore_eos).
The checks read counters only outside the clock; the Triton hook runs only on a cache miss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

SMALL_BLOCK = 1 << 20  # the caching allocator's small pool: tensors up to 1 MiB, 2 MiB segments
SMALL_RESERVE_MIB = 16


def reserve_small_pool(device: torch.device, mib: int = SMALL_RESERVE_MIB,
                       empty: Callable[..., torch.Tensor] = torch.empty) -> None:
    """Leave `mib` MiB of the allocator's small pool cached and free on `device`.

    The bench's warm-up reaches the largest step shapes, so the large pool holds what any
    timed step needs; the small tensors, though, are many, and with asynchronous steps the
    most alive at once is reached only somewhere inside a long run (measured on one H200: a
    single 2 MiB small-pool segment taken in the timed round, by the sampler of qwen3-0.6b
    with --top-p and of llama3-8b). Taking 1 MiB blocks all at once and freeing them leaves
    at least `mib` MiB of small-pool segments cached (new ones only where the cached space
    falls short): the headroom a timed round may grow into without cudaMalloc.
    """
    blocks = [empty(SMALL_BLOCK, dtype=torch.uint8, device=device) for _ in range(mib)]
    del blocks


# Counters of torch.cuda.memory_stats() that mean "the allocator went to the device".
MEMORY_COUNTERS = {"segment.all.allocated": "new segment(s) (cudaMalloc)",
                   "num_alloc_retries": "allocation retries (cache flushed, cudaMalloc again)"}


class CompileWatch:
    """Records compilations while installed (a context manager): Triton JIT cache misses and
    torch.compile frames. `events` names each one."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self._frames_before = 0
        self._previous_hook = None
        self._dynamo_callback = None

    def __enter__(self):  # -> CompileWatch (typing.Self needs Python 3.11)
        self._install_triton_hook()
        self._install_dynamo_callback()
        return self

    def __exit__(self, *exc) -> None:
        self._remove_triton_hook()
        self._remove_dynamo_callback()

    # -- Triton
    def _install_triton_hook(self) -> None:
        try:
            import triton
        except ImportError:  # no triton: nothing JIT-compiles
            return
        knobs = getattr(triton, "knobs", None)  # triton >= 3.4; before, a JITFunction attribute
        self._hook_owner, self._hook_name = (
            (knobs.runtime, "jit_cache_hook") if knobs is not None
            else (triton.runtime.jit.JITFunction, "cache_hook"))
        self._previous_hook = previous = getattr(self._hook_owner, self._hook_name)

        def hook(*args, **kwargs):
            fn = kwargs.get("fn")
            name = getattr(fn, "name", None) or kwargs.get("repr", "a Triton kernel")
            self.events.append(f"Triton JIT compile of {name}")
            # Chain to a hook someone else installed; returning True would skip the compile.
            return previous(*args, **kwargs) if previous is not None else False

        setattr(self._hook_owner, self._hook_name, hook)

    def _remove_triton_hook(self) -> None:
        if hasattr(self, "_hook_owner"):
            setattr(self._hook_owner, self._hook_name, self._previous_hook)
            del self._hook_owner

    # -- torch.compile
    def _install_dynamo_callback(self) -> None:
        from torch._dynamo.utils import counters

        self._frames_before = counters["frames"]["total"]
        try:
            from torch._dynamo.callback import callback_handler
        except ImportError:
            return

        def on_start(*args, **kwargs):
            compile_id = getattr(args[0], "compile_id", "?") if args else "?"
            self.events.append(f"torch.compile frame {compile_id}")

        self._dynamo_callback = callback_handler.register_start_callback(on_start) or on_start

    def _remove_dynamo_callback(self) -> None:
        from torch._dynamo.utils import counters

        if self._dynamo_callback is not None:
            from torch._dynamo.callback import callback_handler

            callback_handler.remove_start_callback(self._dynamo_callback)
            self._dynamo_callback = None
        else:  # no callbacks in this torch: count dynamo's frames instead
            frames = counters["frames"]["total"] - self._frames_before
            self.events += ["torch.compile frame"] * frames


@dataclass
class Round:
    expected: int
    produced: int | None = None


@dataclass
class StrictCheck:
    """Checks each timed round (`with check.round(expected_tokens) as r: ...; r.produced = n`).
    `memory_stats`: a function returning torch.cuda.memory_stats()-like counters, or None
    (the CPU: nothing to check)."""

    memory_stats: Callable[[], dict] | None = None
    rounds: list[dict] = field(default_factory=list)

    @classmethod
    def for_device(cls, device: torch.device) -> StrictCheck:
        stats = (lambda: torch.cuda.memory_stats(device)) if device.type == "cuda" else None
        return cls(stats)

    @contextmanager
    def round(self, expected_tokens: int) -> Iterator[Round]:
        """Watches the body; the body sets `.produced` on what it gets."""
        timed = Round(expected_tokens)
        before = self.memory_stats() if self.memory_stats else {}
        with CompileWatch() as watch:
            yield timed
        after = self.memory_stats() if self.memory_stats else {}
        memory = {k: after.get(k, 0) - before.get(k, 0) for k in MEMORY_COUNTERS} \
            if self.memory_stats else {}
        self.rounds.append({"compiles": list(watch.events), "memory": memory,
                            "produced": timed.produced, "expected": timed.expected})

    def violations(self) -> list[str]:
        out = []
        for i, r in enumerate(self.rounds, 1):
            where = f"timed round {i} of {len(self.rounds)}"
            if r["compiles"]:
                names = sorted(set(r["compiles"]))
                out.append(f"{where}: {len(r['compiles'])} compile(s): " + "; ".join(names[:8])
                           + (f" and {len(names) - 8} more" if len(names) > 8 else ""))
            for key, what in MEMORY_COUNTERS.items():
                if r["memory"].get(key):
                    out.append(f"{where}: allocated device memory: {r['memory'][key]} {what}")
            if r["produced"] != r["expected"]:
                out.append(f"{where}: produced {r['produced']} output tokens, expected "
                           f"{r['expected']} (the sum of max_tokens, with ignore_eos)")
        return out

    def summary(self) -> dict:
        violations = self.violations()
        return {"ok": not violations, "violations": violations,
                "memory_checked": self.memory_stats is not None,
                "rounds": [{"compiles": len(r["compiles"]), **r["memory"],
                            "produced": r["produced"], "expected": r["expected"]}
                           for r in self.rounds]}
