"""Which class builds which `architectures` entry of config.json."""

from __future__ import annotations

from novainfer.models.config import ARCHITECTURES, ModelConfig
from novainfer.models.decoder import CausalLM

# All supported families share the one decoder; the switches live in models/config.py.
MODEL_CLASSES: dict[str, type[CausalLM]] = {arch: CausalLM for arch in ARCHITECTURES}


def model_class(cfg: ModelConfig) -> type[CausalLM]:
    return MODEL_CLASSES[cfg.architecture]
