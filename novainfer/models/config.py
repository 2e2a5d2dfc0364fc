"""Model shape and switches read from a Hugging Face config.json, in one flat dataclass."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The per-architecture switches of the one decoder; adding a model family means adding a row.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"qk_norm": False, "qkv_bias_default": False},
    "Qwen2ForCausalLM": {"qk_norm": False, "qkv_bias_default": True},
    "Qwen3ForCausalLM": {"qk_norm": True, "qkv_bias_default": False},
}

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope_theta: float
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    torch_dtype: str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"model architecture {archs or '(none given)'} is not supported; "
                f"supported architectures: {', '.join(sorted(ARCHITECTURES))}"
            )
        switches = ARCHITECTURES[arch]
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type '{rope_type}' is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        rope["rope_type"] = rope_type
        attention_bias = raw.get("attention_bias")
        return cls(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias; Llama and Qwen3 take it from attention_bias.
            qkv_bias=switches["qkv_bias_default"] or bool(attention_bias),
            o_bias=arch != "Qwen2ForCausalLM" and bool(attention_bias),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=switches["qk_norm"],
            rope_theta=rope_theta,
            rope_scaling=rope,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"model config {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)
