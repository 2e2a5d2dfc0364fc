"""One copy of each float32 weight on the CPU (layers/linear.py `pack_for_cpu`).

After loading, every linear layer and the LM head hold only the C matmul's panels; a tied
embedding gathers its rows from the LM head's panels. Checked: the outputs are exactly
those of the old layout (the weight kept, the panels a copy beside it) for tied and untied
checkpoints, `.weight` still reads the checkpoint's tensor (a new one on every read), and
the full-size weight tensors are really freed.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import make_llm, random_prompts
from safetensors.torch import load_file

from novainfer import SamplingParams
from novainfer.engine import worker as model_worker
from novainfer.kernels import cpu_native
from novainfer.layers import linear
from novainfer.layers.embedding import Embedding, LMHead

pytestmark = pytest.mark.skipif(
    not cpu_native.native_available(), reason="no C compiler: the CPU kernels cannot be built"
)
SMALL = {"kv_cache_memory": 16 << 20}


def _old_layout(model: torch.nn.Module) -> None:
    """pack_cpu_weights as it was: each matmul on a packed copy, the weight kept beside it."""
    for module in model.modules():
        if hasattr(module, "cpu_matmul"):
            panels = cpu_native.pack_linear_weight(module.weight.data)
            n = module.out_features
            module.cpu_matmul = lambda x, bias, p=panels, n=n: cpu_native.packed_linear(x, p,
                                                                                        bias, n)


@pytest.mark.parametrize("name", ["llama", "llama_untied", "qwen2"])  # tied, untied, biases
def test_outputs_equal_the_old_layout(checkpoint, monkeypatch, name):
    prompts = random_prompts([3, 17, 40], seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    new = make_llm(checkpoint(name), **SMALL).generate(prompts, params, use_tqdm=False)
    monkeypatch.setattr(model_worker, "pack_cpu_weights", _old_layout)
    old_llm = make_llm(checkpoint(name), **SMALL)
    assert "weight" in old_llm.llm_engine.runner.model.lm_head._parameters  # really the old one
    old = old_llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(new, old):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs  # bit for bit


@pytest.mark.parametrize("name", ["llama", "qwen2"])  # tied: head and embedding share panels
def test_weight_reads_the_checkpoint_and_only_panels_are_held(checkpoint, name):
    folder = checkpoint(name)
    tensors = load_file(str(folder / "model.safetensors"))
    model = make_llm(folder, **SMALL).llm_engine.runner.model
    head, embed = model.lm_head, model.model.embed_tokens
    assert torch.equal(head.weight, tensors["model.embed_tokens.weight"])
    assert torch.equal(embed.weight, tensors["model.embed_tokens.weight"])
    assert head.weight_panels is embed.weight_panels
    attn = model.model.layers[1].self_attn
    q_rows = tensors["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(attn.qkv_proj.weight[: q_rows.shape[0]], q_rows)
    assert torch.equal(attn.o_proj.weight, tensors["model.layers.1.self_attn.o_proj.weight"])
    assert attn.o_proj.weight.data_ptr() != attn.o_proj.weight.data_ptr()  # made per read
    for module in model.modules():
        if isinstance(module, linear.CpuPackable):
            assert "weight" not in module._parameters, module  # no full-size tensor kept
    # Parameters add up to one copy of the checkpoint (every size here is a multiple of 16,
    # so the panels have no padding).
    held = sum(p.numel() for p in model.parameters())
    assert held == sum(t.numel() for t in tensors.values())


def _unpack(model: torch.nn.Module) -> None:
    """Back to plain weights, as after loading (untied models only)."""
    for module in model.modules():
        if isinstance(module, linear.CpuPackable) and "weight_panels" in module._parameters:
            weight = torch.nn.Parameter(module.weight, requires_grad=False)
            del module.weight_panels
            module.weight = weight


def test_packing_frees_the_weights(checkpoint):
    llm = make_llm(checkpoint("llama_untied"), load_format="dummy", **SMALL)
    model = llm.llm_engine.runner.model
    _unpack(model)
    weights = [weakref.ref(m.weight) for m in model.modules()
               if isinstance(m, linear.CpuPackable) and hasattr(m, "cpu_matmul")]
    model_worker.pack_cpu_weights(model)
    gc.collect()
    assert weights and all(ref() is None for ref in weights)


def test_tied_embedding_gathers_from_ragged_panels():
    embed, head = Embedding(50, 32), LMHead(50, 32)  # 50 rows: the last panel is padded
    torch.nn.init.normal_(embed.weight)
    head.weight = embed.weight
    weight = embed.weight.detach().clone()
    linear.pack_for_cpu([embed, head])
    assert "weight" not in embed._parameters and embed.weight_panels is head.weight_panels
    ids = torch.tensor([[0, 15, 16, 49], [31, 32, 48, 1]])
    assert torch.equal(embed(ids), F.embedding(ids, weight))
    assert torch.equal(embed.weight, weight) and torch.equal(head.weight, weight)
    x = torch.randn(3, 32)
    torch.testing.assert_close(head(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)
