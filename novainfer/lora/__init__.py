"""LoRA adapters (PEFT format): the request type and the loader. Light imports only."""

from novainfer.lora.request import LoRARequest

__all__ = ["LoRARequest"]
