"""LoRA switches from the environment, with seed 000's spellings as aliases:

| variable | alias | effect |
|---|---|---|
| NOVAINFER_ENABLE_QKV_LORA_FUSION | VLLM_ENABLE_QKV_LORA_FUSION | 1: the QKV projection multiplies by [W_qkv; A of every slot] in one matmul, no shrink kernel; 0: never; unset: where it was measured to pay (on CUDA, steps of up to FUSION_MAX_TOKENS tokens) |
| NOVAINFER_ENABLE_LORA_TIMING | VLLM_ENABLE_LORA_TIMING | time both QKV paths on every LoRA step, report at exit (lora/timing.py) |
| NOVAINFER_FORCE_TRITON_LORA | VLLM_FORCE_TRITON_LORA | on CUDA, the Triton LoRA kernels instead of the CUDA C++ ones |
| NOVAINFER_VALIDATE_LORA | VLLM_VALIDATE_LORA | every CUDA kernel call is checked against Triton (lora/validate.py) |

The timing, Triton and validation switches default to off. Two limits, measured on an H200
(docs/lora.md), can be moved for other GPUs: NOVAINFER_LORA_CUDA_MAX_TOKENS (the CUDA C++
kernels, batched matrix-vector products, serve steps of up to this many tokens, Triton's
tiled kernels the larger ones) and NOVAINFER_LORA_FUSION_MAX_TOKENS (the unset fusion
switch's limit).

The two limits are read with the kernel switches, once per process (`lora_settings`): an
engine built later in the same process keeps the first values. Fusion and timing are read
when an engine attaches its LoRA layers; the kernel switches once
per process, at the first LoRA op (`lora_settings`; tests call `lora_settings.cache_clear()`).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

TRUE = ("1", "true", "yes", "on")


def switch(name: str) -> bool:
    """NOVAINFER_<name>, else VLLM_<name>; true for 1/true/yes/on."""
    value = os.environ.get(f"NOVAINFER_{name}")
    if value is None:
        value = os.environ.get(f"VLLM_{name}", "0")
    return value.strip().lower() in TRUE


# One H200, qwen3-0.6b (docs/lora.md): with CUDA for steps up to 512 tokens and Triton above,
# one adapter made 15,768 tok/s against 14,805 (Triton only) and 14,787 (CUDA only); in CUDA
# graphs the fused q/k/v matmul beats the traditional path up to 512 tokens for both kernels
# and loses from 1,024 tokens at rank 16 (the extra GEMM columns cost more than the launch).
CUDA_MAX_TOKENS = 512
FUSION_MAX_TOKENS = 512


FALSE = ("0", "false", "no", "off")


def qkv_fusion() -> str:
    """"on", "off", or "auto" (the switch unset, empty or auto); any other value is a
    ValueError naming the variable."""
    name = "NOVAINFER_ENABLE_QKV_LORA_FUSION"
    value = os.environ.get(name)
    if value is None:
        name = "VLLM_ENABLE_QKV_LORA_FUSION"
        value = os.environ.get(name, "auto")
    value = value.strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in TRUE + FALSE:
        return "on" if value in TRUE else "off"
    raise ValueError(f"{name} must be 1/true/yes/on, 0/false/no/off or auto (unset: auto), "
                     f"got {value!r}")


def limit(name: str, default: int) -> int:
    """NOVAINFER_<name>, a token count >= 0 (default `default`)."""
    value = os.environ.get(f"NOVAINFER_{name}", "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise ValueError(f"NOVAINFER_{name} must be a token count (an integer >= 0), "
                         f"got {value!r}")
    return int(value)


def timing() -> bool:
    return switch("ENABLE_LORA_TIMING")


class KernelSettings(NamedTuple):
    force_triton: bool
    validate: bool
    cuda_max_tokens: int
    fusion_max_tokens: int


@functools.cache
def lora_settings() -> KernelSettings:
    """The kernel switches, read once (the ops run hundreds of times per step)."""
    return KernelSettings(switch("FORCE_TRITON_LORA"), switch("VALIDATE_LORA"),
                          limit("LORA_CUDA_MAX_TOKENS", CUDA_MAX_TOKENS),
                          limit("LORA_FUSION_MAX_TOKENS", FUSION_MAX_TOKENS))


def capturable() -> bool:
    """Whether LoRA steps can run as CUDA graphs: not while timing them (events and host
    bookkeeping per call) or validating the kernels (compared on the host)."""
    return not (timing() or lora_settings().validate)
