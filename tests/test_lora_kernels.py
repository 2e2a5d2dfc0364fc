"""The Triton and CUDA C++ LoRA shrink and expand kernels against their PyTorch twins
(lora/ops.py) on random inputs: tokens of several adapters interleaved, tokens without one
(never touched), a rank below the slots' R, sizes that are not multiples of the blocks, a
single token, fused parts (q/k/v), wide ranks. Triton is interpreted on the CPU in fp32
(TRITON_INTERPRET=1); on a GPU the `gpu` tests compile both kernels and add bf16 at a
realistic size. The choice between them (switches, the fallback to Triton when the CUDA
kernel fails) and validation mode are tested on the CPU with stand-ins for the CUDA kernel."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

pytest.importorskip("triton")

from novainfer.lora import ops, switches
from novainfer.lora.ops import expand, group_by_slot, lora_batch, shrink

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")


def _batch(token_slots: list[int], device: torch.device):
    tokens, starts, slots = group_by_slot(np.array(token_slots, dtype=np.int64))
    up = [torch.from_numpy(a).to(device) for a in (tokens, starts, slots)]
    return lora_batch(*up, starts, slots)


def _case(num_tokens, slots_used, in_features, parts, max_rank, rank, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    token_slots = torch.randint(-1, slots_used, (num_tokens,), generator=g).tolist()
    token_slots[0] = 0  # at least one token uses an adapter
    num_slots = slots_used + 1  # one slot no token uses
    out_features = sum(parts)
    x = torch.randn(num_tokens, in_features, generator=g).to(dtype).to(device)
    a = torch.randn(num_slots, len(parts) * max_rank, in_features, generator=g) / in_features**0.5
    b = torch.randn(num_slots, out_features, max_rank, generator=g)
    a[:, :, :][:, [r for p in range(len(parts)) for r in range(p * max_rank + rank,
                                                               (p + 1) * max_rank)]] = 0
    b[:, :, rank:] = 0
    y = torch.randn(num_tokens, out_features, generator=g).to(dtype).to(device)
    starts = np.cumsum([0, *parts])
    expand_parts = [(int(starts[i]), size, i * max_rank) for i, size in enumerate(parts)]
    return (token_slots, x, a.to(dtype).to(device), b.to(dtype).to(device), y, expand_parts)


CASES = [  # tokens, adapters used, in, parts, R, rank
    (1, 1, 32, [48], 16, 16),
    (37, 3, 80, [64, 16, 16], 16, 8),  # q/k/v, rank below R
    (70, 2, 48, [40, 40], 32, 5),  # gate/up, odd sizes
    (19, 4, 17, [33], 16, 3),
]
WIDE = [(33, 2, 96, [40, 24], 256, 200), (5, 1, 64, [72], 512, 512)]  # the CUDA tests add these


@pytest.mark.parametrize("case", CASES, ids=[f"t{c[0]}-a{c[1]}-k{c[2]}" for c in CASES])
def test_triton_matches_the_pytorch_twins(case):
    tokens, used, k, parts, max_rank, rank = case
    token_slots, x, a, b, y, expand_parts = _case(tokens, used, k, parts, max_rank, rank,
                                                  torch.float32, DEV, seed=tokens)
    batch = _batch(token_slots, DEV)
    want = shrink(x, a, batch, impl="torch")
    got = shrink(x, a, batch, impl="triton")
    used = batch.tokens  # the shrink's other rows are left unset
    torch.testing.assert_close(got[used], want[used], rtol=1e-5, atol=1e-5)
    free = [t for t, s in enumerate(token_slots) if s < 0]
    y_want, y_got = y.clone(), y.clone()
    expand(want, b, y_want, batch, expand_parts, rank, impl="torch")
    expand(want, b, y_got, batch, expand_parts, rank, impl="triton")
    torch.testing.assert_close(y_got, y_want, rtol=1e-5, atol=1e-5)
    assert torch.equal(y_got[free], y[free])
    # The twins against the plain formula, token by token.
    for t, slot in enumerate(token_slots):
        if slot < 0:
            continue
        for i, (y0, size, s0) in enumerate(expand_parts):
            part_a = a[slot, i * max_rank : i * max_rank + rank]
            delta = (x[t] @ part_a.T) @ b[slot, y0 : y0 + size, :rank].T
            torch.testing.assert_close(y_want[t, y0 : y0 + size], y[t, y0 : y0 + size] + delta,
                                       rtol=1e-4, atol=1e-4)


def test_graph_buffers_give_the_same_updates():
    """The static layout a CUDA graph replays (lora tokens in a buffer longer than the step,
    one segment per slot, empty ones included, the grid sized by the bucket) gives the same
    shrink and expand as the step's own LoRABatch."""
    from novainfer.engine.cuda_graphs import segment_per_slot
    from novainfer.lora.ops import LoRABatch

    token_slots, x, a, b, y, parts = _case(37, 3, 80, [64, 16, 16], 16, 8, torch.float32, DEV,
                                           seed=11)
    batch = _batch(token_slots, DEV)
    slots, bucket = a.shape[0], 48  # one slot no token uses; a bucket larger than the step
    tokens = torch.full((bucket,), 7, dtype=torch.long)  # stale entries past the step
    starts = torch.full((slots + 1,), 99, dtype=torch.long)
    starts[0] = 0
    segment_per_slot(batch, tokens, starts, torch.zeros(slots, dtype=torch.long))
    static = LoRABatch(tokens, starts, torch.arange(slots), [], bucket)
    assert starts.tolist()[-1] == batch.tokens.numel()
    want = shrink(x, a, batch, impl="torch")
    used = batch.tokens
    torch.testing.assert_close(shrink(x, a, static, impl="triton")[used], want[used], rtol=1e-5,
                               atol=1e-5)
    y_want, y_got = y.clone(), y.clone()
    expand(want, b, y_want, batch, parts, 8, impl="torch")
    expand(want, b, y_got, static, parts, 8, impl="triton")
    torch.testing.assert_close(y_got, y_want, rtol=1e-5, atol=1e-5)


def test_no_token_uses_an_adapter():
    assert _batch([-1, -1], DEV) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_realistic():
    """qwen3-0.6b's q/k/v shape (1024 in, 2048 + 1024 + 1024 out), 256 tokens, 4 adapters
    of rank 16: within bf16 rounding of the twins."""
    token_slots, x, a, b, y, parts = _case(256, 4, 1024, [2048, 1024, 1024], 16, 16,
                                           torch.bfloat16, torch.device("cuda"), seed=5)
    batch = _batch(token_slots, torch.device("cuda"))
    want = shrink(x, a, batch, impl="torch")
    got = shrink(x, a, batch, impl="triton")
    torch.testing.assert_close(got[batch.tokens], want[batch.tokens], rtol=2e-2, atol=2e-2)
    y_want, y_got = y.clone(), y.clone()
    expand(want, b, y_want, batch, parts, 16, impl="torch")
    expand(want, b, y_got, batch, parts, 16, impl="triton")
    torch.testing.assert_close(y_got.float(), y_want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES + WIDE, ids=[f"t{c[0]}-a{c[1]}-r{c[5]}" for c in CASES + WIDE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_kernels_match_the_twins(case, dtype):
    """The CUDA C++ kernels (compiled here with nvcc) against the twins: fp32 within
    summation order, bf16 within its rounding; untouched rows stay untouched."""
    tokens, used, k, parts, max_rank, rank = case
    dev = torch.device("cuda")
    token_slots, x, a, b, y, expand_parts = _case(tokens, used, k, parts, max_rank, rank,
                                                  dtype, dev, seed=tokens + 1)
    batch = _batch(token_slots, dev)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    want = shrink(x, a, batch, impl="torch")
    got = shrink(x, a, batch, impl="cuda")
    torch.testing.assert_close(got[batch.tokens], want[batch.tokens], **tol)
    free = [t for t, s in enumerate(token_slots) if s < 0]
    y_want, y_got = y.clone(), y.clone()
    expand(want, b, y_want, batch, expand_parts, rank, impl="torch")
    expand(want, b, y_got, batch, expand_parts, rank, impl="cuda")
    torch.testing.assert_close(y_got.float(), y_want.float(), **tol)
    assert torch.equal(y_got[free], y[free])
    assert ops._cuda_failure is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_validation_command_passes_on_gpu(capsys):
    from novainfer.lora import validate

    assert validate.main(["--preset", "qwen3-0.6b"]) == 0
    assert "CUDA matches Triton" in capsys.readouterr().out


@pytest.fixture
def kernel_env(monkeypatch):
    """Clean kernel switches and no recorded CUDA failure, before and after."""
    for name in ("FORCE_TRITON_LORA", "VALIDATE_LORA"):
        for prefix in ("NOVAINFER_", "VLLM_"):
            monkeypatch.delenv(prefix + name, raising=False)
    for name in ("LORA_CUDA_MAX_TOKENS", "LORA_FUSION_MAX_TOKENS"):
        monkeypatch.delenv("NOVAINFER_" + name, raising=False)
    monkeypatch.setattr(ops, "_cuda_failure", None)
    switches.lora_settings.cache_clear()
    yield monkeypatch
    switches.lora_settings.cache_clear()


class _OnCuda:
    """A step's activations on CUDA, as far as the kernel choice looks: tokens x features."""

    is_cuda = True

    def __init__(self, tokens: int = 1) -> None:
        self.shape = (tokens, 8)


def test_using_overrides_the_choice(kernel_env):
    with ops.using("triton"):
        assert ops.choose_impl(torch.zeros(1)) == "triton"
        with ops.using("cuda"):
            assert ops.choose_impl(torch.zeros(1)) == "cuda"
        assert ops.choose_impl(torch.zeros(1)) == "triton"
    assert ops.choose_impl(torch.zeros(1)) == "torch"
    with pytest.raises(ValueError, match="impl must be"), ops.using("cutlass"):
        pass


def test_kernel_choice_follows_the_switches(kernel_env):
    assert ops.choose_impl(torch.zeros(1)) == "torch"
    assert ops.choose_impl(_OnCuda()) == "cuda"
    kernel_env.setenv("VLLM_FORCE_TRITON_LORA", "1")  # seed 000's spelling
    switches.lora_settings.cache_clear()
    assert ops.choose_impl(_OnCuda()) == "triton"
    kernel_env.setenv("NOVAINFER_FORCE_TRITON_LORA", "0")  # ours wins over the alias
    switches.lora_settings.cache_clear()
    assert ops.choose_impl(_OnCuda()) == "cuda"


def test_long_steps_take_triton(kernel_env):
    """The CUDA kernels (matrix-vector products) serve steps up to the measured limit, the
    Triton tiles the longer ones (prefills); the limit can be moved, and a bad one is an
    error naming the variable."""
    limit = switches.CUDA_MAX_TOKENS
    assert ops.choose_impl(_OnCuda(limit)) == "cuda"
    assert ops.choose_impl(_OnCuda(limit + 1)) == "triton"
    kernel_env.setenv("NOVAINFER_LORA_CUDA_MAX_TOKENS", "4")
    switches.lora_settings.cache_clear()
    assert [ops.choose_impl(_OnCuda(n)) for n in (4, 5)] == ["cuda", "triton"]
    kernel_env.setenv("NOVAINFER_LORA_CUDA_MAX_TOKENS", "many")
    switches.lora_settings.cache_clear()
    with pytest.raises(ValueError, match="NOVAINFER_LORA_CUDA_MAX_TOKENS must be"):
        ops.choose_impl(_OnCuda())


def test_auto_fusion_follows_the_step_length(kernel_env):
    """fuse="auto": steps up to the limit take the fused matmul, longer ones the traditional
    path over the same buffer (the layer's weight and A are views of it); both give the
    twins' answer."""
    from novainfer.layers.linear import QKVLinear
    from novainfer.lora.layers import LoRASlots, LoRAState

    kernel_env.setenv("NOVAINFER_LORA_FUSION_MAX_TOKENS", "6")
    switches.lora_settings.cache_clear()
    torch.manual_seed(5)
    layer = QKVLinear(32, 4, 2, 8, False)
    torch.nn.init.normal_(layer.weight, std=0.2)
    weight = layer.weight.detach().clone()
    state = LoRAState()
    slots = layer.lora = LoRASlots(layer, state, 2, 4, fuse="auto")
    assert layer.weight.data_ptr() == slots.buffer.data_ptr()
    slots.a.normal_(std=0.2)
    slots.b.normal_(std=0.2)
    for tokens, fused in ((6, True), (7, False)):
        x = torch.randn(tokens, 32)
        state.batch = _batch([i % 3 - 1 for i in range(tokens)], "cpu")
        assert slots.takes_over(x) == fused
        want = x @ weight.T
        for t in range(tokens):
            slot = t % 3 - 1
            if slot >= 0:
                for y0, size, s0 in slots.expand_parts:
                    a = slots.a[slot, s0 : s0 + 4]
                    want[t, y0 : y0 + size] += (x[t] @ a.T) @ slots.b[slot, y0 : y0 + size].T
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fuse must be"):
        LoRASlots(layer, state, 2, 4, fuse=True)


def _fp32_case():
    token_slots, x, a, b, y, parts = _case(37, 3, 80, [64, 16, 16], 16, 8, torch.float32, DEV,
                                           seed=3)
    return _batch(token_slots, DEV), x, a, b, y, parts


def test_a_failing_cuda_kernel_warns_and_triton_takes_over(kernel_env):
    from novainfer.kernels import lora_cuda

    def broken(*args):
        raise RuntimeError("nvcc: not found")

    kernel_env.setattr(lora_cuda, "load", broken)
    batch, x, a, b, y, parts = _fp32_case()
    with pytest.warns(RuntimeWarning, match="CUDA LoRA kernel failed.*nvcc: not found"):
        got = shrink(x, a, batch, impl="cuda")
    want = shrink(x, a, batch, impl="torch")
    torch.testing.assert_close(got[batch.tokens], want[batch.tokens], rtol=1e-5, atol=1e-5)
    assert ops.choose_impl(_OnCuda()) == "triton"  # for the rest of the process
    y_got, y_want = y.clone(), y.clone()  # a failure midway leaves y as it was, then Triton
    expand(got, b, y_got, batch, parts, 8, impl="cuda")
    expand(got, b, y_want, batch, parts, 8, impl="torch")
    torch.testing.assert_close(y_got, y_want, rtol=1e-5, atol=1e-5)


def _stand_in(op: str, error: float = 0.0, nan: bool = False):
    """A CUDA kernel stand-in: Triton's result, off by `error` on the first token written."""
    from novainfer.kernels import lora as lora_triton

    def run(*args):
        getattr(lora_triton, f"lora_{op}_triton")(*args)
        out, first = args[2], int(args[3][0])
        out[first, 0] += float("nan") if nan else error

    return run


@pytest.mark.parametrize("op", ["shrink", "expand"])
def test_validation_mode_compares_cuda_with_triton(kernel_env, op):
    from novainfer.kernels import lora_cuda

    kernel_env.setenv("NOVAINFER_VALIDATE_LORA", "1")
    switches.lora_settings.cache_clear()
    batch, x, a, b, y, parts = _fp32_case()
    shrunk = shrink(x, a, batch, impl="torch")

    def call():
        if op == "shrink":
            return shrink(x, a, batch, impl="cuda")
        out = y.clone()
        expand(shrunk, b, out, batch, parts, 8, impl="cuda")
        return out

    kernel_env.setattr(lora_cuda, f"lora_{op}_cuda", _stand_in(op))
    call()  # agrees: no error
    kernel_env.setattr(lora_cuda, f"lora_{op}_cuda", _stand_in(op, error=5.0))
    with pytest.raises(ops.LoRAValidationError, match=f"LoRA {op}: .*largest difference 5"):
        call()
    kernel_env.setattr(lora_cuda, f"lora_{op}_cuda", _stand_in(op, nan=True))
    with pytest.raises(ops.LoRAValidationError, match="NaN or Inf"):
        call()
    assert ops._cuda_failure is None  # a disagreement is an error, not a fallback


def test_validation_command_needs_a_gpu(capsys):
    from novainfer.lora import validate

    if torch.cuda.is_available():
        pytest.skip("checks the message without a GPU")
    assert validate.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err



def test_fusion_benchmark_smoke(capsys):
    """benchmarks/lora_fusion.py --quick on the CPU: both paths agree, the table prints."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lora_fusion.py"
    spec = importlib.util.spec_from_file_location("novainfer_lora_fusion", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--device", "cpu", "--json"]) == 0
    out = capsys.readouterr().out
    assert "| batch | seq | rank | max_loras | torch traditional | torch fused | torch speedup |" in out
    rows = json.loads(out.strip().splitlines()[-1])
    assert len(rows) == 2 and all(r["same_output"] and r["torch"]["fused_ms"] > 0 for r in rows)
