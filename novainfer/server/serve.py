"""`novainfer serve`: arguments (no server imports), and the processes: the engine core
(server/engine_core.py) and one or more HTTP frontends (uvicorn) talking to it over pipes."""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import pickle
import signal
import socket
import sys
from multiprocessing.connection import Connection


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    from novainfer.cli import add_engine_args

    add_engine_args(parser)  # --model, -tp, --dtype, --device, --max-model-len, --seed
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1 (or env NOVAINFER_API_KEY; "
                        "default: no key needed)")
    parser.add_argument("--served-model-name", default=None,
                        help="model name clients must send (default: --model, or the default model's name)")
    parser.add_argument("--max-request-body-bytes", type=int, default=4 * 1024 * 1024,
                        help="larger request bodies get 413")
    parser.add_argument("--max-waiting-requests", type=int, default=1024,
                        help="new requests get 503 + Retry-After while this many are waiting")
    parser.add_argument("--shutdown-grace", type=float, default=30.0,
                        help="seconds in-flight requests may finish after SIGTERM/SIGINT")
    parser.add_argument("--log-level", default="info", help="uvicorn's: debug, info, warning, error")
    parser.add_argument("--api-server-count", type=int, default=None,
                        help="HTTP frontend processes sharing the port (tokenization, "
                        "detokenization, streaming) against one engine core process "
                        "(default: 2 on a GPU host with 8+ cores, else 1)")
    # the rest of the engine's options
    parser.add_argument("--max-num-seqs", type=int, default=256, help="sequences per step")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="tokens per step (default: 16384 on CUDA, 512 on the CPU)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    parser.add_argument("--num-kv-blocks", type=int, default=None,
                        help="KV-cache blocks (default: sized from memory)")
    parser.add_argument("--kv-cache-memory", type=int, default=None,
                        help="KV-cache bytes on the CPU (default: 2 GiB)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of GPU memory for weights, activations and KV cache")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="do not reuse the KV blocks of shared prompt prefixes")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                        help="dummy: random weights of the checkpoint's shapes (benchmarks)")
    parser.add_argument("--attention-backend", default="auto",
                        help="auto, torch, cpu, triton, flash_attn, cudnn")
    parser.add_argument("--enable-lora", action="store_true",
                        help="serve LoRA adapters: a request names one as its model")
    parser.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                        help="PEFT adapter folders served under NAME (implies --enable-lora)")
    parser.add_argument("--max-loras", type=int, default=1,
                        help="adapters in one step (device slots)")
    parser.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank")
    parser.add_argument("--max-cpu-loras", type=int, default=None,
                        help="adapters kept loaded on the CPU (default: --max-loras)")


def lora_modules(specs: list[str] | None) -> dict:
    """--lora-modules NAME=PATH ... as {name: LoRARequest}, ids 1, 2, ... in order."""
    from novainfer.lora.request import LoRARequest

    modules: dict = {}
    for spec in specs or ():
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes NAME=PATH, got {spec!r}")
        if name in modules:
            raise ValueError(f"--lora-modules names {name!r} twice")
        modules[name] = LoRARequest(name, len(modules) + 1, path)
    return modules


def served_name(args: argparse.Namespace) -> str:
    """The base model's name in requests and responses."""
    return args.served_model_name or (str(args.model) if args.model else "SmolLM2-135M-Instruct")


def default_api_server_count(device: str, cores: int | None = None) -> int:
    """Two frontends where the engine is fast enough to outrun one (a GPU: one frontend
    process falls behind 256 streams on an H200) and the host has cores to spare; else one."""
    cores = (os.cpu_count() or 1) if cores is None else cores
    if device == "cpu" or cores < 8:
        return 1
    if device == "auto":
        import torch

        if not torch.cuda.is_available():
            return 1
    return 2


def _widen(conn: Connection) -> None:
    """A 1 MiB pipe (Linux; 64 KiB by default) so that a frontend busy for a few steps does
    not stall the core's next send, nor a burst of new requests the frontend's."""
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), 1031, 1 << 20)  # F_SETPIPE_SZ
    except (ImportError, OSError):
        pass


def _ignore_signal(signum, frame) -> None:
    """Installed before uvicorn so that its re-raise after a graceful shutdown is a no-op."""


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the engine core process and the frontends (this process is frontend 0), serve
    until a signal or a dead engine core, and leave no process behind."""
    try:
        import uvicorn  # noqa: F401

        import novainfer.server.app  # noqa: F401
    except ImportError as exc:
        print(f"error: the server needs extra packages ({exc.name}); "
              "pip install 'novainfer[server]'", file=sys.stderr)
        return 2
    if args.api_server_count is None:
        args.api_server_count = default_api_server_count(args.device)
    if args.api_server_count < 1:
        print(f"error: --api-server-count must be at least 1, got {args.api_server_count}",
              file=sys.stderr)
        return 2
    from novainfer.config import EngineConfig
    from novainfer.server.engine_core import run_core_process

    try:
        args.loras = lora_modules(args.lora_modules)
        base = served_name(args)
        if base in args.loras:
            raise ValueError(f"--lora-modules name {base!r} is the base model's served name")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory=args.kv_cache_memory, gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=not args.no_prefix_caching, enforce_eager=args.enforce_eager,
        attention_backend=args.attention_backend, seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size, load_format=args.load_format,
        async_scheduling=args.async_scheduling, kv_cache_dtype=args.kv_cache_dtype,
        calculate_kv_scales=args.calculate_kv_scales,
        enable_lora=args.enable_lora or bool(args.loras), max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras,
    )
    ctx = mp.get_context("spawn")
    # Per frontend, one pipe each way: (core reads, frontend writes), (frontend reads, core
    # writes).
    links = [(ctx.Pipe(duplex=False), ctx.Pipe(duplex=False))
             for _ in range(args.api_server_count)]
    for to_core, to_front in links:
        _widen(to_core[0])
        _widen(to_front[0])
    # Not a daemon: the core starts the tensor-parallel workers. It ignores SIGINT/SIGTERM and
    # leaves when the frontends say goodbye or their pipes close.
    core = ctx.Process(target=run_core_process, name="novainfer-core", args=(
        config, [(to_core[0], to_front[1]) for to_core, to_front in links], args.log_level,
        list(args.loras.values())))
    core.start()
    for to_core, to_front in links:  # only the core holds its ends: its death reads as EOF
        to_core[0].close()
        to_front[1].close()
    others = []
    for index in range(1, args.api_server_count):
        to_core, to_front = links[index]
        p = ctx.Process(target=_frontend_process, name=f"novainfer-frontend-{index}",
                        args=(args, to_front[0], to_core[1], index))
        p.start()
        to_front[0].close()
        to_core[1].close()
        others.append(p)
    code = 1
    inbox, outbox = links[0][1][0], links[0][0][1]
    try:
        code = run_frontend(args, inbox, outbox, 0, others)
    finally:
        inbox.close()  # also when interrupted while the model loads: the core sees EOF
        outbox.close()
        for p in others:  # they drain too (SIGTERM was forwarded), or saw the core die
            p.join(args.shutdown_grace + 30)
            if p.is_alive():
                p.kill()
                p.join()
            if p.exitcode:
                code = code or 1
        core.join(60)
        if core.is_alive():
            logging.getLogger("novainfer.server").error("the engine core did not exit; killing it")
            core.kill()
            core.join()
    return code


def _frontend_process(args: argparse.Namespace, inbox: Connection, outbox: Connection,
                      index: int) -> None:
    """Entry point of frontends 1..N-1: their exit status is run_frontend's."""
    sys.exit(run_frontend(args, inbox, outbox, index))


def run_frontend(args: argparse.Namespace, inbox: Connection, outbox: Connection, index: int,
                 others: list | None = None) -> int:
    """One HTTP frontend: wait for the core's ready message, then serve on --port (several
    frontends share it through SO_REUSEPORT). 0 after an orderly shutdown, 1 when the
    engine core failed or died."""
    import uvicorn
    from transformers import AutoTokenizer

    from novainfer.server.app import ServerSettings, build_app
    from novainfer.server.engine_client import EngineClient
    from novainfer.server.engine_core import set_process_name
    from novainfer.server.metrics import Metrics

    log = logging.getLogger("novainfer.server")
    if index:
        set_process_name(f"novainfer-api{index}")
        logging.basicConfig(level=args.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        kind, info = pickle.loads(inbox.recv_bytes())
    except (EOFError, OSError):
        log.error("the engine core exited while starting")
        return 1
    except KeyboardInterrupt:
        return 130
    if kind != "ready":
        if index == 0:
            print(f"error: the engine core failed to start:\n{info}", file=sys.stderr)
        return 1
    api_key = args.api_key or os.environ.get("NOVAINFER_API_KEY") or None
    name = served_name(args)
    metrics = Metrics(name)
    tokenizer = AutoTokenizer.from_pretrained(info["tokenizer"])
    grace = args.shutdown_grace
    exit_code = [0]

    class Server(uvicorn.Server):
        """On the first SIGTERM/SIGINT: stop accepting (uvicorn), pass SIGTERM on to the other
        frontends, and after the grace period abort what is still running so that every
        stream still ends with a finish_reason."""

        def handle_exit(self, sig, frame):
            if not self.should_exit:
                loop = client._loop
                if loop is not None:
                    loop.call_soon_threadsafe(loop.call_later, grace, client.abort_all)
                for p in others or ():
                    if p.is_alive():
                        os.kill(p.pid, signal.SIGTERM)
            super().handle_exit(sig, frame)

    def on_death(reason: str) -> None:
        exit_code[0] = 1
        server.should_exit = True

    client = EngineClient(inbox, outbox, info, tokenizer, metrics, on_death, index,
                          args.api_server_count)
    metrics.gauges = lambda: client.snapshot
    settings = ServerSettings(served_model_name=name, api_key=api_key,
                              max_body_bytes=args.max_request_body_bytes,
                              max_waiting_requests=args.max_waiting_requests,
                              max_model_len=client.max_model_len, vocab_size=client.vocab_size,
                              frontend_index=index, lora_modules=args.loras)
    app = build_app(client, settings, metrics)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                               timeout_graceful_shutdown=grace + 5, timeout_keep_alive=5,
                               access_log=False)
    server = Server(uv_config)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _ignore_signal)
    sockets = None
    if args.api_server_count > 1:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((args.host, args.port))
        sockets = [sock]
    server.run(sockets=sockets)
    client.stop()  # after an orderly shutdown the lifespan did it; this covers a failed start
    if not server.started:
        exit_code[0] = 1
    return exit_code[0]
