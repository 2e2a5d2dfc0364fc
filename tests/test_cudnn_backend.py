"""The `cudnn` attention backend: the pure-prefill rule, the registry's reasons, the routing
(on the CPU: SDPA's math kernel stands in for cuDNN, the Triton kernels run interpreted), and
`benchmarks/ab.py attention` as a command. The `gpu` tests at the end run cuDNN itself.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from conftest import make_paged_batch
from torch.nn.attention import SDPBackend

from novainfer.layers.attention import available_backends, get_backend
from novainfer.layers.attention import backend as registry
from novainfer.layers.attention.metadata import AttentionMetadata
from novainfer.layers.attention.sdpa_prefill import equal_length_runs, is_pure_prefill
from novainfer.layers.attention.torch_ref import TorchReferenceBackend

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")  # a label only, unless a test is marked gpu
CPU = torch.device("cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or not (torch.cuda.is_available() or INTERPRET),
    reason="needs triton (on CUDA, or TRITON_INTERPRET=1 on the CPU)",
)


def _fresh(meta: AttentionMetadata) -> AttentionMetadata:
    return AttentionMetadata(**{**meta.__dict__, "backend_cache": {}})


# ----------------------------------------------------------------------------- pure prefill

# (query_lens, seq_lens) as the runner orders a step: decodes first.
STEPS = {
    "fresh": (([7, 20, 5], [7, 20, 5]), True),
    "cached_prefix": (([7, 4], [7, 20]), False),  # a prefix-cache hit / a later chunk
    "mixed": (([1, 1, 9], [30, 2, 9]), False),  # decodes + a fresh prefill
    "decodes_only": (([1, 1], [5, 9]), False),
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_pure_prefill_rule(step):
    (query_lens, seq_lens), expected = STEPS[step]
    *_, meta = make_paged_batch(query_lens, seq_lens, 4, 2, 16, 16)
    assert is_pure_prefill(meta) is expected


def test_equal_length_runs():
    assert equal_length_runs([4, 4, 4, 7, 4, 4]) == [(3, 4), (1, 7), (2, 4)]
    assert equal_length_runs([]) == []


# ----------------------------------------------------------------------------- registry


def test_registry_refuses_cudnn_with_the_reason(monkeypatch):
    if not torch.cuda.is_available():  # the triton fp8 check asks; a CPU torch cannot answer
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))

    def refused(match, *args, **kwargs):
        with pytest.raises(ValueError, match=r"attention_backend 'cudnn' is not available: .*"
                                             + match + r".*; allowed: auto, "):
            get_backend("cudnn", *args, **kwargs)

    refused("it needs a CUDA device", CPU, 128, 16, torch.bfloat16)
    refused("no fp8 KV cache", CUDA, 128, 16, torch.bfloat16, torch.float8_e4m3fn)
    if HAS_TRITON:
        refused("float16 / bfloat16 only, got dtype torch.float32", CUDA, 128, 16, torch.float32)
        refused(r"head_dim a power of two from 16 to 128 .*got 96", CUDA, 96, 16, torch.float16)
        refused("got 8", CUDA, 8, 16, torch.float16)
        if not torch.cuda.is_available():
            refused("CUDA is not available", CUDA, 128, 16, torch.bfloat16)


def test_registry_lists_cudnn_after_triton(monkeypatch):
    """Where it could run it is listed (for the error messages), but never first: "auto"
    keeps triton until a measurement says otherwise."""
    monkeypatch.setattr(registry, "_cudnn_problem", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    names = available_backends(CUDA, 128, 16, torch.bfloat16)
    if HAS_TRITON:
        assert names[:2] == ["triton", "cudnn"]
    assert names[0] != "cudnn"
    assert "cudnn" not in available_backends(CUDA, 128)  # dtype unknown: not offered


# ----------------------------------------------------------------------------- routing (CPU)


@needs_triton
@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)])
def test_backend_matches_reference_and_routes(monkeypatch, step, num_heads, num_kv_heads):
    """Pure prefills go to SDPA (math here, cuDNN on the GPU) and every other step to the
    Triton kernels; either way the cache is written as the reference writes it."""
    from novainfer.layers.attention import cudnn_backend

    calls = []

    def counting(*args, **kwargs):
        calls.append(args[-1])
        return real(*args, **kwargs)

    real = cudnn_backend.sdpa_prefill
    monkeypatch.setattr(cudnn_backend, "sdpa_prefill", counting)
    (query_lens, seq_lens), pure = STEPS[step]
    q, k, v, cache, meta = make_paged_batch(query_lens, seq_lens, num_heads, num_kv_heads, 32,
                                            16, num_pad_tokens=2, seed=3)
    cache_ref = cache.clone()
    ref = TorchReferenceBackend().forward(q, k, v, cache_ref, _fresh(meta), 32**-0.5)
    backend = cudnn_backend.CudnnBackend()
    backend.sdp_backend = SDPBackend.MATH
    out = backend.forward(q, k, v, cache, meta, 32**-0.5)
    backend.forward(q, k, v, cache.clone(), meta, 32**-0.5)  # a second layer of the step
    n = sum(query_lens)
    assert torch.equal(cache, cache_ref)
    torch.testing.assert_close(out[:n], ref[:n], atol=2e-5, rtol=1e-4)
    assert calls == [SDPBackend.MATH] * 2 * pure
    assert meta.backend_cache["cudnn_pure_prefill"] is pure
    # The fused rope + store kernel (models/decoder.py) may store first and then `attend`
    # on every step but a pure prefill, whose SDPA attention takes the new K/V directly.
    assert backend.attends_to_stored_kv(_fresh(meta)) is not pure


# ----------------------------------------------------------------------------- ab.py attention


@needs_triton
def test_ab_attention_runs_on_the_cpu():
    """The CPU smoke run: exit 0, both tables, the Triton kernels checked against float32
    (interpreted), and the GPU-only kernels listed once with their reason."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ab.py"), "attention", "--quick", "--device",
         "cpu", "--batch", "1,2", "--seq-len", "16", "--repeats", "2",
         "--impls", "triton,sdpa-cudnn,sdpa-flash,sdpa-math", "--json"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "### prefill" in out and "### decode" in out
    assert "| batch | seq len | triton | sdpa-flash | sdpa-math | fastest |" in out
    assert out.count("- sdpa-cudnn: SDPA has no CUDNN_ATTENTION kernel on cpu") == 1
    import json

    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["cells"]) == 4 and not result["mismatches"]
    for cell in result["cells"]:
        assert set(cell["results"]) == {"triton", "sdpa-flash", "sdpa-math"}
        assert all(r["max_abs_diff"] < 1e-4 for r in cell["results"].values())


def test_ab_attention_rejects_unknown_names():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ab.py"), "attention", "--impls", "sdpa-x"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2 and "unknown mode or implementation ['sdpa-x']" in proc.stderr


# ----------------------------------------------------------------------------- GPU (cuDNN)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(16, 8), (32, 8)])
def test_gpu_cudnn_prefill_matches_reference(dtype, num_heads, num_kv_heads):
    """A pure-prefill step through cuDNN: within the dtype's tolerance of float32."""
    dev = torch.device("cuda")
    backend = get_backend("cudnn", dev, 128, 16, dtype)
    lens = [300, 300, 17, 1024]  # two equal lengths: one batched SDPA call for them
    q, k, v, cache, meta = make_paged_batch(lens, lens, num_heads, num_kv_heads, 128, 16, seed=4)
    q, k, v, cache = (t.to(dev, dtype) for t in (q, k, v, cache))
    for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        setattr(meta, name, getattr(meta, name).to(dev))
    cache_ref = cache.float()
    ref = TorchReferenceBackend().forward(q.float(), k.float(), v.float(), cache_ref,
                                          _fresh(meta), 128**-0.5)
    out = backend.forward(q, k, v, cache, meta, 128**-0.5)
    assert meta.backend_cache["cudnn_pure_prefill"]
    assert torch.equal(cache.float(), cache_ref)
    tolerance = 3e-2 if dtype == torch.bfloat16 else 5e-3
    assert float((out.float() - ref).abs().max()) <= tolerance


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama_untied", "qwen3"])
def test_gpu_engine_greedy_tokens_match_triton(checkpoint, monkeypatch, name, tmp_path):
    """fp16 engine, CUDA graphs on: cudnn's greedy tokens are triton's. The first batch is a
    pure prefill (cuDNN); the second reuses the first's cached prefix and decodes (Triton).
    The checkpoint's o_proj/down_proj are scaled back to a 1/sqrt(fan_in) init (as in the
    bf16 tests of tests/test_gpu_e2e.py): the random init's near-ties otherwise let one
    rounding difference of the fused ops flip a token (seen once on an H200, 2026-12-02)."""
    from conftest import completion_tokens, random_prompts
    from test_gpu_e2e import _calm_copy

    from novainfer import LLM, SamplingParams
    from novainfer.layers.attention import cudnn_backend

    calls = []
    real = cudnn_backend.sdpa_prefill
    monkeypatch.setattr(cudnn_backend, "sdpa_prefill",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model_dir = _calm_copy(checkpoint(name), tmp_path)
    long_prompt, other = random_prompts([100, 40], seed=11)
    batches = [[long_prompt, *random_prompts([5, 64, 33], seed=12)],
               [long_prompt[:64] + other, *random_prompts([17, 2], seed=13)]]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    tokens = {}
    for backend in ("triton", "cudnn"):
        llm = LLM(str(model_dir), device="cuda", dtype="float16", attention_backend=backend,
                  max_model_len=512, max_num_seqs=8, num_kv_blocks=256)
        assert llm.llm_engine.runner.backend.name == backend
        assert llm.llm_engine.runner.graphs is not None
        tokens[backend] = [completion_tokens(llm.generate(b, params, use_tqdm=False))
                           for b in batches]
        del llm
    assert calls, "no step took the cuDNN path"
    assert tokens["cudnn"] == tokens["triton"]
