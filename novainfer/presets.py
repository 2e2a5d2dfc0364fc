"""Model shapes for benchmarking without a download: config.json only, random weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from novainfer.loader.model_path import cache_root

_QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1e6,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 40960, "torch_dtype": "bfloat16",
}
_R1_DISTILL_QWEN_15B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
    "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
    "vocab_size": 151936, "tie_word_embeddings": False, "rope_theta": 1e4,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
}
_LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "tie_word_embeddings": False, "rope_theta": 5e5,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
}
_TINY = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 128, "intermediate_size": 384,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "vocab_size": 10240, "tie_word_embeddings": True, "rope_theta": 1e6,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "torch_dtype": "float32",
}

PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": _QWEN3_06B,
    "r1-distill-qwen-1.5b": _R1_DISTILL_QWEN_15B,
    "llama3-8b": _LLAMA3_8B,
    "tiny": _TINY,
}


def preset_folder(name: str) -> Path:
    """A folder holding just the preset's config.json (load with load_format='dummy')."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    folder = cache_root() / "presets" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(PRESETS[name], indent=2) + "\n")
    return folder
