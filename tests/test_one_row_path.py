"""The one-row (batch-1 decode) path of the decoder, wired as on CUDA: q/k/v's and gate/up's
projections with the residual add + RMSNorm inside kernels/gemv.py, and the q/k norms,
rotary and KV store in kernels/rope_store.py, then the Triton backend's `attend`. On the
CPU the kernels run in the Triton interpreter (fp32), so the test lifts the CUDA/16-bit
conditions of `Linear.takes_gemv` and `rope_store_applies`; it checks the decode step's
hidden states and KV cache against the same step through the separate ops, for Llama
(no q/k norm) and Qwen3 (q/k norms). The kernels themselves: tests/test_gemv_kernel.py,
tests/test_rope_store_kernel.py; on a GPU in bf16: tests/test_gpu_e2e.py."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

pytest.importorskip("triton")

from test_prefill_graphs import DEV, _step, _triton_model

from novainfer.kernels import gemv, rope_store
from novainfer.layers import linear
from novainfer.models import decoder


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_one_row_kernels_match_the_separate_ops(checkpoint, name, monkeypatch):
    model, cfg = _triton_model(checkpoint(name))
    cache = torch.zeros(cfg.num_layers, 2, 16, 8, cfg.num_kv_heads, cfg.head_dim, device=DEV)
    with torch.inference_mode():
        ids, positions, meta = _step([20], [20], 0, cfg.vocab_size, seed=1)
        model(ids, positions, cache, meta)  # the context: 20 tokens
        ids, positions, meta = _step([1], [21], 0, cfg.vocab_size, seed=2)
        assert meta.num_decodes == 1
        want_cache = cache.clone()
        want = model(ids, positions, want_cache, meta)  # the separate ops (CPU)
        calls = {"gemv_add_rms_norm": 0, "rope_store": 0, "silu_mul": 0}
        for module, fn in ((gemv, "gemv_add_rms_norm"), (rope_store, "rope_store")):
            real = getattr(module, fn)

            def counted(*a, _f=fn, _r=real, **k):
                calls[_f] += 1
                calls["silu_mul"] += bool(k.get("silu_mul"))
                return _r(*a, **k)
            monkeypatch.setattr(module, fn, counted)
        monkeypatch.setattr(linear.Linear, "takes_gemv",
                            lambda self, x: x.dim() == 2 and x.shape[0] == 1 and self.gemv_fits)
        monkeypatch.setattr(decoder, "rope_store_applies",
                            lambda q, kv_cache, backend, meta: q.shape[0] == 1)
        got = model(ids, positions, cache, meta)
    # q/k/v's and gate/up's norms, gate/up's with the SiLU-and-mul epilogue.
    assert calls == {"gemv_add_rms_norm": 2 * cfg.num_layers, "rope_store": cfg.num_layers,
                     "silu_mul": cfg.num_layers}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, want_cache, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_rope_store_on_every_step_matches_the_separate_ops(checkpoint, name, monkeypatch):
    """Under NOVAINFER_FUSED_OPS=triton the fused q/k norm + rotary + KV store runs on every
    step of the Triton backend, not only one-row ones: a step of two decodes and two
    prefill chunks (one behind an earlier chunk) gives the hidden states and the cache of
    the separate ops (the cache written by `store_kv`)."""
    model, cfg = _triton_model(checkpoint(name))
    shape = (cfg.num_layers, 2, 24, 8, cfg.num_kv_heads, cfg.head_dim)
    cache = torch.zeros(shape, device=DEV)
    with torch.inference_mode():
        ids, positions, meta = _step([20, 9, 12, 5], [20, 9, 12, 5], 0, cfg.vocab_size, seed=3)
        model(ids, positions, cache, meta)  # the contexts
        ids, positions, meta = _step([1, 1, 6, 4], [21, 10, 18, 4], 0, cfg.vocab_size, seed=4)
        assert meta.num_decodes == 2
        want_cache = cache.clone()
        want = model(ids, positions, want_cache, meta)
        calls = []
        real = rope_store.rope_store
        monkeypatch.setattr(rope_store, "rope_store",
                            lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
        monkeypatch.setattr(decoder, "rope_store_applies", lambda q, kv_cache, backend, meta:
                            backend.attends_to_stored_kv(meta))
        got = model(ids, positions, cache, meta)
    assert calls == [12] * cfg.num_layers  # every layer, every row of the step
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, want_cache, rtol=1e-5, atol=1e-5)


def test_when_the_one_row_kernels_apply(monkeypatch):
    """rope_store: a 16-bit CUDA step, a cache in q's dtype or fp8, a backend that attends
    to the stored K/V this step, not the fp8 calibration step; one row under NOVAINFER_GEMV,
    more under NOVAINFER_FUSED_OPS=triton. The norm prologue: no pending bias, no
    all-reduce in the norm (tensor parallelism), no LoRA on the layer."""
    from types import SimpleNamespace as NS

    from novainfer.distributed.parallel import TensorParallel
    from novainfer.layers import fusion

    triton_like = NS(attends_to_stored_kv=lambda meta: True)

    def applies(rows=1, cuda=True, dtype=torch.bfloat16, cache=torch.bfloat16,
                calibrate=False, backend=triton_like):
        q = NS(is_cuda=cuda, shape=(rows, 4, 16), dtype=dtype)
        return decoder.rope_store_applies(q, NS(dtype=cache), backend,
                                          NS(calibrate_kv_scales=calibrate))

    monkeypatch.setattr(fusion, "FUSED_OPS", "triton")
    assert applies() and applies(dtype=torch.float16, cache=torch.float16)
    assert applies(rows=2) and applies(rows=300)
    assert applies(cache=torch.float8_e4m3fn) and applies(rows=8, cache=torch.float8_e4m3fn)
    assert not applies(cache=torch.float16)  # neither q's dtype nor fp8
    assert not applies(cuda=False)
    assert not applies(dtype=torch.float32, cache=torch.float32)
    assert not applies(calibrate=True)
    assert not applies(backend=NS())  # the backend stores K/V itself
    assert not applies(backend=NS(attends_to_stored_kv=lambda meta: False))  # cuDNN prefill
    monkeypatch.setattr(fusion, "FUSED_OPS", "compile")
    assert applies() and not applies(rows=2)
    monkeypatch.setattr(fusion, "FUSED_OPS", "triton")
    monkeypatch.setattr(linear, "GEMV", False)
    assert not applies() and applies(rows=2)
    monkeypatch.undo()

    class Norm:
        def __init__(self, sum_over=None):
            self.sum_over, self.weight, self.eps = sum_over, "w", 1e-6

        def __call__(self, hidden, residual, bias):
            return "normed", "summed"

    class Layer:
        def __init__(self, takes):
            self.takes, self.calls = takes, []

        def takes_prologue(self, x):
            return self.takes

        def after_norm(self, h, residual, weight, eps, silu_mul):
            self.calls.append("fused")
            return "y", "summed"

        def __call__(self, x):
            self.calls.append(("linear", x))
            return "y"

    cases = [  # (norm, layer takes the prologue, pending bias) -> fused?
        (Norm(), True, None, True),
        (Norm(), False, None, False),
        (Norm(), True, "bias", False),
        (Norm(TensorParallel(rank=0, size=2)), True, None, False),
        (Norm(TensorParallel()), True, None, True),
    ]
    for norm, takes, bias, fused in cases:
        layer = Layer(takes)
        assert decoder.norm_then_linear(norm, layer, "h", "r", bias) == ("y", "summed")
        assert layer.calls == (["fused"] if fused else [("linear", "normed")])
    # gate/up: SiLU-and-mul inside the fused kernel, or after the separate linear.
    layer = Layer(True)
    layer.after_norm = lambda h, residual, weight, eps, silu_mul: (silu_mul, "summed")
    assert decoder.norm_then_linear(Norm(), layer, "h", "r", None, silu_mul=True)[0] is True
    gate_up = torch.tensor([[1.0, -2.0, 3.0, 4.0]])
    unfused = decoder.norm_then_linear(Norm(), lambda x: gate_up, "h", "r", "bias",
                                       silu_mul=True)[0]
    torch.testing.assert_close(unfused, torch.nn.functional.silu(gate_up[:, :2]) * gate_up[:, 2:])
    lora_layer = linear.Linear(16, 8)
    monkeypatch.setattr(linear.Linear, "takes_gemv", lambda self, x: True)
    assert lora_layer.takes_prologue(None)
    lora_layer.lora = torch.nn.Identity()  # any attached LoRA module
    assert not lora_layer.takes_prologue(None)
