"""What `trace` and `profile` share: loading a model or a preset, and their CLI arguments."""

from __future__ import annotations

import argparse


def model_args(parser: argparse.ArgumentParser) -> None:
    from novainfer.presets import PRESETS

    parser.add_argument("--model", default=None, help="HF model folder or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="random weights of a known shape (no download, no tokenizer)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: the model's own (presets: 2048)")
    from novainfer.cli import add_tensor_parallel_arg

    add_tensor_parallel_arg(parser)


def load_llm(args: argparse.Namespace, enforce_eager: bool = True, **kwargs):
    """An LLM for a tool run: --model (real weights) or --preset (dummy weights, token ids only)."""
    from novainfer import LLM
    from novainfer.presets import preset_folder

    if args.model and args.preset:
        raise ValueError("give --model or --preset, not both")
    extra = dict(kwargs)
    model = args.model
    max_model_len = args.max_model_len
    if args.preset:
        max_model_len = max_model_len or 2048
        model = str(preset_folder(args.preset))
        extra.update(load_format="dummy", skip_tokenizer_init=True)
    return LLM(model, dtype=args.dtype, device=args.device, max_model_len=max_model_len,
               enforce_eager=enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
               **extra)


def prompt_ids(llm, prompt: str | None, length: int = 16) -> list[int] | str:
    """The prompt as given (text), or `length` fixed token ids when the model has no tokenizer."""
    if llm.get_tokenizer() is not None and prompt:
        return prompt
    vocab = llm.llm_engine.vocab_size
    return [(17 + 31 * i) % vocab for i in range(length)]
