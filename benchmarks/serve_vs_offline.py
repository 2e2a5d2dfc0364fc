"""Served vs offline throughput on one model shape, in one run (issue: serving at the engine's
speed). Builds a model folder (a preset's shape, random bf16 weights, a word-level
tokenizer), then:

  offline: novainfer bench --model DIR --num-seqs 256 --max-input-len 921 --max-output-len 921
  served:  novainfer serve --model DIR --api-server-count K
           novainfer bench serve --num-prompts 256 --random-input-len 512
               --random-output-len 512 --random-range-ratio 0.8 --num-clients C

and prints one table (output tok/s, served/offline, mean TPOT vs the offline step time).
With --old PATH (a checkout of older code), its offline and served runs come first: the
same folder, lengths and clients, for a before/after in one call.
Usage: python benchmarks/serve_vs_offline.py [--preset qwen3-0.6b] [--counts 1 2] [--old P]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def make_folder(preset: str, out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from novainfer.presets import PRESETS

    cfg = dict(PRESETS[preset])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out),
                                                 torch_dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, cfg["vocab_size"]):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(code: Path | None) -> dict:
    """The environment that runs `code`'s novainfer (this checkout's by default)."""
    path = [str(code or ROOT), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))


def cli(*args: str, timeout: float, code: Path | None = None) -> dict:
    cmd = [sys.executable, "-m", "novainfer.cli", *args, "--json"]
    print("$", " ".join(cmd[2:]), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=code or ROOT,
                         check=False, env=env_for(code))
    if out.returncode != 0:
        print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def served(folder: Path, count: int, clients: int, extra: list[str],
           code: Path | None = None) -> dict:
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"serve-{count}{'-old' if code else ''}.log"
    cmd = [sys.executable, "-m", "novainfer.cli", "serve", "--model", str(folder),
           "--port", str(port), "--max-model-len", "4096", "--log-level", "warning", *extra]
    if count > 1:
        cmd += ["--api-server-count", str(count)]
    print("$", " ".join(cmd[2:]), flush=True)
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=code or ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env=env_for(code))
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()[-3000:])
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return cli("bench", "serve", "--base-url", url, "--num-prompts", "256",
                   "--random-input-len", "512", "--random-output-len", "512",
                   "--random-range-ratio", "0.8", "--num-clients", str(clients), timeout=900)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2], help="--api-server-count")
    p.add_argument("--clients", type=int, default=4, help="bench serve --num-clients")
    p.add_argument("--device", default="auto")
    p.add_argument("--old", type=Path, default=None, help="an older checkout to compare")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    old = args.old.resolve() if args.old else None
    folder = make_folder(args.preset, Path(tempfile.mkdtemp()) / args.preset)
    extra = ["--device", args.device]
    rows, results = [], {}
    for label, code, counts in (("before", old, [1]), ("now", None, args.counts)):
        if label == "before" and code is None:
            continue
        offline = cli("bench", "--model", str(folder), "--num-seqs", "256", "--max-input-len",
                      "921", "--max-output-len", "921", *extra, timeout=900, code=code)
        step_ms = 1000 * offline["seconds"] / offline["steps"]
        rows.append((f"{label}: offline", offline["output_tok_s"], 1.0, None, step_ms))
        print(f"  {rows[-1][0]}: {offline['output_tok_s']:,.0f} tok/s", flush=True)
        results[label] = {"offline": offline, "served": {}}
        for count in counts:
            res = served(folder, count, args.clients, extra, code)
            results[label]["served"][count] = res
            rows.append((f"{label}: served, {count} frontend(s)", res["output_throughput"],
                         res["output_throughput"] / offline["output_tok_s"],
                         res["mean_tpot_ms"], step_ms))
            print(f"  {rows[-1][0]}: {res['output_throughput']:,.0f} tok/s, mean TPOT "
                  f"{res['mean_tpot_ms']:.2f} ms", flush=True)
    print(f"\n{args.preset}; bench serve --num-clients {args.clients}")
    print(f"| {'run':<30} | output tok/s | vs offline | mean TPOT ms | TPOT / offline step |")
    for name, tps, ratio, tpot, step in rows:
        t = f"{tpot:.2f}" if tpot is not None else f"(step {step:.2f})"
        r = f"{tpot / step:.2f}" if tpot is not None else "-"
        print(f"| {name:<30} | {tps:>12,.0f} | {ratio:>9.0%} | {t:>11} | {r:>19} |")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
