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

from test_prefill_graphs import DEV, _step, _triton_model

from novainfer.kernels import gemv, rope_store
from novainfer.layers import linear
from novainfer.models import decoder

pytest.importorskip("triton")


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
        calls = {"gemv_add_rms_norm": 0, "rope_store": 0}
        for module, fn in ((gemv, "gemv_add_rms_norm"), (rope_store, "rope_store")):
            real = getattr(module, fn)
            monkeypatch.setattr(module, fn, lambda *a, _f=fn, _r=real, **k:
                                calls.__setitem__(_f, calls[_f] + 1) or _r(*a, **k))
        monkeypatch.setattr(linear.Linear, "takes_gemv",
                            lambda self, x: x.dim() == 2 and x.shape[0] == 1 and self.gemv_fits)
        monkeypatch.setattr(decoder, "rope_store_applies",
                            lambda q, kv_cache, backend, meta: q.shape[0] == 1)
        got = model(ids, positions, cache, meta)
    assert calls == {"gemv_add_rms_norm": 2 * cfg.num_layers, "rope_store": cfg.num_layers}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, want_cache, rtol=1e-5, atol=1e-5)
