"""PEFT LoRA adapter folders (novainfer/lora/adapter.py): what loads, with which scaling, and
a ValueError naming the adapter and the field for everything the engine cannot serve.

Adapters are written here with PEFT's file layout and tensor names; with peft installed,
one is also saved by PEFT itself and must load to the same tensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from novainfer import LoRARequest
from novainfer.lora.adapter import TARGETS, load_adapter, projection_shape
from novainfer.models.config import ModelConfig

PREFIX = "base_model.model.model.layers"


@pytest.fixture(scope="module")
def model(checkpoint) -> ModelConfig:
    return ModelConfig.from_folder(checkpoint("llama"))


def _tensors(model: ModelConfig, rank: int, targets=TARGETS, layers=None, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(model.num_layers) if layers is None else layers:
        for proj in targets:
            part = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            fan_in, fan_out = projection_shape(model, proj)
            base = f"{PREFIX}.{layer}.{part}.{proj}"
            out[f"{base}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g)
            out[f"{base}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g)
    return out


def _adapter(folder: Path, config: dict, tensors: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _config(**kw) -> dict:
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], **kw}


def test_loads_pairs_with_scaling(model, tmp_path):
    tensors = _tensors(model, 4, ("q_proj", "k_proj", "v_proj", "o_proj"))
    folder = _adapter(tmp_path / "a", _config(), tensors)
    adapter = load_adapter(LoRARequest("a", 1, str(folder)), model, max_lora_rank=16)
    assert adapter.rank == 4 and adapter.scaling == 2.0 and adapter.int_id == 1
    assert adapter.targets == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert len(adapter.weights) == 4 * model.num_layers
    a, b = adapter.weights[(1, "k_proj")]
    assert torch.equal(a, tensors[f"{PREFIX}.1.self_attn.k_proj.lora_A.weight"])
    assert torch.equal(b, tensors[f"{PREFIX}.1.self_attn.k_proj.lora_B.weight"])


def test_rslora_and_regex_targets(model, tmp_path):
    tensors = _tensors(model, 4, ("gate_proj", "up_proj", "down_proj"))
    folder = _adapter(tmp_path / "r", _config(use_rslora=True, lora_alpha=6,
                                              target_modules=r".*\.mlp\.(gate|up|down)_proj"),
                      tensors)
    adapter = load_adapter(LoRARequest("r", 2, folder), model, max_lora_rank=4)
    assert adapter.scaling == pytest.approx(6 / math.sqrt(4))
    assert adapter.targets == {"gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("case, field", [
    ("rank", "max_lora_rank"),
    ("dora", "use_dora"),
    ("modules_to_save", "modules_to_save"),
    ("embedding", "embed_tokens"),
    ("lm_head", "lm_head"),
    ("rank_pattern", "rank_pattern"),
    ("unknown_target", "target_modules"),
    ("shape", "shape"),
    ("missing_b", "lora_B"),
    ("layer", "layers"),
    ("no_config", "adapter_config.json is missing"),
    ("bad_json", "not valid JSON"),
    ("bin_only", "adapter_model.bin"),
    ("corrupt", "corrupt"),
    ("untargeted", "target_modules does not name"),
])
def test_refusals_name_the_adapter_and_field(model, tmp_path, case, field):
    folder = tmp_path / case
    cfg, tensors = _config(), _tensors(model, 4, ("q_proj", "k_proj", "v_proj", "o_proj"))
    if case == "rank":
        cfg["r"], tensors = 32, _tensors(model, 32, ("q_proj", "k_proj", "v_proj", "o_proj"))
    elif case == "dora":
        cfg["use_dora"] = True
    elif case == "modules_to_save":
        cfg["modules_to_save"] = ["lm_head"]
    elif case == "embedding":
        cfg["target_modules"] = ["q_proj", "embed_tokens"]
    elif case == "lm_head":
        cfg["target_modules"] = r"lm_head|.*q_proj"
    elif case == "rank_pattern":
        cfg["rank_pattern"] = {"q_proj": 8}
    elif case == "unknown_target":
        cfg["target_modules"] = ["q_proj", "c_attn"]
    elif case == "shape":
        key = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
        tensors[key] = torch.zeros(4, model.hidden_size + 1)
    elif case == "missing_b":
        del tensors[f"{PREFIX}.0.self_attn.v_proj.lora_B.weight"]
    elif case == "layer":
        tensors.update(_tensors(model, 4, ("q_proj",), layers=[model.num_layers]))
    elif case == "untargeted":
        tensors.update(_tensors(model, 4, ("down_proj",), layers=[0]))
    _adapter(folder, cfg, tensors)
    if case == "no_config":
        (folder / "adapter_config.json").unlink()
    elif case == "bad_json":
        (folder / "adapter_config.json").write_text("{not json")
    elif case == "bin_only":
        (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    elif case == "corrupt":
        (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(ValueError) as err:
        load_adapter(LoRARequest("tenant-x", 3, str(folder)), model, max_lora_rank=16)
    message = str(err.value)
    assert "LoRA adapter 'tenant-x'" in message and field in message, message


@pytest.mark.parametrize("kwargs, field", [
    ({"lora_name": "", "lora_int_id": 1, "lora_path": "p"}, "lora_name"),
    ({"lora_name": "a", "lora_int_id": 0, "lora_path": "p"}, "lora_int_id"),
    ({"lora_name": "a", "lora_int_id": True, "lora_path": "p"}, "lora_int_id"),
    ({"lora_name": "a", "lora_int_id": 1, "lora_path": ""}, "lora_path"),
])
def test_lora_request_checks_its_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LoRARequest(**kwargs)
    from novainfer.lora.request import LoRARequest as same

    assert same is LoRARequest


def test_peft_saved_adapter_loads(model, checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint("llama"), dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                          init_lora_weights=False)
    peft.get_peft_model(base, cfg).save_pretrained(tmp_path / "p")
    adapter = load_adapter(LoRARequest("p", 1, tmp_path / "p"), model, max_lora_rank=8)
    assert adapter.scaling == 4.0
    assert adapter.targets == {"q_proj", "v_proj", "down_proj"}
    assert len(adapter.weights) == 3 * model.num_layers
