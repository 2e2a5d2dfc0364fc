"""Resolve the user's `model` argument to a Hugging Face model folder."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

ALLOWED = "a Hugging Face model folder containing config.json, or a .gguf file"


def cache_root() -> Path:
    """Where converted models live: $NOVAINFER_CACHE_DIR, else ~/.cache/novainfer."""
    env = os.environ.get("NOVAINFER_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "novainfer"


def resolve_model(model: str | os.PathLike | None) -> Path:
    """Return an HF model folder for `model` (None -> the built-in default model)."""
    if model is None:
        from novainfer.loader.default_model import default_model_path

        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model path '{model}' does not exist; model must be {ALLOWED}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model folder '{model}' has no config.json; model must be {ALLOWED}"
            )
        return path.resolve()
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"model file '{model}' is not a .gguf file; model must be {ALLOWED}")
    return gguf_to_hf_folder(path)


def gguf_to_hf_folder(gguf_path: str | os.PathLike, name: str | None = None) -> Path:
    """Convert `gguf_path` once into the cache and return the cached HF folder.

    The cache key covers absolute path, size and mtime, so an edited or replaced
    file gets a fresh conversion while repeated calls are just a stat().
    """
    src = Path(gguf_path).expanduser().resolve()
    st = src.stat()
    key = hashlib.sha256(f"{src}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "gguf" / f"{name or src.stem}-{key}"
    if (target / "config.json").is_file():
        return target

    from novainfer.loader.gguf import convert_gguf

    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a sibling temp dir and rename: an interrupted conversion
    # never leaves a half-written folder under the final name.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        convert_gguf(src, tmp)
        # mkdtemp (and safetensors) create owner-only files; the cache is shared.
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race; its folder is equally good.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
