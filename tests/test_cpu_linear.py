"""The CPU matmul kernel (novainfer/kernels/cpu_linear.c) against F.linear.

Row counts on and around the 6-row tile (1, 5, 6, 7, 13, 32, 100: one block, balanced
blocks of unequal size), output sizes that fill 16-column panels exactly and ragged ones
(8, 40), reduction sizes 1/9/576, with and without bias, 3-D and non-contiguous inputs,
the unpacking back to the weight, and the choice `pack_for_cpu` makes (C kernel, oneDNN
without a compiler, F.linear for other dtypes or with NOVAINFER_NO_COMPILE=1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from novainfer.kernels import cpu_native
from novainfer.layers import linear
from novainfer.layers.embedding import LMHead

pytestmark = pytest.mark.skipif(
    not cpu_native.native_available(), reason="no C compiler: the CPU kernels cannot be built"
)


def _case(m, n, k, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    return x, w, b


def _expected(x, w, b):
    out = F.linear(x.double(), w.double(), None if b is None else b.double())
    return out.float()


@pytest.mark.parametrize("m", [1, 5, 6, 7, 13, 32, 100])
@pytest.mark.parametrize("n,k", [(16, 576), (40, 9), (8, 1), (960, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(m, n, k, bias):
    x, w, b = _case(m, n, k, bias, seed=m * 1000 + n + k)
    packed = cpu_native.pack_linear_weight(w)
    assert packed.shape == (-(-n // 16), k, 16)
    assert torch.equal(cpu_native.unpack_linear_weight(packed, n), w)
    got = cpu_native.packed_linear(x, packed, b, n)
    assert got.shape == (m, n)
    torch.testing.assert_close(got, _expected(x, w, b), rtol=1e-5, atol=1e-5)


def test_packed_linear_on_3d_and_strided_inputs_and_no_rows():
    x, w, b = _case(12, 40, 24, bias=True)
    packed = cpu_native.pack_linear_weight(w)
    x3 = x.view(3, 4, 24)
    torch.testing.assert_close(
        cpu_native.packed_linear(x3, packed, b, 40), _expected(x, w, b).view(3, 4, 40)
    )
    wide = torch.randn(12, 48)
    strided = wide[:, ::2]  # every other column: not contiguous
    torch.testing.assert_close(
        cpu_native.packed_linear(strided, packed, b, 40), _expected(strided, w, b),
        rtol=1e-5, atol=1e-5,
    )
    assert cpu_native.packed_linear(x[:0], packed, b, 40).shape == (0, 40)


def test_pack_for_cpu_picks_the_c_kernel_and_layers_use_it(monkeypatch):
    layer = linear.QKVLinear(hidden=32, num_heads=4, num_kv_heads=2, head_dim=8, bias=True)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(7, 32)
    expected = F.linear(x, layer.weight, layer.bias)
    calls = []
    real = cpu_native.packed_linear
    monkeypatch.setattr(cpu_native, "packed_linear", lambda *a: calls.append(1) or real(*a))
    weight = layer.weight.detach().clone()
    linear.pack_for_cpu([layer])
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert calls, "the layer did not go through the C kernel"
    assert torch.equal(layer.weight, weight)  # unpacked from the panels on read

    head = LMHead(50, 32)
    torch.nn.init.normal_(head.weight)
    weight = head.weight.detach().clone()
    linear.pack_for_cpu([head])
    torch.testing.assert_close(head(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="packed for the CPU kernels"):
        layer.load("weight", weight[:24], "q")  # would land in a throwaway unpacked copy
    with pytest.raises(RuntimeError, match="packed for the CPU kernels"):
        head.load("weight", weight)


def _layer(weight: torch.Tensor) -> linear.Linear:
    layer = linear.Linear(weight.shape[1], weight.shape[0])
    layer.weight.data.copy_(weight)
    return layer


def test_pack_for_cpu_fallbacks(monkeypatch):
    w = torch.randn(24, 16)
    x = torch.randn(3, 16)
    layer = linear.Linear(16, 24).double()
    linear.pack_for_cpu([layer])
    assert layer.cpu_matmul is None  # other dtypes: F.linear
    monkeypatch.setattr(linear, "PLAIN_PYTORCH", True)
    layer = _layer(w)
    linear.pack_for_cpu([layer])
    assert layer.cpu_matmul is None  # NOVAINFER_NO_COMPILE=1: F.linear
    monkeypatch.setattr(linear, "PLAIN_PYTORCH", False)
    monkeypatch.setattr(cpu_native, "native_available", lambda: False)
    layer = _layer(w)
    linear.pack_for_cpu([layer])  # no compiler: oneDNN's layout where torch has it
    if torch.backends.mkldnn.is_available():
        assert layer.cpu_matmul is not None
        torch.testing.assert_close(layer(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
