"""LoRA switches from the environment (default off), with seed 000's spellings as aliases:

| variable | alias | effect |
|---|---|---|
| NOVAINFER_ENABLE_QKV_LORA_FUSION | VLLM_ENABLE_QKV_LORA_FUSION | the QKV projection multiplies by [W_qkv; A of every slot] in one matmul, no shrink kernel |
| NOVAINFER_ENABLE_LORA_TIMING | VLLM_ENABLE_LORA_TIMING | time both QKV paths on every LoRA step, report at exit (lora/timing.py) |
| NOVAINFER_FORCE_TRITON_LORA | VLLM_FORCE_TRITON_LORA | on CUDA, the Triton LoRA kernels instead of the CUDA C++ ones |
| NOVAINFER_VALIDATE_LORA | VLLM_VALIDATE_LORA | every CUDA kernel call is checked against Triton (lora/validate.py) |

Fusion and timing are read when an engine attaches its LoRA layers; the kernel switches once
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


def qkv_fusion() -> bool:
    return switch("ENABLE_QKV_LORA_FUSION")


def timing() -> bool:
    return switch("ENABLE_LORA_TIMING")


class KernelSettings(NamedTuple):
    force_triton: bool
    validate: bool


@functools.cache
def lora_settings() -> KernelSettings:
    """The kernel switches, read once (the ops run hundreds of times per step)."""
    return KernelSettings(switch("FORCE_TRITON_LORA"), switch("VALIDATE_LORA"))


def capturable() -> bool:
    """Whether LoRA steps can run as CUDA graphs: not while timing them (events and host
    bookkeeping per call) or validating the kernels (compared on the host)."""
    return not (timing() or lora_settings().validate)
