"""Convert a GGUF checkpoint (Llama / Qwen2 / Qwen3) into a float32 Hugging Face folder.

We lean on transformers' own GGUF reader (metadata -> config, llama.cpp tensor
names -> HF names, reversal of llama.cpp's q/k row permutation, dequantization)
but drive it ourselves: `from_pretrained(gguf_file=...)` for models requires
`accelerate`, which we do not want as a dependency.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import gguf

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")


def _open_reader(gguf_path: Path) -> gguf.GGUFReader:
    """`gguf.GGUFReader` over the file; a file it cannot parse raises ValueError naming it.

    gguf-py fails on damaged files with whatever it or numpy raised (`GGUF magic invalid`,
    a reshape or index error on a truncated file, `cannot mmap an empty file`), without
    the file's name.
    """
    import gguf

    try:
        return gguf.GGUFReader(str(gguf_path))
    except OSError:
        raise
    except Exception as e:  # any parse failure of an untrusted file means "not GGUF"
        with open(gguf_path, "rb") as f:
            magic = f.read(4)
        if not magic:
            why = "the file is empty"
        elif magic != b"GGUF":
            why = f"it does not start with the GGUF magic bytes (found {magic!r})"
        else:
            why = f"it is truncated or damaged ({type(e).__name__}: {e})"
        raise ValueError(f"model file '{gguf_path}' is not a valid GGUF file: {why}") from e


def _read_arch(gguf_path: Path, reader: gguf.GGUFReader) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"model: GGUF file '{gguf_path}' has no general.architecture metadata")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


@contextlib.contextmanager
def _memoized_gguf(gguf_path: Path, shared: gguf.GGUFReader) -> Iterator[None]:
    """Share expensive gguf-py work across transformers' calls during one conversion.

    transformers re-parses the file for the config, the tokenizer and the tensors
    (~5 s each for a 49k-token vocab), and rebuilds the tensor-name map once per
    submodule (~400 times). Both results are pure, so we reuse them.
    """
    import gguf

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map

    def reader(path, *args, **kwargs):  # same call shape as GGUFReader
        if not args and not kwargs and Path(path).resolve() == gguf_path:
            return shared
        return original_reader(path, *args, **kwargs)

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Dequantize `gguf_path` to float32 and write an HF model folder into `out_dir`.

    Writes config.json, model.safetensors, tokenizer files (with the chat template
    from the GGUF metadata) and generation_config.json.
    """
    try:
        import gguf  # noqa: F401  (optional extra; only needed here)
        import numpy  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "Loading a .gguf model needs the 'gguf' package: pip install gguf  "
            "(or pip install 'novainfer[gguf]')"
        ) from e
    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    import sys

    from transformers.utils import logging as hf_logging

    reader = _open_reader(gguf_path)
    print(f"novainfer: converting {gguf_path.name} once into {out_dir.parent}", file=sys.stderr)
    # One line above instead of transformers' per-tensor progress bars.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with _memoized_gguf(gguf_path, reader):
            _convert(gguf_path, reader, out_dir)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _convert(gguf_path: Path, reader: gguf.GGUFReader, out_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    arch = _read_arch(gguf_path, reader)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"model: GGUF architecture '{arch}' is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # A meta-device model only serves as the HF-name template for the tensor map.
    with torch.device("meta"):
        template = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=template)
    tensors: dict[str, torch.Tensor] = {
        k: v.to(torch.float32).contiguous() for k, v in parsed["tensors"].items()
    }
    # Tied checkpoints have no output.weight; HF expects no lm_head entry then.
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    missing = {k for k in template.state_dict() if k not in tensors} - (
        {"lm_head.weight"} if config.tie_word_embeddings else set()
    )
    missing = {k for k in missing if "rotary_emb" not in k}
    if missing:
        raise ValueError(f"model: GGUF file '{gguf_path}' lacks tensors {sorted(missing)[:5]}")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    config.architectures = [type(template).__name__]
    config.dtype = torch.float32
    config.save_pretrained(out_dir)
    # transformers 5 writes `dtype`; older readers look for `torch_dtype`.
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = cfg["torch_dtype"] = "float32"
    cfg.pop("_model_name_or_path", None)  # GGUF general.name, not a path
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(out_dir)
    _inline_chat_template(out_dir, tokenizer.chat_template)

    gen = GenerationConfig(
        bos_token_id=config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id,
        eos_token_id=config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None),
    )
    gen.save_pretrained(out_dir)


def _inline_chat_template(out_dir: Path, template: str | None) -> None:
    """Also store the chat template inside tokenizer_config.json.

    transformers 5 saves it to chat_template.jinja; tools that only read
    tokenizer_config.json (and our own engine) should still find it there.
    """
    if not template:
        return
    path = out_dir / "tokenizer_config.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["chat_template"] = template
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
