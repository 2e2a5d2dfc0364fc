"""Validation of the CUDA C++ LoRA kernels against the Triton ones.

In the engine (NOVAINFER_VALIDATE_LORA=1, or VLLM_VALIDATE_LORA=1), every CUDA shrink and
expand also runs Triton on the same inputs (lora/ops.py) and `compare`s what each added.
Standalone, over random inputs at the shapes of seed 000's grid and a model's projections:

    python -m novainfer.lora.validate [--preset qwen3-0.6b] [--dtype bfloat16]

Either way, a NaN/Inf or a difference beyond bf16 tolerance raises `LoRAValidationError`
naming the op and the largest difference; the command exits with status 1.

Tolerance: |cuda - triton| <= RTOL * |triton| + ATOL * max|triton|, element-wise, with
RTOL = ATOL = 2e-2 (bf16 keeps 8 significant bits, 2^-8 = 3.9e-3; Triton multiplies in
tf32 and rounds in another order, and an output near zero can be a cancellation).
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from novainfer.lora.ops import LoRAValidationError

RTOL = ATOL = 2e-2


def compare(op: str, got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest |got - want| (float32 tensors: what each kernel wrote or added); raises
    LoRAValidationError on NaN/Inf in either, or beyond the tolerance."""
    for name, t in (("CUDA", got), ("Triton", want)):
        if not torch.isfinite(t).all():
            raise LoRAValidationError(f"LoRA {op}: the {name} kernel produced NaN or Inf")
    diff = (got - want).abs()
    largest = float(diff.max()) if diff.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    bad = diff > RTOL * want.abs() + ATOL * scale
    if bool(bad.any()):
        raise LoRAValidationError(
            f"LoRA {op}: the CUDA and Triton kernels disagree: largest difference {largest:.4g} "
            f"(outputs up to {scale:.4g}; {int(bad.sum())} of {bad.numel()} elements beyond "
            f"{RTOL} x |value| + {ATOL} x {scale:.4g})")
    return largest


def cases() -> list[tuple[int, int, int, int]]:
    """(tokens, rank, max_loras, adapters used) points: decode and prefill sizes, seed 000's
    ranks, one and several slots, some tokens without an adapter."""
    return [(t, r, n, u) for t, r, n in itertools.product((1, 7, 64, 512), (16, 64, 128),
                                                          (1, 4, 8))
            for u in {1, n}]


def run_case(tokens: int, rank: int, max_loras: int, used: int, hidden: int,
             parts: list[int], dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(largest shrink difference, largest expand difference) of one random case."""
    from novainfer.lora.ops import expand, group_by_slot, lora_batch, shrink

    gen = torch.Generator().manual_seed(tokens * 1000 + rank * 10 + max_loras + used)
    slots = torch.randint(-1, used, (tokens,), generator=gen).numpy()
    host = group_by_slot(slots)
    if not len(host[2]):
        return 0.0, 0.0
    batch = lora_batch(*(torch.from_numpy(a).to(device) for a in host), host[1], host[2])
    a = (torch.randn(max_loras, len(parts) * rank, hidden, generator=gen) * hidden**-0.5)
    b = torch.randn(max_loras, sum(parts), rank, generator=gen) * 0.05
    x = torch.randn(tokens, hidden, generator=gen)
    a, b, x = (t.to(device=device, dtype=dtype) for t in (a, b, x))
    starts = [sum(parts[:i]) for i in range(len(parts))]
    expand_parts = [(y0, size, i * rank) for i, (y0, size) in enumerate(zip(starts, parts))]
    got, want = shrink(x, a, batch, impl="cuda"), shrink(x, a, batch, impl="triton")
    rows = batch.tokens  # the rows the kernels write
    d_shrink = compare("shrink", got[rows], want[rows])
    y_got = torch.zeros(tokens, sum(parts), dtype=dtype, device=device)
    y_want = y_got.clone()
    expand(want, b, y_got, batch, expand_parts, rank, impl="cuda")
    expand(want, b, y_want, batch, expand_parts, rank, impl="triton")
    return d_shrink, compare("expand", y_got.float(), y_want.float())


def main(argv: list[str] | None = None) -> int:
    from novainfer.models.config import ModelConfig
    from novainfer.presets import preset_folder

    p = argparse.ArgumentParser(description="Check the CUDA LoRA kernels against Triton.")
    p.add_argument("--preset", default="qwen3-0.6b", help="the q/k/v shapes to use")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: validating the CUDA LoRA kernels needs a CUDA device", file=sys.stderr)
        return 2
    cfg = ModelConfig.from_folder(preset_folder(args.preset))
    parts = [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
             cfg.num_kv_heads * cfg.head_dim]
    dtype, device = getattr(torch, args.dtype), torch.device("cuda")
    worst = [0.0, 0.0]
    points = cases()
    try:
        for point in points:
            d = run_case(*point, cfg.hidden_size, parts, dtype, device)
            worst = [max(w, v) for w, v in zip(worst, d)]
    except LoRAValidationError as e:
        print(f"error: {e} (tokens, rank, max_loras, adapters = {point})", file=sys.stderr)
        return 1
    print(f"LoRA kernels: CUDA matches Triton on {len(points)} cases ({args.preset} q/k/v, "
          f"{args.dtype}); largest difference shrink {worst[0]:.3g}, expand {worst[1]:.3g}; "
          "no NaN/Inf")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
