"""The `novainfer` command: generate and chat (more subcommands join as they land)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows every option's default (also for options without a help text),
    except where the help already says it or there is nothing to show (None, an off flag)."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        if not action.option_strings or "default" in (action.help or "").lower():
            return False
        # `is`, not `in`: a default of 0 is worth showing, an off flag (False) is not.
        return not any(action.default is x for x in (None, False, argparse.SUPPRESS))

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):
            action = copy.copy(action)  # argparse prints nothing for an empty help
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        if self._shows_default(action):
            return super()._get_help_string(action)
        return action.help or ""


def add_tensor_parallel_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-tp", "--tensor-parallel-size", type=int, default=1,
                        help="ranks the model is split over (GPUs, or CPU processes)")


def add_async_scheduling_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--async-scheduling", action="store_const", const=True, default=None,
                        help="prepare step N+1 while the device runs step N (the default on "
                             "CUDA)")
    parser.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_const",
                        const=False, help="one step at a time (the default on the CPU)")


def add_kv_cache_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-cache-dtype", default="auto",
                        help="auto (the model's dtype), fp8 or fp8_e4m3 (e4m3 with a K and a V "
                             "scale per layer: half the bytes of bf16, twice the blocks)")
    parser.add_argument("--calculate-kv-scales", action="store_true",
                        help="fp8: set the scales from the first prefill (amax / 448) instead "
                             "of 1.0")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    add_tensor_parallel_arg(parser)
    add_async_scheduling_arg(parser)
    add_kv_cache_args(parser)
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16, float64")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length (default: the model's own)")
    parser.add_argument("--seed", type=int, default=0, help="engine seed for unseeded requests")


def add_lora_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora", default=None, metavar="PATH",
                        help="a PEFT LoRA adapter folder to apply to every request")


def lora_from_args(args: argparse.Namespace) -> tuple[Any, dict]:
    """(the LoRARequest of --lora or None, the LLM arguments it needs)."""
    if not getattr(args, "lora", None):
        return None, {}
    from novainfer.lora.adapter import adapter_rank
    from novainfer.lora.request import LoRARequest

    rank = adapter_rank(args.lora) or 16
    request = LoRARequest(Path(args.lora).name or "lora", 1, args.lora)
    return request, {"enable_lora": True, "max_lora_rank": max(16, rank)}


def _sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens per reply")
    parser.add_argument("--min-tokens", type=int, default=0,
                        help="tokens generated before EOS or a stop token may end the reply")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="keep generating past EOS, up to --max-tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--top-k", type=int, default=-1, help="-1 = off")
    parser.add_argument("--sample-seed", dest="sample_seed", type=int, default=None,
                        help="seed for this request's sampling (default: unseeded)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="novainfer", description="novainfer: LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, formatter_class=HelpFormatter)

    gen = add("generate", help="complete one prompt and print the text")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_engine_args(gen)
    add_lora_arg(gen)
    _sampling_args(gen, max_tokens=64)
    gen.add_argument("--step-timing", action="store_true",
                     help="time each step's phases; summary on stderr (or NOVAINFER_STEP_TIMING=1)")
    chat = add("chat", help="interactive multi-turn chat, streamed to the terminal")
    chat.add_argument("--system", default=None, help="optional system prompt")
    add_engine_args(chat)
    add_lora_arg(chat)
    _sampling_args(chat, max_tokens=512)
    bench = add("bench", help="offline throughput on nano-vLLM's bench.py workload, with the floor "
                "(`novainfer bench serve --help`: the online benchmark)")
    from novainfer.bench import build_parser as bench_args

    bench_args(bench)
    bench.add_argument("--step-timing", action="store_true",
                       help="time each step's phases (schedule, prepare, forward, sample, postprocess)")
    from novainfer.tools import profile as profile_tool
    from novainfer.tools import trace as trace_tool

    trace_tool.build_parser(add("trace", help="hook every module for a short generation"))
    profile_tool.build_parser(add("profile", help="torch.profiler over prefill and decode steps"))
    from novainfer.server.serve import add_serve_args

    add_serve_args(add("serve", help="OpenAI-compatible HTTP server (pip install novainfer[server])"))
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    from novainfer.server.serve import cmd_serve as run_serve

    return run_serve(args)


def cmd_trace(args: argparse.Namespace) -> int:
    from novainfer.tools.trace import run

    return run(args)


def cmd_profile(args: argparse.Namespace) -> int:
    from novainfer.tools.profile import run

    return run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from novainfer.bench import print_report, run

    if args.step_timing:
        os.environ["NOVAINFER_STEP_TIMING"] = "1"  # bench resets the timer after its warm-up
    result = run(args)
    print_report(result, args.json)
    if not result.get("strict", {"ok": True})["ok"]:
        print("error: --strict: " + "; ".join(result["strict"]["violations"]), file=sys.stderr)
        return 1
    return 0


def _make_llm(args: argparse.Namespace, **extra: Any):
    from novainfer import LLM

    return LLM(args.model, dtype=args.dtype, device=args.device,
               max_model_len=args.max_model_len, seed=args.seed,
               tensor_parallel_size=args.tensor_parallel_size,
               async_scheduling=args.async_scheduling, kv_cache_dtype=args.kv_cache_dtype,
               calculate_kv_scales=args.calculate_kv_scales, **extra)


def _params(args: argparse.Namespace):
    from novainfer import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, min_tokens=args.min_tokens,
                          ignore_eos=args.ignore_eos, seed=args.sample_seed)


@contextlib.contextmanager
def _ctrl_c_after_step() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back until the engine step inside finishes, then raise it.

    A KeyboardInterrupt in the middle of a step could leave the KV-block bookkeeping half
    updated; after the step, aborting the request frees its blocks cleanly. A second
    Ctrl-C during the same step raises at once (for a step that takes too long).
    """
    pending = False

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal pending
        if pending:
            raise KeyboardInterrupt
        pending = True

    # Python handles signals in the main thread only (and None: a handler not set from Python).
    hold = threading.current_thread() is threading.main_thread() and (
        signal.getsignal(signal.SIGINT) is not None
    )
    previous = signal.signal(signal.SIGINT, on_sigint) if hold else None
    try:
        yield
    finally:
        if hold:
            signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def stream(llm, prompt: str | list[int], params, lora_request: Any = None) -> Iterator[str]:
    """Yield the text of one request as the engine produces it.

    Ctrl-C raises KeyboardInterrupt between engine steps, never inside one; closing the
    generator (or the interrupt) aborts the request, which frees its KV blocks.
    """
    engine = llm.llm_engine
    request_id = f"stream-{id(prompt)}"
    engine.add_request(request_id, prompt, params, stream=True, lora_request=lora_request)
    shown = 0
    try:
        while engine.has_unfinished_requests():
            with _ctrl_c_after_step():
                outputs = engine.step()
            for out in outputs:
                if out.request_id != request_id:
                    continue
                text = out.outputs[0].text
                if len(text) > shown:
                    yield text[shown:]
                    shown = len(text)
                if out.finished:
                    return
    finally:
        engine.abort_request(request_id)


def cmd_generate(args: argparse.Namespace) -> int:
    params = _params(args)
    lora, extra = lora_from_args(args)
    llm = _make_llm(args, **extra)
    timer = llm.llm_engine.step_timer
    if args.step_timing and timer is None:
        timer = llm.llm_engine.enable_step_timing()
    prompt: str | list[int] = args.prompt
    if args.chat:
        prompt = llm.apply_chat_template([{"role": "user", "content": args.prompt}])
    for piece in stream(llm, prompt, params, lora):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if timer is not None:
        sys.stdout.flush()
        timer.report()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = _params(args)
    lora, extra = lora_from_args(args)
    llm = _make_llm(args, **extra)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("novainfer chat: type a message; Ctrl-C stops a reply, /reset clears the "
          "conversation, exit or Ctrl-D quits.")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        command = line.strip()
        if command in ("/exit", "/quit", "exit", "quit"):
            return 0
        if command == "/reset":
            history = history[:1] if args.system else []
            print("conversation cleared" + (" (system prompt kept)" if args.system else ""))
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        reply: list[str] = []
        try:
            ids = llm.apply_chat_template(history)
            with contextlib.closing(stream(llm, ids, params, lora)) as pieces:  # closing aborts
                for piece in pieces:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                    reply.append(piece)  # after printing: the history keeps what was shown
        except ValueError as exc:  # e.g. the conversation outgrew max_model_len
            history.pop()
            print(f"error: {exc}")
            continue
        except KeyboardInterrupt:
            # The request is aborted. The partial reply stays in the history, as shown on
            # screen, so a follow-up ("shorter, please") has its context; with nothing shown
            # yet the turn is dropped.
            print("\n[reply stopped]")
            if not reply:
                history.pop()
                continue
        else:
            sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["bench", "serve"]:  # online benchmark against a running `novainfer serve`
        from novainfer.server.bench_serve import main as bench_serve

        return bench_serve(argv[2:])
    args = build_parser().parse_args(argv)
    try:
        commands = {"generate": cmd_generate, "chat": cmd_chat, "bench": cmd_bench,
                    "trace": cmd_trace, "profile": cmd_profile, "serve": cmd_serve}
        return commands[args.command](args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside chat's own handling: no traceback
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
