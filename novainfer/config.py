"""Engine settings, validated where the user hands them in."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "double": torch.float64,
}
BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# vLLM's names: "auto" is the model's dtype; "fp8" is e4m3 (kernels/fp8.py).
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}
MAX_LORA_RANK = 512  # vLLM's largest; the expand kernel holds a rank-wide tile


@dataclass
class EngineConfig:
    model: str | os.PathLike | None = None
    tokenizer: str | os.PathLike | None = None
    dtype: str | torch.dtype = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    # "auto" (the model's dtype), "fp8" or "fp8_e4m3": an e4m3 cache with a K and a V scale per
    # layer, 1.0 unless calculate_kv_scales sets them from the first prefill (amax / 448).
    kv_cache_dtype: str = "auto"
    calculate_kv_scales: bool = False
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes; bounds the KV cache on the CPU
    num_kv_blocks: int | None = None  # explicit block count, overrides memory-based sizing
    seed: int = 0
    attention_backend: str = "auto"
    enforce_eager: bool = False  # True: no CUDA graphs
    load_format: str = "auto"  # "dummy": random weights of the checkpoint's shapes (benchmarks)
    skip_tokenizer_init: bool = False  # token-id prompts only; outputs carry no text
    tensor_parallel_size: int = 1  # ranks (GPUs, or CPU processes) the model is split over
    # Build and launch step N+1 while the device runs step N (engine/llm_engine.py); None:
    # on for CUDA, off on the CPU (where the host does the device's work: nothing to overlap).
    async_scheduling: bool | None = None
    # LoRA adapters (novainfer/lora/): device slots, the largest rank, the CPU cache size.
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: max_loras

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(
                f"load_format must be 'auto', 'safetensors' or 'dummy', got {self.load_format!r}"
            )
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("tensor_parallel_size", self.tensor_parallel_size)
        if self.max_model_len is not None:
            _positive_int("max_model_len", self.max_model_len)
        if self.max_num_batched_tokens is not None:
            _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        if not isinstance(self.kv_cache_dtype, str) or self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, "
                f"got {self.kv_cache_dtype!r}"
            )
        if not isinstance(self.calculate_kv_scales, bool):
            raise TypeError(
                f"calculate_kv_scales must be a bool, got {type(self.calculate_kv_scales).__name__}"
            )
        if self.calculate_kv_scales and self.kv_cache_dtype == "auto":
            raise ValueError("calculate_kv_scales needs kv_cache_dtype 'fp8' or 'fp8_e4m3' (the "
                             "scales are an fp8 cache's), got kv_cache_dtype 'auto'")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size!r}")
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not (
            0 < self.gpu_memory_utilization <= 1
        ):
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )
        if self.kv_cache_memory is not None:
            _positive_int("kv_cache_memory", self.kv_cache_memory)
        if self.num_kv_blocks is not None:
            _positive_int("num_kv_blocks", self.num_kv_blocks)
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise TypeError(
                "async_scheduling must be True, False or None (auto), got "
                f"{type(self.async_scheduling).__name__}"
            )
        if not isinstance(self.enable_lora, bool):
            raise TypeError(f"enable_lora must be a bool, got {type(self.enable_lora).__name__}")
        _positive_int("max_loras", self.max_loras)
        _positive_int("max_lora_rank", self.max_lora_rank)
        if self.max_lora_rank > MAX_LORA_RANK:
            raise ValueError(f"max_lora_rank must be <= {MAX_LORA_RANK}, got {self.max_lora_rank}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        _positive_int("max_cpu_loras", self.max_cpu_loras)
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras "
                             f"({self.max_loras})")
        if not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.device != "cpu" and self.device != "auto" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} was requested but CUDA is not available")
        launched = "WORLD_SIZE" in os.environ  # torchrun: ranks may span several nodes
        if self.tensor_parallel_size > 1 and self.torch_device().type == "cuda" and not launched:
            first = self.torch_device().index or 0
            if first + self.tensor_parallel_size > torch.cuda.device_count():
                raise ValueError(
                    f"tensor_parallel_size {self.tensor_parallel_size} from cuda:{first} needs "
                    f"{first + self.tensor_parallel_size} GPUs; this machine has "
                    f"{torch.cuda.device_count()}"
                )
        if not isinstance(self.dtype, torch.dtype) and self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(
                f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {self.dtype!r}"
            )

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def overlaps_steps(self) -> bool:
        """Whether steps are scheduled asynchronously (async_scheduling, resolved)."""
        if self.async_scheduling is None:
            return self.torch_device().type == "cuda"
        return self.async_scheduling

    def kv_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's element type: the model's dtype unless kv_cache_dtype asks for fp8."""
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or model_dtype

    def torch_dtype(self, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if device.type == "cpu":
            return torch.float32  # CPU half-precision matmuls are slow and lossy
        if checkpoint_dtype in ("float16", "bfloat16"):
            return DTYPES[checkpoint_dtype]
        return torch.bfloat16


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
