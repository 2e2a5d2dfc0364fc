"""`novainfer serve`: arguments (no server imports) and the uvicorn runner."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading


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
    parser.add_argument("--attention-backend", default="auto",
                        help="auto, torch, cpu, triton, flash_attn")


def _ignore_signal(signum, frame) -> None:
    """Installed before uvicorn so that its re-raise after a graceful shutdown is a no-op."""


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from novainfer.server.app import ServerSettings, build_app
    except ImportError as exc:
        print(f"error: the server needs extra packages ({exc.name}); "
              "pip install 'novainfer[server]'", file=sys.stderr)
        return 2
    from novainfer.config import EngineConfig
    from novainfer.engine.llm_engine import LLMEngine
    from novainfer.server.async_engine import AsyncEngine
    from novainfer.server.metrics import Metrics

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = args.api_key or os.environ.get("NOVAINFER_API_KEY") or None
    config = EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory=args.kv_cache_memory, gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=not args.no_prefix_caching, enforce_eager=args.enforce_eager,
        attention_backend=args.attention_backend, seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    engine = LLMEngine(config)
    name = args.served_model_name or (str(args.model) if args.model else "SmolLM2-135M-Instruct")
    metrics = Metrics(name)
    async_engine = AsyncEngine(engine, metrics)
    metrics.gauges = lambda: async_engine.snapshot
    settings = ServerSettings(served_model_name=name, api_key=api_key,
                              max_body_bytes=args.max_request_body_bytes,
                              max_waiting_requests=args.max_waiting_requests,
                              max_model_len=engine.max_model_len,
                              vocab_size=engine.vocab_size)
    app = build_app(async_engine, settings, metrics)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                               timeout_graceful_shutdown=args.shutdown_grace,
                               timeout_keep_alive=5, access_log=False)
    grace = args.shutdown_grace

    class Server(uvicorn.Server):
        """On the first SIGTERM/SIGINT: stop accepting (uvicorn), and after the grace period
        abort what is still running so that every stream still ends with a finish_reason."""

        def handle_exit(self, sig, frame):
            if not self.should_exit:
                timer = threading.Timer(grace, async_engine.abort_all)
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    uv_config.timeout_graceful_shutdown = grace + 5
    server = Server(uv_config)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _ignore_signal)
    server.run()
    async_engine.stop()
    return 0
