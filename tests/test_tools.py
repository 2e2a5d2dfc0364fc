"""novainfer trace / profile, step timing and benchmarks/ab.py (all on the CPU, tiny models)."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import completion_tokens, make_llm, random_prompts

from novainfer import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()
    )


# ---------------------------------------------------------------------------- trace


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_trace_counts_shapes_and_cleanup(checkpoint, name):
    from novainfer.tools.trace import trace_generation

    llm = make_llm(checkpoint(name), enforce_eager=True)
    cfg = llm.llm_engine.model_config
    L, H = cfg.num_layers, cfg.hidden_size
    prompt = random_prompts([7], seed=3)[0]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    before = completion_tokens(llm.generate([prompt], params, use_tqdm=False))
    result = trace_generation(llm, prompt, params)
    after = completion_tokens(llm.generate([prompt], params, use_tqdm=False))
    assert before == after  # tracing does not change results
    model = llm.llm_engine.runner.model
    assert _no_hooks(model)
    assert "forward" not in vars(llm.llm_engine.runner.backend)

    assert result.num_forwards == 5  # one prefill + 4 decodes
    counts = result.type_counts(0)
    qk = 2 * L if cfg.qk_norm else 0
    assert counts["RMSNorm"] == 2 * L + 1 + qk
    assert counts["SelfAttention"] == L
    assert counts["MLP"] == L
    assert counts["DecoderLayer"] == L
    assert counts["QKVLinear"] == L and counts["MergedLinear"] == L
    assert counts["RowParallelLinear"] == 2 * L  # o_proj + down_proj
    assert counts["RotaryEmbedding"] == L  # shared module, called once per layer
    assert counts["LMHead"] == 1 and counts["Embedding"] == 1
    backend = type(llm.llm_engine.runner.backend).__name__  # CpuBackend, or the reference
    assert counts[backend] == L
    # every forward sees the same calls; the total is forwards x per-forward
    assert sum(result.type_counts(None).values()) == 5 * sum(counts.values())

    # shapes: prefill of 7 tokens, then decodes of 1
    layer = result.layer_calls(0)
    names = [c.name.split("layers.0.", 1)[-1] for c in layer]
    # the layer runs q/k/v's projection after the norm (one kernel at batch 1 on CUDA), then
    # the attention on its output
    assert names[:4] == ["model.layers.0", "input_layernorm", "self_attn.qkv_proj", "self_attn"]
    by = {c.name.split("layers.0.", 1)[-1]: c for c in layer}
    # the first norm takes the embedding's rows (the residual stream starts there) and
    # returns (normed, residual), as every norm of the residual stream does
    assert by["input_layernorm"].inputs == [[7, H]]
    assert by["input_layernorm"].outputs == [[7, H], [7, H]]
    qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    assert by["self_attn.qkv_proj"].outputs == [7, qkv_out]
    # the second norm takes the residual too and returns (normed, residual)
    assert by["post_attention_layernorm"].inputs == [[7, H], [7, H]]
    assert by["post_attention_layernorm"].outputs == [[7, H], [7, H]]
    assert by["mlp.gate_up_proj"].outputs == [7, 2 * cfg.intermediate_size]
    # the shared rotary module is named after the layer that called it
    assert any(c.name == "model.layers.1.self_attn.rotary" for c in result.forward_calls(0))
    dec = [c for c in result.forward_calls(1) if c.name.endswith("layers.0.input_layernorm")]
    assert dec[0].inputs == [[1, H]]


def test_trace_cli_json(checkpoint, tmp_path, capsys):
    from novainfer.cli import main

    out = tmp_path / "trace.json"
    rc = main(["trace", "--model", str(checkpoint("llama")), "--device", "cpu", "--max-tokens", "2",
               "--detail", "--filter", "RMSNorm,Attention", "--output", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "2L+1" in text and "model.layers.0.input_layernorm" in text
    data = json.loads(out.read_text())
    assert data["type_counts_first_forward"]["RMSNorm"] == 5
    assert data["num_forwards"] == 2


# ---------------------------------------------------------------------------- profile


def test_profile_cpu_writes_files_and_categories_add_up(checkpoint, tmp_path, capsys):
    from novainfer.cli import main
    from novainfer.tools.profile import CATEGORIES, collect_records, profile_engine, summarize

    out = tmp_path / "prof"
    rc = main(["profile", "--model", str(checkpoint("llama")), "--device", "cpu", "--steps", "4",
               "--num-seqs", "2", "--prompt-len", "24", "--output-dir", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "time by category" in text and "novainfer/layers/norm.py" in text
    assert (out / "profiler_report.txt").stat().st_size > 0
    trace = json.loads((out / "trace.json").read_text())
    assert trace["traceEvents"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "categories.png").read_bytes()[:4] == b"\x89PNG"

    llm = make_llm(checkpoint("llama"), enforce_eager=True)
    prof, info = profile_engine(llm, num_seqs=2, prompt_len=24, steps=3)
    assert info["step_kinds"]["prefill/mixed"] >= 1 and info["step_kinds"]["decode"] >= 1
    summary = summarize(collect_records(prof.events(), cuda=False))
    cats = summary["categories"]
    assert set(cats) == set(CATEGORIES)
    assert sum(c["total_ms"] for c in cats.values()) == pytest.approx(summary["total_ms"], rel=1e-9)
    assert abs(sum(c["share"] for c in cats.values()) - 1) < 1e-9
    for must in ("GEMM", "norm", "attention", "sampling", "KV-cache write", "rotary", "activation"):
        assert cats[must]["total_ms"] > 0, must
    assert _no_hooks(llm.llm_engine.runner.model)
    assert llm.llm_engine.step_timer is None


# ---------------------------------------------------------------------------- step timing


def test_step_timing_phases(checkpoint):
    from novainfer.engine.step_timer import PHASES

    llm = make_llm(checkpoint("llama"))
    engine = llm.llm_engine
    assert engine.step_timer is None and engine.runner.step_timer is None
    timer = engine.enable_step_timing()
    llm.generate(random_prompts([9, 5], seed=1), SamplingParams(max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    assert len(timer.steps) == engine.num_steps
    for s in timer.steps:
        assert set(s.phases) == set(PHASES)
        assert sum(s.phases.values()) <= s.total + 1e-9
        assert sum(s.phases.values()) > 0.9 * s.total
    summary = timer.summary()
    assert summary["steps"] == len(timer.steps)
    assert summary["by_kind"]["decode"]["steps"] >= 3
    assert sum(p["share"] for p in summary["phases"].values()) == pytest.approx(
        1 - summary["unaccounted_s"] / summary["wall_s"])
    engine.disable_step_timing()
    assert engine.runner.step_timer is None


def test_step_timing_env_and_cli(checkpoint, monkeypatch, capsys):
    from novainfer.cli import main

    monkeypatch.setenv("NOVAINFER_STEP_TIMING", "1")
    llm = make_llm(checkpoint("llama"))
    assert llm.llm_engine.step_timer is not None
    monkeypatch.delenv("NOVAINFER_STEP_TIMING")
    rc = main(["generate", "hello world", "--model", str(checkpoint("llama")), "--device", "cpu",
               "--max-tokens", "3", "--step-timing"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "step timing:" in err and "forward" in err and "p99 ms" in err


# ---------------------------------------------------------------------------- ab.py


def _load_ab():
    spec = importlib.util.spec_from_file_location("novainfer_ab", ROOT / "benchmarks" / "ab.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _timed(seconds):
    def fn():
        pass

    fn.seconds = seconds
    return fn


def _fake_timer(rng):
    """time_calls stand-in: each run takes the op's nominal time with 5% gaussian jitter and,
    one run in ten, a 50% stall (another process on the core): a loaded CI box, but
    reproducible, so the test checks the statistics and not the machine."""

    def time_calls(fn, device, n, inner):
        return [fn.seconds * (1 + 0.05 * rng.gauss(0, 1)) * (1.5 if rng.random() < 0.1 else 1)
                for _ in range(n)]

    return time_calls


def test_ab_reports_the_faster_side_and_no_false_regressions(tmp_path, monkeypatch):
    ab = _load_ab()
    rng = random.Random(0)
    monkeypatch.setattr(ab, "time_calls", _fake_timer(rng))
    comps = {
        "toy": ab.Comparison("toy", "slow", "fast", lambda *_: (_timed(1.2e-3), _timed(0.8e-3))),
        "same": ab.Comparison("same", "same-a", "same-b", lambda *_: (_timed(4e-4),) * 2),
    }
    rc = ab.main(["toy", "same", "--batch", "1,2", "--seq-len", "8,16", "--warmup", "1",
                  "--repeats", "20", "--device", "cpu", "--out", str(tmp_path)], comps)
    assert rc == 0
    toy = json.loads((tmp_path / "toy.json").read_text())["summary"]
    assert toy["winner"] == "B"
    assert toy["significant_wins"] == 4 and toy["regressions"] == []
    assert 25 < toy["mean_improvement_pct"] < 40  # 1.2 -> 0.8 ms is 33% saved
    same = json.loads((tmp_path / "same.json").read_text())["summary"]
    assert same["winner"] == "tie"
    md = (tmp_path / "toy.md").read_text()
    assert "| batch | seq len |" in md and "winner: **fast**" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "toy.png").read_bytes()[:4] == b"\x89PNG"

    # Equal ops over 100 cells: the noise floor must keep false calls rare (~2.5% a side).
    false_calls = 0
    for seed in range(25):
        rng.seed(seed)
        cell = {"batch": 1, "seq_len": 1}
        for _ in range(4):
            cell.update(ab.measure_cell(_timed(4e-4), _timed(4e-4), torch.device("cpu"), 0, 20, 1))
            false_calls += abs(cell["improvement_pct"]) > cell["noise_pct"]
    assert false_calls <= 6, f"{false_calls} of 100 equal-op cells called a difference"


def test_ab_shipped_comparisons_run():
    ab = _load_ab()
    assert {"qkv-split", "rmsnorm-residual"} <= set(ab.COMPARISONS)
    for name in ("qkv-split", "rmsnorm-residual"):
        fa, fb = ab.COMPARISONS[name].make(1, 8, torch.device("cpu"), torch.float32)
        a, b = fa(), fb()
        torch.testing.assert_close(a, b)  # the two sides compute the same thing
    result = ab.run_grid(ab.COMPARISONS["qkv-split"], [1], [8], torch.device("cpu"), torch.float32,
                         warmup=1, repeats=4, inner=2)
    assert len(result["cells"]) == 1 and "winner" in result["summary"]


def test_ab_fused_ops_table(tmp_path, monkeypatch):
    """fused-ops: every op x model x batch gets each variant's mean and sd; llama has no
    q/k norm. The fake timer makes eager 2 ms and the injected `triton` stand-in 1 ms."""
    ab = _load_ab()
    monkeypatch.setattr(ab, "time_calls", lambda fn, device, n, inner: [fn() for _ in range(n)])
    real = ab.fused_op_calls

    def calls(op, rows, model, device, dtype, variants):
        made = real(op, rows, model, device, dtype, ["eager"])
        if made is None:
            return None
        made["eager"]()  # the real op runs on these shapes
        return {"eager": lambda: 2e-3, "triton": lambda: 1e-3}

    monkeypatch.setattr(ab, "fused_op_calls", calls)
    assert ab.main(["fused-ops", "--batch", "1,3", "--repeats", "4", "--warmup", "1",
                    "--device", "cpu", "--variants", "eager,triton", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "fused-ops.json").read_text())
    assert len(result["cells"]) == 2 * (5 + 3)  # 5 ops for qwen3, 3 for llama (no q/k norm)
    assert {c["op"] for c in result["cells"] if c["model"] == "llama3-8b"} == {
        "add_rms_norm", "rms_norm", "silu_and_mul"}
    cell = result["cells"][0]
    assert cell["eager_ms"] == pytest.approx(2.0) and cell["triton_sd_ms"] == 0.0
    md = (tmp_path / "fused-ops.md").read_text()
    assert "| add_rms_norm | qwen3-0.6b | 1 | 2.0000 ± 0.0000 | 1.0000 ± 0.0000 | 2.00x |" in md
    assert "triton vs eager: mean speedup 2.00x" in md and "in 0 of 16 cells" in md
    with pytest.raises(SystemExit, match="unknown variant or model"):
        ab.main(["fused-ops", "--variants", "jit", "--device", "cpu", "--out", str(tmp_path)])


# ---------------------------------------------------------------------- run_breakdown.py


def _load_breakdown():
    spec = importlib.util.spec_from_file_location(
        "novainfer_run_breakdown", ROOT / "benchmarks" / "run_breakdown.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_breakdown_splits_the_device_timeline_at_step_markers():
    rb = _load_breakdown()
    K = rb.Kernel
    kernels = [
        K("spin_kernel(long)", 0, 1), K("nvjet_tst_128x64", 1, 3), K("_decode_split_kernel", 3, 7),
        K("_decode_reduce_kernel", 5, 8),  # launched early (PDL): only 7-8 is its own
        K("spin_kernel(long)", 10, 10.5), K("_rms_norm_kernel", 11, 12),
        K("Memcpy DtoH (Device -> Pinned)", 12, 13),
    ]
    random.Random(0).shuffle(kernels)  # the trace's order is not the timeline's
    infos = [rb.StepInfo(rows=200, prefill_tokens=0, context_tokens=1000),
             rb.StepInfo(rows=4, prefill_tokens=50, context_tokens=60)]
    steps = rb.split_steps(kernels, len(infos))
    assert [(s, e, [k.name[:4] for k in body]) for s, e, body in steps] == [
        (0, 10, ["nvje", "_dec", "_dec"]), (10, 13, ["_rms", "Memc"])]
    kinds, by_name = rb.breakdown(infos, steps, kv_bytes_per_token=2000)
    decode, prefill = kinds["decode 193-256"], kinds["prefill/mixed"]
    assert (decode["span"], decode["busy"], decode["idle"]) == (10, 7, 3)
    assert dict(decode["cats"]) == {"GEMM": 2, "attention": 5}
    assert decode["kv_TBps"] == pytest.approx(1000 * 2000 / 5e-6 / 1e12)
    assert by_name["_decode_reduce_kernel"] == 1
    assert (prefill["span"], prefill["busy"], prefill["idle"]) == (3, 2, 1)
    assert dict(prefill["cats"]) == {"norm": 1, "memcpy/memset": 1}
    assert by_name["_decode_split_kernel"] == 4
    table = rb.format_breakdown(kinds, by_name)
    assert table.splitlines()[2].startswith("prefill/mixed")  # prefill first, then decode
    assert "decode 193-256" in table and "_decode_split_kernel" in table
    with pytest.raises(RuntimeError, match="2 step markers .* for 3 launched steps"):
        rb.split_steps(kernels, 3)
    # spans timed apart (round 1): idle is that span less the profiled kernel time
    kinds, _ = rb.breakdown(infos, steps, kv_bytes_per_token=2000, spans=[12.0, 2.5])
    assert (kinds["decode 193-256"]["span"], kinds["decode 193-256"]["idle"]) == (12, 5)
    assert (kinds["prefill/mixed"]["span"], kinds["prefill/mixed"]["idle"]) == (2.5, 0.5)
    with pytest.raises(ValueError, match="1 timed spans for 2 profiled steps"):
        rb.breakdown(infos, steps, kv_bytes_per_token=2000, spans=[1.0])


def test_breakdown_step_info_counts_prompt_and_context_tokens():
    from types import SimpleNamespace as NS

    rb = _load_breakdown()
    seqs = [NS(num_prompt_tokens=100, num_computed_tokens=0),  # first chunk of a prompt
            NS(num_prompt_tokens=100, num_computed_tokens=120),  # decoding
            NS(num_prompt_tokens=100, num_computed_tokens=96)]  # the prompt's last chunk
    info = rb.step_info(NS(seqs=seqs, num_new_tokens=[64, 1, 4]))
    assert (info.rows, info.prefill_tokens, info.context_tokens) == (3, 68, 64 + 121 + 100)
    # after a preemption: generated tokens recomputed in one chunk are prefill work too
    again = rb.step_info(NS(seqs=[NS(num_prompt_tokens=10, num_computed_tokens=0)],
                            num_new_tokens=[30]))
    assert again.prefill_tokens == 30 and again.kind == "prefill/mixed"
    # the last prompt token alone is prefill, one token past the prompt a decode
    last = [NS(num_prompt_tokens=10, num_computed_tokens=9), NS(num_prompt_tokens=10,
                                                                num_computed_tokens=10)]
    assert rb.step_info(NS(seqs=last, num_new_tokens=[1, 1])).prefill_tokens == 1
    assert info.kind == "prefill/mixed"
    assert rb.StepInfo(300, 0, 1).kind == "decode 257+"
    assert rb.StepInfo(16, 0, 1).kind == "decode 1-16"


def test_bench_enters_around_round_once_per_timed_round(tmp_path, monkeypatch):
    import argparse
    from contextlib import contextmanager

    from novainfer import bench

    monkeypatch.setenv("NOVAINFER_CACHE_DIR", str(tmp_path))
    args = bench.build_parser(argparse.ArgumentParser()).parse_args(
        ["--preset", "tiny", "--num-seqs", "3", "--max-input-len", "16", "--max-output-len",
         "8", "--device", "cpu", "--rounds", "2"])
    steps = []

    @contextmanager
    def around(llm):
        before = llm.llm_engine.num_steps
        yield
        steps.append(llm.llm_engine.num_steps - before)

    result = bench.run(args, around_round=around)
    assert len(steps) == 2 and steps[0] == steps[1] == result["steps"] > 0


def test_breakdown_refuses_the_cpu_and_flags_it_cannot_honour():
    rb = _load_breakdown()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        rb.main(["--preset", "tiny", "--device", "cpu"])
    with pytest.raises(ValueError, match="leave --rounds at 1"):
        rb.main(["--preset", "tiny", "--rounds", "3"])
    for flag in (["--json"], ["--compare", "hf"]):
        with pytest.raises(ValueError, match=f"leave out {flag[0]}"):
            rb.main(["--preset", "tiny", *flag])


def test_breakdown_marks_each_launch_first_and_puts_the_method_back():
    from types import SimpleNamespace as NS

    rb = _load_breakdown()

    class Engine:
        def __init__(self):
            self.calls = []

        def _launch(self, batch, overlap):
            self.calls.append(("launch", len(batch.seqs)))
            if overlap == "fail":
                raise RuntimeError("launch failed")
            return "launched"

    engine, infos = Engine(), []
    batch = NS(seqs=[NS(num_prompt_tokens=4, num_computed_tokens=4)], num_new_tokens=[1])
    with rb._marked_launches(engine, infos, lambda: engine.calls.append(("mark",))):
        assert engine._launch(batch, True) == "launched"
        with pytest.raises(RuntimeError, match="launch failed"):
            engine._launch(batch, "fail")
    assert engine.calls == [("mark",), ("launch", 1), ("mark",), ("launch", 1)]
    assert infos == [rb.StepInfo(1, 0, 5)] * 2
    assert "_launch" not in vars(engine)  # the class's method again
    own = engine._launch = lambda batch, overlap: "own"  # an instance's own, kept
    with rb._marked_launches(engine, [], lambda: None):
        assert engine._launch(batch, True) == "own"
    assert engine._launch is own
