"""The QKV + LoRA timing report (NOVAINFER_ENABLE_LORA_TIMING=1, seed 000's layout).

On every step that uses an adapter, each QKV projection runs both paths on the same input:
traditional (QKV matmul, LoRA shrink, LoRA expand) and fused (one matmul by [W_qkv; A of
every slot], LoRA expand reading each token's slice in place), and keeps the result of the
path the fusion switch selects. Every stage is measured (CUDA events on a GPU, the clock on
the CPU), none estimated. The report comes at exit (rank 0), or from `report()`.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

import torch

STAGES = ("qkv", "shrink", "expand", "fused", "fused_expand")
FOLD_EVERY = 1024  # pending CUDA event pairs before they are read (one sync)


class LoRATiming:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.ms = dict.fromkeys(STAGES, 0.0)
        self.calls = 0
        self.tokens = 0
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def stage(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((name, start, end))
            if len(self._pending) >= FOLD_EVERY:
                self._fold()
        else:
            t = time.perf_counter()
            yield
            self.ms[name] += 1e3 * (time.perf_counter() - t)

    def _fold(self) -> None:
        if self._pending:
            self._pending[-1][2].synchronize()
            for name, start, end in self._pending:
                self.ms[name] += start.elapsed_time(end)
            self._pending.clear()

    def totals(self) -> dict[str, float]:
        """Milliseconds per stage so far, and the two paths' totals."""
        self._fold()
        ms = dict(self.ms)
        ms["traditional"] = ms["qkv"] + ms["shrink"] + ms["expand"]
        ms["fused_total"] = ms["fused"] + ms["fused_expand"]
        return ms

    def report(self, file=None) -> str:
        t = self.totals()
        trad, fused = t["traditional"], t["fused_total"]
        compute_before, compute_after = t["qkv"] + t["shrink"], t["fused"]
        saved = trad - fused
        lines = [
            (f"QKV + LoRA timing: traditional vs fused path ({self.calls} QKV calls, "
            f"{self.tokens} tokens)"),
            "Traditional (QKV matmul + LoRA shrink + LoRA expand):",
            f"   QKV matmul:    {t['qkv']:.3f} ms",
            f"   LoRA shrink:   {t['shrink']:.3f} ms",
            f"   LoRA expand:   {t['expand']:.3f} ms",
            f"   total:         {trad:.3f} ms",
            "Fused (QKV + LoRA shrink in one matmul, then LoRA expand):",
            f"   fused matmul:  {t['fused']:.3f} ms",
            f"   LoRA expand:   {t['fused_expand']:.3f} ms",
            f"   total:         {fused:.3f} ms",
            (f"Overall speedup: {_ratio(trad, fused)}; time saved: {saved:.3f} ms "
            f"({100 * saved / trad if trad else 0.0:.1f}%)"),
            (f"Compute stage (QKV matmul + shrink -> fused matmul): {compute_before:.3f} ms -> "
            f"{compute_after:.3f} ms ({_ratio(compute_before, compute_after)})"),
            f"Expand stage: {t['expand']:.3f} ms -> {t['fused_expand']:.3f} ms",
        ]
        text = "\n".join(lines)
        print(text, file=file or sys.stderr)
        return text


def _ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}x" if after > 0 else "n/a"
