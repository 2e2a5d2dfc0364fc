"""LoRA switches from the environment (default off), with seed 000's spellings as aliases:

| variable | alias | effect |
|---|---|---|
| NOVAINFER_ENABLE_QKV_LORA_FUSION | VLLM_ENABLE_QKV_LORA_FUSION | the QKV projection multiplies by [W_qkv; A of every slot] in one matmul, no shrink kernel |
| NOVAINFER_ENABLE_LORA_TIMING | VLLM_ENABLE_LORA_TIMING | time both QKV paths on every LoRA step, report at exit (lora/timing.py) |

Read when an engine attaches its LoRA layers.
"""

from __future__ import annotations

import os

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
