"""`novainfer bench` options of seed 003's discipline: --seed, --draw-order (bench.py's
token total next to the interleaved one), --rounds (mean and spread, each round from an
empty prefix cache), and LLM.reset_prefix_cache."""

from __future__ import annotations

import json

import pytest
from conftest import make_llm, random_prompts

from novainfer import SamplingParams, cli
from novainfer.bench import make_workload


def test_draw_orders_reproduce_both_token_totals():
    assert make_workload(256, 1024, 1024).output_tokens == 133_966  # nano-vLLM's bench.py
    assert make_workload(256, 1024, 1024, draw_order="interleaved").output_tokens == 140_084
    assert make_workload(8, 200, 200, seed=1).prompts != make_workload(8, 200, 200).prompts
    with pytest.raises(ValueError, match="draw_order must be one of"):
        make_workload(4, 100, 100, draw_order="random")


def test_rounds_report_each_round(capsys):
    args = ["bench", "--preset", "tiny", "--device", "cpu", "--num-seqs", "4",
            "--max-input-len", "40", "--max-output-len", "6", "--rounds", "3", "--seed", "2",
            "--draw-order", "interleaved", "--json"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["rounds_tok_s"]) == 3 and result["seed"] == 2
    assert result["output_tokens"] == make_workload(4, 40, 6, 2, "interleaved").output_tokens
    assert "mean of 3 rounds, sd" in out
    assert cli.main([*args[:-7], "--rounds", "0"]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("top_k", [7, -1])
def test_top_p_and_top_k_filter_the_timed_run(capsys, monkeypatch, top_k):
    """--top-p / --top-k reach every timed request (and the JSON), and the sampler filters
    with them: top-p alone takes `_top_p_alone` (the radix kernel's dispatch), with top-k
    the candidates path; a bad value is the sampling parameter's error before anything
    loads."""
    import novainfer  # bench.run imports SamplingParams from the package when it runs
    from novainfer.engine import sampler

    seen, paths = [], []
    original = novainfer.SamplingParams

    def spy(*a, **kw):
        seen.append((kw.get("top_p"), kw.get("top_k")))
        return original(*a, **kw)

    def spy_path(name):
        real = getattr(sampler, name)

        def wrapped(*a, **kw):
            paths.append(name)
            return real(*a, **kw)
        monkeypatch.setattr(sampler, name, wrapped)

    monkeypatch.setattr(novainfer, "SamplingParams", spy)
    spy_path("_top_p_alone")
    spy_path("_top_k_top_p_candidates")
    args = ["bench", "--preset", "tiny", "--device", "cpu", "--num-seqs", "3",
            "--max-input-len", "20", "--max-output-len", "4", "--top-p", "0.8",
            "--top-k", str(top_k), "--json"]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["top_p"], result["top_k"]) == (0.8, top_k)
    timed = [s for s in seen if s != (None, None)]
    assert len(timed) >= 4 and set(timed) == {(0.8, top_k)}  # the check + 3 requests
    want = "_top_p_alone" if top_k == -1 else "_top_k_top_p_candidates"
    assert paths and set(paths) == {want}
    assert cli.main([*args[:-5], "--top-p", "0", "--json"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_reset_prefix_cache(checkpoint):
    llm = make_llm(checkpoint("llama"), kv_cache_memory=8 << 20)
    prompt = random_prompts([40], seed=3)[0]
    params = SamplingParams(temperature=0.0, max_tokens=3)
    llm.generate([prompt], params, use_tqdm=False)
    assert llm.generate([prompt], params, use_tqdm=False)[0].num_cached_tokens == 32
    assert llm.reset_prefix_cache()
    assert llm.generate([prompt], params, use_tqdm=False)[0].num_cached_tokens == 0
    engine = llm.llm_engine
    engine.add_request("held", prompt, params)
    engine.step()
    assert not llm.reset_prefix_cache()  # a request holds blocks: nothing changes
    engine.abort_request("held")
