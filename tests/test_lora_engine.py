"""LoRA adapters in the engine, against transformers + PEFT on the same weights (fp32, CPU).

Adapters are made and saved by PEFT itself (random A and B, so every update matters), then
served by novainfer: several adapters and the base model mixed in one batch, more adapters
than device slots, the prefix cache kept apart per adapter, the CPU cache evicting and
reading an adapter again, two tensor-parallel ranks, and the request errors.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (kernel test)
from conftest import (
    BOS_ID,
    MIN_GREEDY_MARGIN,
    completion_tokens,
    hf_greedy,
    make_llm,
    random_prompts,
)

from novainfer import LoRARequest, SamplingParams

peft = pytest.importorskip("peft")

MAX_TOKENS = 12
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name: (id, seed, LoraConfig fields)
    "all8": (1, 1, {"r": 8, "lora_alpha": 16, "target_modules": ALL}),
    "qv4rs": (2, 2, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                     "use_rslora": True}),
    "mlp2": (3, 3, {"r": 2, "lora_alpha": 4, "target_modules": ["gate_proj", "down_proj"]}),
}


def _base(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model_dir(checkpoint):
    return checkpoint("llama")


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> dict[str, LoRARequest]:
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, (lora_id, seed, fields) in ADAPTERS.items():
        torch.manual_seed(seed)
        cfg = peft.LoraConfig(init_lora_weights=False, **fields)
        model = peft.get_peft_model(_base(model_dir), cfg)
        with torch.no_grad():  # PEFT's random B is small: make each adapter change the output
            for module_name, param in model.named_parameters():
                if "lora_B" in module_name:
                    param.mul_(8.0)
        model.save_pretrained(root / name)
        out[name] = LoRARequest(name, lora_id, str(root / name))
    return out


def peft_greedy(model_dir, adapter: LoRARequest | None, prompts) -> list[list[int]]:
    """Greedy tokens of transformers with the PEFT adapter applied; near ties refused."""
    if adapter is None:
        return hf_greedy(model_dir, prompts, MAX_TOKENS)
    model = peft.PeftModel.from_pretrained(_base(model_dir), adapter.lora_path).eval()
    results = []
    for ids in prompts:
        inp = torch.tensor([list(ids)])
        with torch.no_grad():
            out = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp),
                                 max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                 do_sample=False, eos_token_id=None, pad_token_id=0,
                                 bos_token_id=BOS_ID, output_logits=True,
                                 return_dict_in_generate=True)
        for logits in out.logits:
            top2 = torch.topk(logits[0].float(), 2).values
            assert top2[0] - top2[1] > MIN_GREEDY_MARGIN, "a near tie in the reference"
        results.append(out.sequences[0, inp.shape[1]:].tolist())
    return results


@pytest.fixture(scope="module")
def prompts():
    return random_prompts([5, 40, 19], seed=60)


@pytest.fixture(scope="module")
def expected(model_dir, adapters, prompts):
    """Per adapter name (None: base), the reference tokens of every prompt."""
    out = {None: peft_greedy(model_dir, None, prompts)}
    for name, request in adapters.items():
        out[name] = peft_greedy(model_dir, request, prompts)
    assert all(out[name] != out[None] for name in adapters)  # every adapter matters
    return out


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _mixed(adapters, prompts):
    """Every (adapter or base, prompt) pair, interleaved."""
    names = [None, *adapters]
    pairs = [(name, i) for i in range(len(prompts)) for name in names]
    return pairs, [prompts[i] for _, i in pairs], [
        adapters[name] if name else None for name, _ in pairs]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_adapters_and_base_in_one_batch_match_peft(model_dir, adapters, prompts, expected,
                                                    async_scheduling):
    llm = make_llm(model_dir, enable_lora=True, max_loras=3, max_lora_rank=8,
                   async_scheduling=async_scheduling)
    pairs, batch, loras = _mixed(adapters, prompts)
    outs = llm.generate(batch, greedy(), use_tqdm=False, lora_request=loras)
    for (name, i), tokens in zip(pairs, completion_tokens(outs)):
        assert tokens == expected[name][i], (name, i)


def test_engine_through_the_kernels_matches_peft(model_dir, adapters, prompts, expected,
                                                 monkeypatch):
    """Every LoRA layer on the Triton kernels (interpreted on the CPU, fp32): the same tokens
    as transformers + PEFT, adapters and base mixed in one batch."""
    pytest.importorskip("triton")
    from novainfer.lora import ops

    monkeypatch.setattr(ops, "_forced", "triton")
    llm = make_llm(model_dir, enable_lora=True, max_loras=3, max_lora_rank=8)
    pairs, batch, loras = _mixed(adapters, prompts)
    outs = llm.generate(batch, greedy(), use_tqdm=False, lora_request=loras)
    for (name, i), tokens in zip(pairs, completion_tokens(outs)):
        assert tokens == expected[name][i], (name, i)


def test_more_adapters_than_slots(model_dir, adapters, prompts, expected):
    """max_loras=1: no step mixes two adapters, and every request is served correctly."""
    llm = make_llm(model_dir, enable_lora=True, max_loras=1, max_lora_rank=8)
    runner = llm.llm_engine.runner
    launch, per_step = runner.launch, []

    def counted(batch, *args, **kwargs):
        per_step.append({s.lora_int_id for s in batch.seqs if s.lora_int_id})
        return launch(batch, *args, **kwargs)

    runner.launch = counted
    pairs, batch, loras = _mixed(adapters, prompts)
    outs = llm.generate(batch, greedy(), use_tqdm=False, lora_request=loras)
    for (name, i), tokens in zip(pairs, completion_tokens(outs)):
        assert tokens == expected[name][i], (name, i)
    assert max(len(ids) for ids in per_step) == 1
    assert set().union(*per_step) == {1, 2, 3}


def test_prefix_cache_never_crosses_adapters(model_dir, adapters):
    prompt = random_prompts([50], seed=61)[0]  # three full blocks of 16
    a, b = adapters["all8"], adapters["qv4rs"]
    want_a, want_b = (peft_greedy(model_dir, r, [prompt])[0] for r in (a, b))
    llm = make_llm(model_dir, enable_lora=True, max_loras=2, max_lora_rank=8)
    first = llm.generate([prompt], greedy(), use_tqdm=False, lora_request=a)[0]
    other = llm.generate([prompt], greedy(), use_tqdm=False, lora_request=b)[0]
    again = llm.generate([prompt], greedy(), use_tqdm=False, lora_request=a)[0]
    assert completion_tokens([first, other, again]) == [want_a, want_b, want_a]
    assert other.num_cached_tokens == 0 and again.num_cached_tokens == 48


def test_cpu_cache_evicts_and_reads_again(model_dir, adapters, prompts, expected):
    llm = make_llm(model_dir, enable_lora=True, max_loras=1, max_lora_rank=8, max_cpu_loras=1)
    manager = llm.llm_engine.lora
    for name in ("all8", "mlp2", "all8"):
        out = llm.generate(prompts[:1], greedy(), use_tqdm=False, lora_request=adapters[name])
        assert completion_tokens(out) == expected[name][:1]
        assert list(manager.cpu) == [adapters[name].lora_int_id]


def test_lora_request_errors(model_dir, adapters, prompts, tmp_path):
    plain = make_llm(model_dir)
    with pytest.raises(ValueError, match="enable_lora=True"):
        plain.generate(prompts[:1], greedy(), use_tqdm=False, lora_request=adapters["all8"])
    llm = make_llm(model_dir, enable_lora=True, max_lora_rank=4)
    engine = llm.llm_engine
    with pytest.raises(ValueError, match=r"LoRA adapter 'all8'.*r=8 exceeds max_lora_rank=4"):
        llm.generate(prompts[:1], greedy(), use_tqdm=False, lora_request=adapters["all8"])
    llm.generate(prompts[:1], greedy(), use_tqdm=False, lora_request=adapters["qv4rs"])
    moved = LoRARequest("other", adapters["qv4rs"].lora_int_id, adapters["mlp2"].lora_path)
    with pytest.raises(ValueError, match="lora_int_id 2 already names adapter 'qv4rs'"):
        llm.generate(prompts[:1], greedy(), use_tqdm=False, lora_request=moved)
    with pytest.raises(ValueError, match="lora_request has 1 entries for 2 prompts"):
        llm.generate(prompts[:2], greedy(), use_tqdm=False, lora_request=[adapters["mlp2"]])
    with pytest.raises(TypeError, match="lora_request must be a LoRARequest"):
        llm.generate(prompts[:1], greedy(), use_tqdm=False, lora_request="all8")
    # A bad adapter anywhere in the list queues nothing.
    with pytest.raises(ValueError, match="lora_path is not a folder"):
        llm.generate(prompts[:2], greedy(), use_tqdm=False,
                     lora_request=[None, LoRARequest("gone", 9, str(tmp_path / "none"))])
    assert not engine.has_unfinished_requests() and not engine.scheduler.waiting


def test_two_ranks_match_peft(model_dir, adapters, prompts, expected):
    """Tensor parallelism (gloo): A cut by input columns for o/down, B by output rows for
    q/k/v and gate/up; the other rank reads each adapter when the driver loads a slot. Two
    slots for three adapters, so slots are reloaded on both ranks mid-run."""
    with make_llm(model_dir, enable_lora=True, max_loras=2, max_lora_rank=8,
                  tensor_parallel_size=2) as llm:
        pairs, batch, loras = _mixed(adapters, prompts)
        outs = llm.generate(batch, greedy(), use_tqdm=False, lora_request=loras)
    for (name, i), tokens in zip(pairs, completion_tokens(outs)):
        assert tokens == expected[name][i], (name, i)


def test_cli_generate_with_lora(model_dir, adapters, capsys):
    from novainfer import cli

    prompt = "w1 w2 w3"
    llm = make_llm(model_dir, enable_lora=True, max_lora_rank=16)
    want = llm.generate([prompt], greedy(), use_tqdm=False,
                        lora_request=adapters["all8"])[0].outputs[0].text
    base = llm.generate([prompt], greedy(), use_tqdm=False)[0].outputs[0].text
    assert want != base
    args = ["generate", prompt, "--model", str(model_dir), "--device", "cpu", "--dtype",
            "float32", "--max-tokens", str(MAX_TOKENS), "--ignore-eos"]
    assert cli.main([*args, "--lora", adapters["all8"].lora_path]) == 0
    assert capsys.readouterr().out == want + "\n"


def test_bench_with_random_adapters(capsys):
    from novainfer import cli

    args = ["bench", "--preset", "tiny", "--device", "cpu", "--num-seqs", "6",
            "--max-input-len", "24", "--max-output-len", "8", "--json"]
    assert cli.main([*args, "--lora-count", "2", "--lora-rank", "4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["lora_adapters"] == 2 and result["output_tokens"] > 0


def test_served_adapters(model_dir, adapters, prompts, tmp_path):
    """`novainfer serve --lora-modules NAME=PATH`: a request names an adapter as its model;
    /v1/models lists the adapters; a bad adapter stops the server at startup."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from test_server import MODEL, Server, _headers

    text = "w1 w2 w3 w4"
    llm = make_llm(model_dir, enable_lora=True, max_lora_rank=8, max_model_len=128)
    want = {name: llm.generate([text], greedy(), use_tqdm=False,
                               lora_request=adapters.get(name))[0].outputs[0].text
            for name in (None, "all8", "mlp2")}
    assert len(set(want.values())) == 3
    modules = [f"{n}={adapters[n].lora_path}" for n in ("all8", "mlp2")]
    srv = Server(model_dir, tmp_path / "lora.log", "--lora-modules", *modules,
                 "--max-loras", "2", "--max-lora-rank", "8")
    try:
        def complete(model):
            return httpx.post(srv.url + "/v1/completions", headers=_headers(), timeout=600,
                              json={"model": model, "prompt": text, "max_tokens": MAX_TOKENS,
                                    "temperature": 0, "ignore_eos": True})

        for name in (None, "all8", "mlp2"):
            got = complete(name or MODEL).json()
            assert got["choices"][0]["text"] == want[name] and got["model"] == (name or MODEL)
        missing = complete("nope")
        assert missing.status_code == 404 and "'all8'" in missing.json()["error"]["message"]
        listed = httpx.get(srv.url + "/v1/models", headers=_headers()).json()["data"]
        assert [(m["id"], m["parent"]) for m in listed] == [
            (MODEL, None), ("all8", MODEL), ("mlp2", MODEL)]
    finally:
        srv.stop()
    log = tmp_path / "bad.log"
    with pytest.raises(Exception):  # noqa: B017 - the helper fails however startup fails
        Server(model_dir, log, "--lora-modules", f"bad={tmp_path / 'none'}")
    assert "lora_path is not a folder" in log.read_text()


def test_fused_qkv_shrink_matches_peft(model_dir, adapters, prompts, expected, monkeypatch):
    """NOVAINFER_ENABLE_QKV_LORA_FUSION=1: q/k/v multiply by [W_qkv; A of every slot] in one
    matmul (no shrink), the expand reads each token's slot in place; the fused weight is
    one buffer (the layer's weight and A are views of it; the CPU panels are dropped), never
    rebuilt: loading a slot writes into it."""
    monkeypatch.setenv("NOVAINFER_ENABLE_QKV_LORA_FUSION", "1")
    llm = make_llm(model_dir, enable_lora=True, max_loras=2, max_lora_rank=8)
    qkv = llm.llm_engine.runner.model.model.layers[0].self_attn.qkv_proj
    down = llm.llm_engine.runner.model.model.layers[0].mlp.down_proj
    assert qkv.lora.fuse == "on" and down.lora.fuse == "off"
    buffer = qkv.lora.buffer
    assert qkv.cpu_matmul is None and qkv.weight.data_ptr() == buffer.data_ptr()
    calls = []
    real = qkv.lora.run_layer
    qkv.lora.run_layer = lambda layer, x: calls.append(1) or real(layer, x)
    pairs, batch, loras = _mixed(adapters, prompts)
    outs = llm.generate(batch, greedy(), use_tqdm=False, lora_request=loras)
    for (name, i), tokens in zip(pairs, completion_tokens(outs)):
        assert tokens == expected[name][i], (name, i)
    loads = llm.llm_engine.lora.loads
    assert len(calls) > 2 * loads and qkv.lora.buffer is buffer
    assert qkv.lora.a.data_ptr() == buffer[qkv.out_features:].data_ptr()


def test_timing_report_with_seed_spelling(model_dir, adapters, prompts, monkeypatch, capsys):
    monkeypatch.setenv("VLLM_ENABLE_LORA_TIMING", "1")
    llm = make_llm(model_dir, enable_lora=True, max_loras=2, max_lora_rank=8)
    timing = llm.llm_engine.runner.worker.lora_timing
    llm.generate(prompts, greedy(), use_tqdm=False,
                 lora_request=[adapters["all8"], None, adapters["qv4rs"]])
    t = timing.totals()
    assert timing.calls > 0 and all(t[s] > 0 for s in ("qkv", "shrink", "expand", "fused",
                                                       "fused_expand"))
    assert t["traditional"] == pytest.approx(t["qkv"] + t["shrink"] + t["expand"])
    text = timing.report(file=None)
    for field in ("QKV matmul", "LoRA shrink", "LoRA expand", "fused matmul",
                  "Overall speedup", "time saved", "Compute stage"):
        assert field in text
    capsys.readouterr()


def test_switch_spellings(monkeypatch):
    from novainfer.lora import switches

    monkeypatch.delenv("NOVAINFER_ENABLE_QKV_LORA_FUSION", raising=False)
    monkeypatch.delenv("VLLM_ENABLE_QKV_LORA_FUSION", raising=False)
    assert switches.qkv_fusion() == "auto"  # unset: where it was measured to pay
    monkeypatch.setenv("VLLM_ENABLE_QKV_LORA_FUSION", "1")
    assert switches.qkv_fusion() == "on"
    monkeypatch.setenv("NOVAINFER_ENABLE_QKV_LORA_FUSION", "0")  # ours wins
    assert switches.qkv_fusion() == "off"
    monkeypatch.setenv("NOVAINFER_ENABLE_QKV_LORA_FUSION", "auto")
    assert switches.qkv_fusion() == "auto"
    monkeypatch.setenv("NOVAINFER_ENABLE_QKV_LORA_FUSION", "enable")
    with pytest.raises(ValueError, match="NOVAINFER_ENABLE_QKV_LORA_FUSION must be"):
        switches.qkv_fusion()
    monkeypatch.delenv("VLLM_ENABLE_LORA_TIMING", raising=False)
    monkeypatch.delenv("NOVAINFER_ENABLE_LORA_TIMING", raising=False)
    assert not switches.timing()


def test_adapters_in_use_are_never_read_at_step_time(model_dir, adapters, prompts, expected):
    """The CPU cache keeps the adapters of requests in the engine past max_cpu_loras, so a
    step never reads a folder; it shrinks back when they leave."""
    llm = make_llm(model_dir, enable_lora=True, max_loras=1, max_lora_rank=8, max_cpu_loras=1)
    manager = llm.llm_engine.lora
    pairs, batch, loras = _mixed(adapters, prompts)
    engine = llm.llm_engine
    for i, (prompt, lora) in enumerate(zip(batch, loras)):
        engine.add_request(str(i), prompt, greedy(), lora_request=lora)
    reads = manager.reads
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert manager.reads == reads and len(manager.cpu) == 1 and not manager.live
    for i, (name, p) in enumerate(pairs):
        assert list(outs[str(i)].outputs[0].token_ids) == expected[name][p], (name, p)


def test_a_failed_slot_load_leaves_no_stale_slot(model_dir, adapters, prompts, expected):
    llm = make_llm(model_dir, enable_lora=True, max_loras=1, max_lora_rank=8)
    runner, manager = llm.llm_engine.runner, llm.llm_engine.lora
    real = runner.load_lora
    runner.load_lora = lambda slot, adapter: (_ for _ in ()).throw(RuntimeError("copy failed"))
    with pytest.raises(RuntimeError, match="copy failed"):
        llm.generate(prompts[:1], greedy(), use_tqdm=False, lora_request=adapters["all8"])
    assert manager.slots == [None] and not manager.slot_of
    runner.load_lora = real
    out = llm.generate(prompts[:1], greedy(), use_tqdm=False, lora_request=adapters["all8"])
    assert completion_tokens(out) == expected["all8"][:1]


def test_tensor_parallel_ranks_get_the_checked_weights(model_dir, adapters, prompts, expected,
                                                       tmp_path):
    """The other rank receives rank 0's adapter tensors: the folder may be gone by then."""
    import shutil

    folder = tmp_path / "moved"
    shutil.copytree(adapters["mlp2"].lora_path, folder)
    request = LoRARequest("moved", 7, str(folder))
    with make_llm(model_dir, enable_lora=True, max_lora_rank=8, tensor_parallel_size=2) as llm:
        engine = llm.llm_engine
        engine.add_request("r", prompts[0], greedy(), lora_request=request)
        shutil.rmtree(folder)
        while engine.has_unfinished_requests():
            outs = [o for o in engine.step() if o.finished]
    assert list(outs[0].outputs[0].token_ids) == expected["mlp2"][0]


def test_fused_weight_shares_the_layer_weight(model_dir, adapters, prompts, expected,
                                              monkeypatch):
    """Where the weight is a plain tensor (float64 here; CUDA in practice), [W_qkv; A] is one
    allocation made before the KV cache is sized, the layer's weight a view of it."""
    monkeypatch.setenv("NOVAINFER_ENABLE_QKV_LORA_FUSION", "1")
    llm = make_llm(model_dir, dtype="float64", enable_lora=True, max_loras=2, max_lora_rank=8)
    qkv = llm.llm_engine.runner.model.model.layers[0].self_attn.qkv_proj
    buffer = qkv.lora.buffer
    assert qkv.weight.data_ptr() == buffer.data_ptr()
    outs = llm.generate(prompts, greedy(), use_tqdm=False,
                        lora_request=[adapters["all8"], None, adapters["qv4rs"]])
    assert completion_tokens(outs) == [expected["all8"][0], expected[None][1],
                                       expected["qv4rs"][2]]
    assert qkv.lora.buffer is buffer and qkv.weight.data_ptr() == buffer.data_ptr()


def test_unset_fusion_stays_off_on_the_cpu(model_dir, monkeypatch):
    """The fusion switch unset means "auto", which is CUDA only: on the CPU the q/k/v layer
    keeps its packed matmul (fusion would drop it for no saved launch)."""
    monkeypatch.delenv("NOVAINFER_ENABLE_QKV_LORA_FUSION", raising=False)
    monkeypatch.delenv("VLLM_ENABLE_QKV_LORA_FUSION", raising=False)
    llm = make_llm(model_dir, enable_lora=True, max_loras=2, max_lora_rank=8)
    qkv = llm.llm_engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.lora.fuse == "off" and qkv.lora.buffer is None
    from novainfer.kernels import cpu_native
    from novainfer.layers.fusion import PLAIN_PYTORCH

    if cpu_native.native_available() and not PLAIN_PYTORCH:
        assert qkv.cpu_matmul is not None


def test_lora_settings_are_checked(model_dir):
    from novainfer.config import EngineConfig

    with pytest.raises(ValueError, match="max_lora_rank must be <= 512"):
        EngineConfig(device="cpu", enable_lora=True, max_lora_rank=1024)
    with pytest.raises(ValueError, match=r"max_cpu_loras \(1\) must be >= max_loras \(2\)"):
        EngineConfig(device="cpu", max_loras=2, max_cpu_loras=1)


def test_serve_refuses_an_adapter_named_like_the_base_model(capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from novainfer import cli

    code = cli.main(["serve", "--served-model-name", "m", "--lora-modules", "m=/x",
                     "--device", "cpu"])
    assert code == 2 and "is the base model's served name" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fusion", ["0", "1", "auto"])
def test_cuda_graphs_with_adapters_match_peft(model_dir, adapters, prompts, expected, fusion,
                                               monkeypatch):
    """On a GPU in fp32, with CUDA graphs on (and the CUDA C++ kernels): adapters and the
    base mixed in one batch give PEFT's tokens, and the decode steps ran as graph replays,
    the LoRA ones included."""
    from novainfer.engine.cuda_graphs import DecodeGraphs

    monkeypatch.setenv("NOVAINFER_ENABLE_QKV_LORA_FUSION", fusion)
    replays = {False: 0, True: 0}
    run = DecodeGraphs.run

    def counting(self, *args):
        replays[args[3] is not None if len(args) > 3 else False] += 1
        return run(self, *args)

    monkeypatch.setattr(DecodeGraphs, "run", counting)
    llm = make_llm(model_dir, device="cuda", enable_lora=True, max_loras=3, max_lora_rank=8,
                   max_model_len=256)
    pairs, batch, loras = _mixed(adapters, prompts)
    outs = llm.generate(batch, greedy(), use_tqdm=False, lora_request=loras)
    for (name, i), tokens in zip(pairs, completion_tokens(outs)):
        assert tokens == expected[name][i], (name, i)
    assert replays[True] >= MAX_TOKENS - 2, replays
    # The base alone afterwards runs the graphs without LoRA.
    base = llm.generate(prompts, greedy(), use_tqdm=False)
    assert completion_tokens(base) == expected[None]
    assert replays[False] >= MAX_TOKENS - 2, replays


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("fusion", ["0", "1"])
def test_two_gpus_with_graphs_match_peft(model_dir, adapters, prompts, expected, fusion,
                                         monkeypatch):
    """Two GPUs (NCCL, CUDA graphs on, the CUDA C++ kernels), fp32: adapters and the base
    mixed in one batch, two slots for three adapters (slots reloaded on both ranks mid-run),
    give PEFT's tokens."""
    monkeypatch.setenv("NOVAINFER_ENABLE_QKV_LORA_FUSION", fusion)
    monkeypatch.setenv("NOVAINFER_ALLREDUCE", "nccl")
    with make_llm(model_dir, device="cuda", enable_lora=True, max_loras=2, max_lora_rank=8,
                  max_model_len=256, tensor_parallel_size=2) as llm:
        assert llm.llm_engine.runner.graphs is not None
        pairs, batch, loras = _mixed(adapters, prompts)
        outs = llm.generate(batch, greedy(), use_tqdm=False, lora_request=loras)
    for (name, i), tokens in zip(pairs, completion_tokens(outs)):
        assert tokens == expected[name][i], (name, i)
