"""`novainfer bench --strict` (novainfer/bench_strict.py): a timed round that compiles,
takes new device memory or produces another token total than expected fails the bench."""

from __future__ import annotations

import json

import pytest
import torch

from novainfer import bench, cli
from novainfer.bench_strict import SMALL_BLOCK, CompileWatch, StrictCheck, reserve_small_pool

TINY = ["bench", "--preset", "tiny", "--device", "cpu", "--num-seqs", "3",
        "--max-input-len", "30", "--max-output-len", "5", "--json"]


def test_a_clean_cpu_run_passes(capsys):
    assert cli.main([*TINY, "--strict", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["strict"]["ok"] and len(result["strict"]["rounds"]) == 2
    assert not result["strict"]["memory_checked"]
    assert "strict: ok" in out and "not checked on the CPU" in out


def test_a_wrong_token_total_fails(capsys, monkeypatch):
    real = bench.make_workload

    class Short(bench.Workload):  # expects one token more than the requests can make
        @property
        def output_tokens(self) -> int:
            return sum(self.max_tokens) + 1

    def make(*args, **kwargs):
        w = real(*args, **kwargs)
        return Short(w.prompts, w.max_tokens)

    monkeypatch.setattr(bench, "make_workload", make)
    assert cli.main([*TINY, "--strict"]) == 1
    captured = capsys.readouterr()
    assert "strict: FAILED" in captured.out
    assert "timed round 1 of 1: produced" in captured.err and "expected" in captured.err
    with pytest.raises(RuntimeError, match="produced .* tokens, expected"):
        cli.main(TINY)  # without --strict the mismatch still stops the bench


def test_a_compile_inside_a_round_is_named():
    check = StrictCheck()
    compiled = torch.compile(lambda x: x * 3 + 1, backend="eager", dynamic=True)
    with check.round(4) as r:
        compiled(torch.randn(5))
        r.produced = 4
    with check.round(4) as r:  # the same call again: a cache hit, nothing compiles
        compiled(torch.randn(7))
        r.produced = 4
    (violation,) = check.violations()
    assert violation.startswith("timed round 1 of 2: 1 compile(s): torch.compile frame")
    assert [r["compiles"] for r in check.summary()["rounds"]] == [1, 0]


def test_a_triton_cache_miss_is_named_and_the_hook_restored():
    triton = pytest.importorskip("triton")
    knobs = getattr(triton, "knobs", None)
    owner, name = ((knobs.runtime, "jit_cache_hook") if knobs is not None
                   else (triton.runtime.jit.JITFunction, "cache_hook"))
    seen = []
    before = getattr(owner, name)

    def theirs(*args, **kwargs):
        seen.append(kwargs["repr"])
        return False

    setattr(owner, name, theirs)
    try:
        with CompileWatch() as watch:
            # What triton's JITFunction does on a miss of its in-memory kernel cache.
            fn = type("Info", (), {"name": "_rms_norm_kernel"})()
            assert not getattr(owner, name)(key="k", repr="_rms_norm_kernel[...]", fn=fn)
        assert watch.events == ["Triton JIT compile of _rms_norm_kernel"]
        assert seen == ["_rms_norm_kernel[...]"]  # chained to the hook that was there
        assert getattr(owner, name) is theirs
    finally:
        setattr(owner, name, before)


def test_new_device_memory_is_reported():
    counters = iter([
        {"segment.all.allocated": 10, "num_alloc_retries": 0, "allocation.all.allocated": 100},
        {"segment.all.allocated": 12, "num_alloc_retries": 1, "allocation.all.allocated": 900},
        {"segment.all.allocated": 12, "num_alloc_retries": 1, "allocation.all.allocated": 950},
        {"segment.all.allocated": 12, "num_alloc_retries": 1, "allocation.all.allocated": 999},
    ])
    check = StrictCheck(memory_stats=lambda: next(counters))
    for _ in range(2):
        with check.round(8) as r:
            r.produced = 8
    assert check.violations() == [
        "timed round 1 of 2: allocated device memory: 2 new segment(s) (cudaMalloc)",
        ("timed round 1 of 2: allocated device memory: 1 allocation retries (cache flushed, "
         "cudaMalloc again)"),
    ]  # tensors from the allocator's cache (allocation.all.allocated) are not counted
    assert check.summary()["rounds"][1] == {"compiles": 0, "segment.all.allocated": 0,
                                            "num_alloc_retries": 0, "produced": 8,
                                            "expected": 8}


def test_the_small_pool_reserve_holds_its_blocks_at_once_then_frees_them():
    """`reserve_small_pool` takes `mib` small-pool-sized blocks alive together (so the
    allocator must cache that many segments), then lets every one go."""
    import weakref

    made = []

    def empty(size, dtype, device):
        assert size == SMALL_BLOCK and dtype == torch.uint8 and device == torch.device("cpu")
        assert all(ref() is not None for ref in made)  # the earlier blocks still alive
        t = torch.empty(size, dtype=dtype, device=device)
        made.append(weakref.ref(t))
        return t

    reserve_small_pool(torch.device("cpu"), 5, empty=empty)
    assert len(made) == 5 and all(ref() is None for ref in made)
    assert SMALL_BLOCK <= 1 << 20  # PyTorch's kSmallSize: larger goes to the large pool


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_small_tensors_after_the_reserve_take_no_new_segment():
    dev = torch.device("cuda")
    torch.cuda.empty_cache()  # no cached small blocks left from earlier tests to lean on
    reserve_small_pool(dev, 8)
    before = torch.cuda.memory_stats(dev)["segment.all.allocated"]
    keep = [torch.empty(SMALL_BLOCK // 2, dtype=torch.uint8, device=dev) for _ in range(16)]
    assert torch.cuda.memory_stats(dev)["segment.all.allocated"] == before
    del keep


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_a_real_triton_compile_and_a_new_segment_are_caught():
    import triton
    import triton.language as tl

    @triton.jit
    def _fresh_kernel(X, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(X + offs, tl.load(X + offs) + 1)

    x = torch.zeros(16, device="cuda")
    check = StrictCheck.for_device(torch.device("cuda"))
    with check.round(0) as r:
        _fresh_kernel[(1,)](x, N=16)
        r.produced = 0
    with check.round(0) as r:
        _fresh_kernel[(1,)](x, N=16)  # cached: no compile
        r.produced = 0
    with check.round(0) as r:
        big = torch.empty(3 << 30, dtype=torch.uint8, device="cuda")  # a new segment
        r.produced = 0
    del big
    violations = check.violations()
    assert any(v.startswith("timed round 1 of 3: 1 compile(s): Triton JIT compile of")
               and "_fresh_kernel" in v for v in violations), violations
    assert not any(v.startswith("timed round 2") for v in violations), violations
    assert any(v.startswith("timed round 3 of 3: allocated device memory") for v in violations)


def test_warm_up_fills_the_largest_steps(checkpoint):
    """The CUDA bench's extra warm-up: one prefill of the whole token budget (distinct
    prompts, no prefix sharing) and one decode step of max_num_seqs rows."""
    from conftest import make_llm

    llm = make_llm(checkpoint("llama"), kv_cache_memory=8 << 20, max_num_seqs=8,
                   max_num_batched_tokens=64)
    engine = llm.llm_engine
    before = engine.num_steps
    bench.warm_up_largest_steps(llm, 8, 64, engine.max_model_len)
    assert engine.num_steps - before == 2  # 8 x 8 prompt tokens in one step, then 8 decodes
