"""Load safetensors checkpoints (single or sharded) into the decoder's fused parameters.

Safetensors only: pickled `.bin` checkpoints are never opened.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from novainfer.models.decoder import PACKED_MODULES

# Buffers some checkpoints carry that we recompute instead.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {', '.join(bins)}: pickled checkpoints are not loaded)" if bins else ""
        raise ValueError(f"model folder {folder} has no *.safetensors weights{hint}")
    for path in files:
        if not path.exists():
            raise ValueError(f"checkpoint shard {path} listed in the index is missing")
    return files


def _target(name: str) -> tuple[str, str | int | None]:
    """Map a transformers tensor name to (our module.param name, shard)."""
    module_path, _, param = name.rpartition(".")
    parent, _, leaf = module_path.rpartition(".")
    if leaf in PACKED_MODULES:
        fused, shard = PACKED_MODULES[leaf]
        return f"{parent}.{fused}.{param}", shard
    return name, None


def load_weights(model: nn.Module, folder: Path, tied_embeddings: bool) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    loaded: set[tuple[str, str | int | None]] = set()
    for path in checkpoint_files(folder):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                    if name.endswith(_IGNORED_SUFFIXES):
                        continue
                    if tied_embeddings and name == "lm_head.weight":
                        continue
                    _load_one(name, f, params, modules, loaded)
        except ValueError:
            raise
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ValueError(
                f"checkpoint file {path} could not be read (truncated or corrupt?): {exc}"
            ) from exc
    expected = {
        (name, shard)
        for name in params
        if not _is_alias(name, tied_embeddings)
        for shard in getattr(modules[name.rpartition(".")[0]], "shards", {None: None})
    }
    missing = sorted(f"{n}[{s}]" if s is not None else n for n, s in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint in {folder} is missing tensors: {', '.join(missing[:8])}")


def _is_alias(name: str, tied: bool) -> bool:
    return tied and name == "lm_head.weight"


def _load_one(
    name: str,
    file: Any,
    params: dict[str, nn.Parameter],
    modules: dict[str, nn.Module],
    loaded: set[tuple[str, str | int | None]],
) -> None:
    """Load one checkpoint tensor. A sharded module (tensor parallelism) names the part this
    rank holds, and only that part is read from the file."""
    target, shard = _target(name)
    if target not in params:
        raise ValueError(f"checkpoint tensor '{name}' does not belong to this model")
    module_name, _, param_name = target.rpartition(".")
    module = modules[module_name]
    if hasattr(module, "checkpoint_slice"):
        part = file.get_slice(name)
        index = module.checkpoint_slice(param_name, shard)
        tensor = part[index[: len(part.get_shape())]]
    else:
        tensor = file.get_tensor(name)
    tensor = tensor.to(params[target].dtype)
    if hasattr(module, "load"):
        module.load(param_name, tensor, shard)
    else:
        if tuple(params[target].shape) != tuple(tensor.shape):
            raise ValueError(
                f"checkpoint tensor '{name}' has shape {tuple(tensor.shape)}, "
                f"expected {tuple(params[target].shape)}"
            )
        params[target].data.copy_(tensor)
    loaded.add((target, shard))


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights with a sane scale, for benchmarking shapes without a checkpoint."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=gen)
