"""The `novainfer` command line: generate, chat (streamed, multi-turn, Ctrl-C), bench --preset
tiny, and every subcommand's --help showing its defaults."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
from conftest import copy_checkpoint, make_llm

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

    def spy(llm, prompt, params, lora=None):
        seen.append(list(prompt))
        yield from real_stream(llm, prompt, params, lora)

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


# ------------------------------------------------------------------- help shows defaults


def _option_help(text: str) -> dict[str, str]:
    """Each option's help text from `--help` output, wrapped lines joined."""
    helps: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"  (?:-\w+(?: \S+)?, )?(--[\w-]+)(?: (?:\S+|\{[^}]*\})(?: \[[^\]]*\])?)?"
                     r"(?:\s{2,}(.*))?$", line)
        if m:
            current = m.group(1)
            helps[current] = m.group(2) or ""
        elif current and line.startswith(" " * 10):
            helps[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in helps.items()}


def _sub_parsers() -> dict[str, argparse.ArgumentParser]:
    from novainfer.server import bench_serve

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {**sub.choices, "bench serve": bench_serve.build_parser()}


HELP_DEFAULTS = {
    "generate": {"--max-tokens": "64", "--temperature": "0.0", "--top-k": "-1", "--dtype": "auto",
                 "--min-tokens": "0", "--sample-seed": "unseeded"},
    "chat": {"--max-tokens": "512", "--seed": "0", "--max-model-len": "the model's own"},
    "bench": {"--max-model-len": "4096", "--max-num-seqs": "256", "--gpu-memory-utilization": "0.9"},
    "trace": {"--max-tokens": "4", "--top": "10", "--prompt": "The capital of France is"},
    "profile": {"--steps": "12", "--output-dir": "profile_out", "--top": "30", "--dtype": "auto"},
    "serve": {"--port": "8000", "--block-size": "16", "--shutdown-grace": "30.0",
              "--max-num-batched-tokens": "16384 on CUDA, 512 on the CPU"},
    "bench serve": {"--num-prompts": "64", "--base-url": "http://127.0.0.1:8000",
                    "--request-rate": "inf", "--endpoint": "completions"},
}


@pytest.mark.parametrize("command", list(HELP_DEFAULTS))
def test_help_shows_each_default_once(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*command.split(), "--help"])
    assert exc.value.code == 0
    helps = _option_help(capsys.readouterr().out)
    for option, default in HELP_DEFAULTS[command].items():
        assert f"(default: {default})" in helps[option], (option, helps[option])
    for action in _sub_parsers()[command]._actions:
        if not action.option_strings or action.option_strings == ["-h", "--help"]:
            continue
        shown, own = helps[action.option_strings[-1]], " ".join((action.help or "").split())
        if "default" in own.lower():  # the help says it already: nothing added twice
            assert shown == own, (action.option_strings, shown)
        elif action.default is not None and action.default is not False:
            assert shown.endswith(f"(default: {action.default})"), (action.option_strings, shown)


# ------------------------------------------------------------------------------ chat


def _chat(model_dir, *extra: str) -> list[str]:
    return ["chat", "--model", str(model_dir), "--device", "cpu", "--dtype", "float32", *extra]


class _Session:
    """Scripted chat input; records, before each line is read, whether the engine holds
    any request or KV block (the state a Ctrl-C must leave behind)."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = iter(lines)
        self.llm = None
        self.idle: list[bool] = []
        self.turns: list[tuple[list[int], list[str]]] = []  # (prompt ids, pieces yielded)

    def input(self, prompt: str = "") -> str:
        if self.llm is not None:
            engine = self.llm.llm_engine
            bm = engine.block_manager
            self.idle.append(not engine.has_unfinished_requests()
                             and bm.num_free_blocks == bm.num_blocks)
        return next(self.lines)


@pytest.fixture
def session(monkeypatch):
    """`session(lines)`: cmd_chat reads these lines; streams are recorded in `.turns`."""

    def start(lines: list[str]) -> _Session:
        s = _Session(lines)
        monkeypatch.setattr("builtins.input", s.input)
        real_make, real_stream = cli._make_llm, cli.stream

        def make(args, **extra):
            s.llm = real_make(args, **extra)
            return s.llm

        def spy(llm, prompt, params, lora=None):
            pieces: list[str] = []
            s.turns.append((list(prompt), pieces))
            with contextlib.closing(real_stream(llm, prompt, params, lora)) as inner:
                for piece in inner:
                    pieces.append(piece)
                    yield piece

        monkeypatch.setattr(cli, "_make_llm", make)
        monkeypatch.setattr(cli, "stream", spy)
        return s

    return start


@pytest.fixture
def sigint_guard():
    """A SIGINT handler that only counts, should Ctrl-C escape the code under test (instead
    of stopping pytest); the code under test installs and restores its own around steps."""
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    yield caught
    signal.signal(signal.SIGINT, previous)


def test_chat_ctrl_c_during_a_step_stops_the_reply_after_that_step(
    checkpoint, capsys, monkeypatch, session, sigint_guard
):
    from novainfer.engine.llm_engine import LLMEngine

    s = session(["hello there", "and again", "exit"])
    real_step = LLMEngine.step
    steps: list[tuple[int, bool]] = []  # (turn, step completed)

    def step(self):
        steps.append((len(s.turns), False))
        if len(s.turns) == 1 and sum(turn == 1 for turn, _ in steps) == 3:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of turn 1's third step
        out = real_step(self)
        steps[-1] = (steps[-1][0], True)
        return out

    monkeypatch.setattr(LLMEngine, "step", step)
    assert cli.main(_chat(checkpoint("llama"), "--max-tokens", "40", "--ignore-eos")) == 0
    assert sigint_guard == []
    # The interrupted step ran to its end, and no step followed it in that turn.
    assert [t for t in steps if t[0] == 1] == [(1, True)] * 3
    assert s.idle == [True] * 3  # before each line: request aborted, every KV block free
    out = capsys.readouterr().out
    assert out.count("[reply stopped]") == 1
    (_, shown), (prompt2, reply2) = s.turns
    assert len(shown) == 2 and "".join(shown) in out  # the pieces of steps 1 and 2
    # The partial reply, as shown, stays in the history; the next turn runs to its end.
    assert prompt2 == s.llm.apply_chat_template([
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "".join(shown)},
        {"role": "user", "content": "and again"},
    ])
    assert len(reply2) > 0 and out.rstrip().endswith("".join(reply2).rstrip())


class _CtrlCOnFirstPiece:
    """sys.stdout whose write raises KeyboardInterrupt (Ctrl-C while the first piece of the
    first reply is printed)."""

    def __init__(self, real, session) -> None:
        self.real, self.session, self.fired = real, session, False

    def write(self, text: str) -> int:
        if not self.fired and self.session.turns and self.session.turns[0][1]:
            self.fired = True
            raise KeyboardInterrupt
        return self.real.write(text)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_chat_ctrl_c_while_printing_drops_an_unshown_reply(checkpoint, capsys, monkeypatch,
                                                            session):
    import sys

    s = session(["hello there", "and again", "/exit"])
    monkeypatch.setattr(sys, "stdout", _CtrlCOnFirstPiece(sys.stdout, s))
    assert cli.main(_chat(checkpoint("llama"), "--max-tokens", "40", "--ignore-eos")) == 0
    assert s.idle == [True] * 3
    out = capsys.readouterr().out
    assert out.count("[reply stopped]") == 1
    (_, pieces1), (prompt2, _) = s.turns
    assert len(pieces1) == 1  # the generator was closed (aborted) at its first piece
    # Nothing of the reply was shown: the turn is dropped from the history.
    assert prompt2 == s.llm.apply_chat_template([{"role": "user", "content": "and again"}])


@pytest.mark.parametrize("word", ["exit", "quit", "/exit", "/quit"])
def test_chat_exit_words_and_reset(word, capsys, monkeypatch):
    lines = iter(["/reset", f"  {word} "])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(cli, "_make_llm", lambda args: None)  # no turn reaches the model
    assert cli.main(["chat", "--system", "be brief"]) == 0
    assert "conversation cleared (system prompt kept)" in capsys.readouterr().out


def test_chat_ctrl_c_or_ctrl_d_at_the_prompt_leaves(capsys, monkeypatch):
    def interrupted(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_make_llm", lambda args: None)
    monkeypatch.setattr("builtins.input", interrupted)
    assert cli.main(["chat"]) == 0
    monkeypatch.setattr("builtins.input", lambda prompt="": (_ for _ in ()).throw(EOFError))
    assert cli.main(["chat"]) == 0


class _Reader:
    """Collects a child's stdout in a thread, so the test can wait for text with a timeout."""

    def __init__(self, stream) -> None:
        self.text = ""
        self.cond = threading.Condition()
        threading.Thread(target=self._run, args=(stream,), daemon=True).start()

    def _run(self, stream) -> None:
        while chunk := os.read(stream.fileno(), 4096):
            with self.cond:
                self.text += chunk.decode("utf-8", "replace")
                self.cond.notify_all()

    def wait_for(self, predicate, timeout: float = 120.0) -> str:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self.text), timeout), self.text[-2000:]
            return self.text


_SIGINT_DEFAULT = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "from novainfer import cli; sys.exit(cli.main(sys.argv[1:]))")


def test_chat_sigint_in_a_real_session(checkpoint, tmp_path):
    """SIGINT to a real `novainfer chat` while it streams a reply that cannot end first
    (~130k tokens with EOS ignored): the reply stops, the prompt returns, no traceback."""
    folder = copy_checkpoint(checkpoint("llama"), tmp_path / "long")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["max_position_embeddings"] = 1 << 17
    (folder / "config.json").write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    err_file = tmp_path / "stderr.txt"
    with open(err_file, "wb") as err_out:  # a file, so a chatty stderr cannot block the child
        proc = subprocess.Popen(
            # Ctrl-C's usual handler even where the test runs with SIGINT ignored (a job put
            # in the background by a non-interactive shell inherits SIG_IGN, and Python then
            # keeps it): the child would drop a SIGINT that falls between two steps.
            [sys.executable, "-c", _SIGINT_DEFAULT, *_chat(folder, "--max-tokens", "130000",
                                                           "--ignore-eos")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err_out, env=env,
        )
    try:
        out = _Reader(proc.stdout)
        start = len(out.wait_for(lambda t: t.endswith("> ")))
        proc.stdin.write(b"hello there\n")
        proc.stdin.flush()
        out.wait_for(lambda t: len(t) > start)  # the first piece of the reply
        proc.send_signal(signal.SIGINT)
        text = out.wait_for(lambda t: "[reply stopped]\n> " in t)
        proc.stdin.write(b"/reset\n")
        proc.stdin.flush()
        out.wait_for(lambda t: "conversation cleared\n> " in t[len(text):])
        proc.stdin.write(b"quit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
        err = err_file.read_text()
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
