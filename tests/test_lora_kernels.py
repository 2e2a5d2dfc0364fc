"""The Triton LoRA shrink and expand kernels against their PyTorch twins (lora/ops.py) on
random inputs: tokens of several adapters interleaved, tokens without one (never touched),
a rank below the slots' R, sizes that are not multiples of the blocks, a single token,
fused parts (q/k/v). Interpreted on the CPU in fp32 (TRITON_INTERPRET=1); compiled on a GPU,
where the `gpu` test adds bf16 at a realistic size."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

pytest.importorskip("triton")

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


@pytest.mark.parametrize("case", CASES, ids=[f"t{c[0]}-a{c[1]}-k{c[2]}" for c in CASES])
def test_triton_matches_the_pytorch_twins(case):
    tokens, used, k, parts, max_rank, rank = case
    token_slots, x, a, b, y, expand_parts = _case(tokens, used, k, parts, max_rank, rank,
                                                  torch.float32, DEV, seed=tokens)
    batch = _batch(token_slots, DEV)
    want = shrink(x, a, batch, triton=False)
    got = shrink(x, a, batch, triton=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    free = [t for t, s in enumerate(token_slots) if s < 0]
    assert not got[free].any()  # tokens without an adapter: never written
    y_want, y_got = y.clone(), y.clone()
    expand(want, b, y_want, batch, expand_parts, rank, triton=False)
    expand(want, b, y_got, batch, expand_parts, rank, triton=True)
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
    want = shrink(x, a, batch, triton=False)
    got = shrink(x, a, batch, triton=True)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    y_want, y_got = y.clone(), y.clone()
    expand(want, b, y_want, batch, parts, 16, triton=False)
    expand(want, b, y_got, batch, parts, 16, triton=True)
    torch.testing.assert_close(y_got.float(), y_want.float(), rtol=2e-2, atol=2e-2)



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
    assert "| batch | seq | rank | max_loras | traditional | fused | speedup |" in out
    rows = json.loads(out.strip().splitlines()[-1])
    assert len(rows) == 2 and all(r["same_output"] and r["fused_ms"] > 0 for r in rows)
