"""The `novainfer` command line: generate, chat (streamed, multi-turn) and bench --preset tiny."""

from __future__ import annotations

import json

import pytest
from conftest import make_llm

from novainfer import SamplingParams, cli


def test_generate_prints_the_greedy_completion(checkpoint, capsys):
    model_dir = checkpoint("llama")
    cli.main(["generate", "w10 w11 w12", "--model", str(model_dir), "--device", "cpu",
              "--dtype", "float32", "--max-tokens", "6"])
    printed = capsys.readouterr().out.strip()
    expected = make_llm(model_dir).generate(
        "w10 w11 w12", SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False
    )[0].outputs[0].text
    assert printed == expected.strip()


def test_chat_streams_each_turn_and_keeps_history(checkpoint, capsys, monkeypatch):
    model_dir = checkpoint("llama")
    turns = iter(["hello there", "and again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(turns))
    seen = []
    real_stream = cli.stream

    def spy(llm, prompt, params):
        seen.append(list(prompt))
        yield from real_stream(llm, prompt, params)

    monkeypatch.setattr(cli, "stream", spy)
    assert cli.main(["chat", "--model", str(model_dir), "--device", "cpu", "--max-tokens", "4"]) == 0
    assert len(seen) == 2
    assert len(seen[1]) > len(seen[0])  # the second turn's prompt carries the first exchange
    assert "novainfer chat" in capsys.readouterr().out


def test_generate_reports_bad_input_without_a_traceback(checkpoint, capsys):
    model_dir = checkpoint("llama")
    code = cli.main(["generate", "hi", "--model", str(model_dir), "--device", "cpu",
                     "--max-tokens", "0"])
    assert code == 2
    assert "max_tokens" in capsys.readouterr().err


def test_bench_tiny_preset_reports_throughput_and_floor(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NOVAINFER_CACHE_DIR", str(tmp_path))
    cli.main(["bench", "--preset", "tiny", "--num-seqs", "4", "--max-input-len", "32",
              "--max-output-len", "16", "--device", "cpu", "--compare", "hf", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    from novainfer.bench import make_workload

    assert result["output_tokens"] == make_workload(4, 32, 16).output_tokens
    assert result["output_tok_s"] > 0 and 0 < result["fraction_of_floor"]
    assert any(line.startswith("floor:") for line in out)
    assert result["hf_output_tok_s"] > 0  # transformers' continuous batching ran the same work


@pytest.mark.parametrize("command", ["generate", "chat", "bench"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert "--model" in capsys.readouterr().out
