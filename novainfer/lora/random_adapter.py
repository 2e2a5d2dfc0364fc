"""Random PEFT-format LoRA adapters of a model's shapes, for benchmarks (`novainfer bench
--lora-count K --lora-rank R`): the same files PEFT saves, so they load like real ones."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from novainfer.lora.adapter import ATTENTION, TARGETS, projection_shape
from novainfer.models.config import ModelConfig


def write_random_adapter(folder: Path, model: ModelConfig, rank: int, seed: int,
                         targets: tuple[str, ...] = TARGETS) -> Path:
    """An adapter of rank `rank` on `targets` in every layer, small random A and B."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(model.num_layers):
        for proj in targets:
            fan_in, fan_out = projection_shape(model, proj)
            block = "self_attn" if proj in ATTENTION else "mlp"
            key = f"base_model.model.model.layers.{layer}.{block}.{proj}.lora_"
            tensors[key + "A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            tensors[key + "B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.01
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(targets)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder
