"""Resolve the user's `model` argument to a Hugging Face model folder."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import xxhash

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

    The cache is keyed by the file's content, so the same model copied or reached by
    another path reuses one conversion and an edited file gets a fresh one. The
    content hash is remembered per (path, size, mtime, ctime, inode) in a small index,
    so an unchanged file costs a stat() on later calls, not a re-read.
    """
    src = Path(gguf_path).expanduser().resolve()
    key = _content_hash(src)[:16]
    target = cache_root() / "gguf" / f"{name or src.stem}-{key}"
    # The name only helps people browsing the cache: a folder of this content under
    # another name (a copy of the file called differently) is just as good.
    for cached in [target, *sorted(target.parent.glob(f"*-{key}"))]:
        if (cached / "config.json").is_file():
            return cached

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


# Most recently hashed paths kept in the index; an older one is just hashed again.
_INDEX_ENTRIES = 256


def _index_path() -> Path:
    return cache_root() / "gguf-index.json"


def _stat_key(st: os.stat_result) -> list[int]:
    # ctime too: an in-place edit that restores size and mtime still changes it.
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _content_hash(src: Path) -> str:
    """xxh3-128 of the file's bytes (hex), from the index while the file is unchanged."""
    stat_key = _stat_key(src.stat())
    index = _read_index()
    entry = index.get(str(src))
    if isinstance(entry, dict) and entry.get("stat") == stat_key:
        digest = entry.get("xxh3_128")
        if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{32}", digest):
            return digest
    digest = _hash_file(src)
    if _stat_key(src.stat()) == stat_key:  # else it changed while we read it: remember nothing
        index.pop(str(src), None)
        index[str(src)] = {"stat": stat_key, "xxh3_128": digest}
        _write_index(dict(list(index.items())[-_INDEX_ENTRIES:]))
    return digest


def _hash_file(path: Path) -> str:
    """xxh3-128 over the file, streamed through one 1 MiB buffer: ~11 ms for the 98 MB
    default GGUF in the page cache (sha256 takes ~80 ms), a disk read when not."""
    h = xxhash.xxh3_128()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _read_index() -> dict:
    try:
        index = json.loads(_index_path().read_text())
    except (OSError, ValueError):  # missing or corrupt: start afresh
        return {}
    return index if isinstance(index, dict) else {}


def _write_index(index: dict) -> None:
    # Replaced whole and atomically: concurrent writers may drop each other's new entries
    # (costing a re-hash later) but never leave a torn file. A read-only cache keeps none.
    path = _index_path()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(index, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
