"""Read a PEFT LoRA adapter folder into per-layer (A, B) pairs, checked against the model.

A folder holds `adapter_config.json` (`r`, `lora_alpha`, `use_rslora`, `target_modules` as
a list of module names or one regex) and `adapter_model.safetensors`, whose tensors PEFT
names `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`, with
A of shape [r, in_features] and B of shape [out_features, r]. The update of a projection
is `scaling * x @ A.T @ B.T`, scaling = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA).
Anything the engine cannot serve is a ValueError that names the adapter and the field: a
rank above max_lora_rank, DoRA, modules_to_save, embedding or LM-head targets, per-module
rank or alpha patterns, a tensor whose shape does not match the base model, a missing or
corrupt file. A pickled `adapter_model.bin` is never unpickled.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from novainfer.lora.request import LoRARequest
from novainfer.models.config import ModelConfig

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION + MLP
REFUSED_TARGETS = ("embed_tokens", "lm_head")
_KEY = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


@dataclass
class LoRAAdapter:
    """One adapter's weights on the CPU: (layer, projection) -> (A [r, in], B [out, r])."""

    name: str
    int_id: int
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def targets(self) -> set[str]:
        return {proj for _, proj in self.weights}


def projection_shape(model: ModelConfig, proj: str) -> tuple[int, int]:
    """(in_features, out_features) of one projection of the base model."""
    h, q, kv = model.hidden_size, model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    return {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, model.intermediate_size), "up_proj": (h, model.intermediate_size),
        "down_proj": (model.intermediate_size, h),
    }[proj]


def adapter_rank(folder: str) -> int | None:
    """The `r` an adapter folder's config declares (None when it cannot be read: loading
    the adapter then reports why)."""
    try:
        rank = json.loads((Path(folder) / "adapter_config.json").read_text()).get("r")
    except (OSError, ValueError, AttributeError):
        return None
    return rank if isinstance(rank, int) and not isinstance(rank, bool) else None


def load_adapter(request: LoRARequest, model: ModelConfig, max_lora_rank: int) -> LoRAAdapter:
    name = request.lora_name

    def fail(message: str) -> ValueError:
        return ValueError(f"LoRA adapter '{name}' ({request.lora_path}): {message}")

    folder = Path(request.lora_path)
    if not folder.is_dir():
        raise fail("lora_path is not a folder")
    cfg = _read_config(folder, fail)
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise fail(f"adapter_config.json: r must be a positive integer, got {rank!r}")
    if rank > max_lora_rank:
        raise fail(f"adapter_config.json: r={rank} exceeds max_lora_rank={max_lora_rank}; "
                   f"start the engine with max_lora_rank >= {rank}")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise fail(f"adapter_config.json: lora_alpha must be a positive number, got {alpha!r}")
    if cfg.get("use_dora"):
        raise fail("adapter_config.json: use_dora is true; DoRA adapters are not supported")
    if cfg.get("modules_to_save"):
        raise fail(f"adapter_config.json: modules_to_save {cfg['modules_to_save']!r} is not "
                   "supported (only LoRA weights on q/k/v/o and gate/up/down projections)")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if cfg.get(pattern):
            raise fail(f"adapter_config.json: {pattern} (per-module ranks or alphas) is not "
                       "supported")
    targets = _targets(cfg.get("target_modules"), model, fail)
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    weights = _read_weights(folder, model, rank, targets, fail)
    return LoRAAdapter(name, request.lora_int_id, rank, float(scaling), weights)


def _read_config(folder: Path, fail) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise fail("adapter_config.json is missing")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"adapter_config.json is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise fail("adapter_config.json must hold a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise fail(f"adapter_config.json: peft_type is {peft_type!r}; only LORA is supported")
    return cfg


def _targets(target_modules, model: ModelConfig, fail) -> set[str]:
    """The projections the config targets: module names (a name matches a module whose
    dotted path ends with it, as PEFT matches) or one regex over the full module path."""
    if isinstance(target_modules, str):
        try:
            regex = re.compile(target_modules)
        except re.error as exc:
            raise fail(f"adapter_config.json: target_modules regex is invalid ({exc})") from None
        paths = {proj: f"model.layers.0.{'self_attn' if proj in ATTENTION else 'mlp'}.{proj}"
                 for proj in TARGETS + REFUSED_TARGETS}
        paths["embed_tokens"], paths["lm_head"] = "model.embed_tokens", "lm_head"
        chosen = {proj for proj, path in paths.items() if regex.fullmatch(path)}
    elif isinstance(target_modules, list) and all(isinstance(t, str) for t in target_modules):
        chosen = set()
        for target in target_modules:
            matched = {p for p in TARGETS + REFUSED_TARGETS
                       if p == target or p.endswith("." + target) or target.endswith("." + p)}
            if not matched:
                raise fail(f"adapter_config.json: target_modules names {target!r}, which is "
                           f"not a module of this model; allowed: {', '.join(TARGETS)}")
            chosen |= matched
    else:
        raise fail("adapter_config.json: target_modules must be a list of module names or a "
                   f"regex string, got {target_modules!r}")
    refused = sorted(chosen & set(REFUSED_TARGETS))
    if refused:
        raise fail(f"adapter_config.json: target_modules includes {', '.join(refused)}; "
                   "embedding and LM-head adapters are not supported")
    if not chosen:
        raise fail("adapter_config.json: target_modules matches no projection of this model")
    return chosen


def _read_weights(folder: Path, model: ModelConfig, rank: int, targets: set[str], fail
                  ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        if (folder / "adapter_model.bin").exists():
            raise fail("only adapter_model.bin found; pickled weights are never loaded: "
                       "save the adapter with safe_serialization=True")
        raise fail("adapter_model.safetensors is missing")
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                m = _KEY.fullmatch(key)
                if m is None:
                    raise fail(f"adapter_model.safetensors: tensor {key!r} is not a LoRA A/B "
                               "weight of a q/k/v/o or gate/up/down projection (DoRA "
                               "magnitudes, embeddings and LM heads are not supported)")
                layer, proj, half = int(m.group(1)), m.group(2), m.group(3)
                if proj not in targets:
                    raise fail(f"adapter_model.safetensors: tensor {key!r} is for {proj}, "
                               "which target_modules does not name")
                if layer >= model.num_layers:
                    raise fail(f"adapter_model.safetensors: tensor {key!r} is for layer "
                               f"{layer}; the model has {model.num_layers} layers")
                halves.setdefault((layer, proj), {})[half] = f.get_tensor(key)
    except SafetensorError as exc:
        raise fail(f"adapter_model.safetensors is corrupt ({exc})") from None
    if not halves:
        raise fail("adapter_model.safetensors holds no LoRA weights")
    weights = {}
    for (layer, proj), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise fail(f"adapter_model.safetensors: layer {layer} {proj} has no lora_{missing}")
        a, b = pair["A"], pair["B"]
        fan_in, fan_out = projection_shape(model, proj)
        for half, got, want in (("A", a, (rank, fan_in)), ("B", b, (fan_out, rank))):
            if tuple(got.shape) != want:
                raise fail(f"adapter_model.safetensors: layer {layer} {proj} lora_{half} has "
                           f"shape {tuple(got.shape)}; this model and r={rank} need {want}")
        weights[(layer, proj)] = (a, b)
    return weights
