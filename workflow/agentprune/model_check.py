"""Is a ``models`` entry buildable? Checked before any job, answered from a cache when it can.

A timm name must be in timm's registry and the entry's ``overrides`` must be keywords its
constructor accepts with values it can build: the model is created on the ``meta`` device (no
memory, no weights). Importing timm and building costs seconds, so every verdict is cached per
(timm version, name, overrides) in ``$XDG_CACHE_HOME/agentprune/model-checks.json``
(``~/.cache`` by default): a rerun of the same study, or a dry run, checks from the cache without
importing timm.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CACHE_NAME = "model-checks.json"


def cache_path() -> Path:
    """The verdict cache file."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "agentprune" / CACHE_NAME


def _key(timm_name: str, overrides: Mapping[str, Any]) -> str:
    try:
        version = importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        version = "missing"
    return json.dumps([version, timm_name, overrides], sort_keys=True, default=str)


def _read_cache() -> dict[str, list[str] | None]:
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache: dict[str, list[str] | None]) -> None:
    """Best effort: an unwritable cache only costs the next check its time."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as fh:
            json.dump(cache, fh)
        os.replace(fh.name, path)
    except OSError:
        pass


def build_problem(timm_name: str, overrides: Mapping[str, Any]) -> list[str] | None:
    """What is wrong with building ``timm_name`` with ``overrides``.

    Returns:
        None when it builds, else ``[field, message]``: field ``timm`` when timm has no such
        model, ``overrides.<key>`` for a keyword the constructor does not take, ``overrides``
        when the values do not build.
    """
    import timm
    import torch

    if not timm.is_model(timm_name):
        close = timm.list_models(f"*{timm_name.split('.')[0][:6]}*")[:3]
        hint = f" (similar: {', '.join(close)})" if close else ""
        return ["timm", f"{timm_name!r} is not a timm model name{hint}"]
    try:
        with torch.device("meta"):
            timm.create_model(timm_name, pretrained=False, num_classes=10, **dict(overrides))
    except Exception as err:  # noqa: BLE001 - any constructor failure is the entry's problem
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, TypeError) and "unexpected keyword argument" in text:
            keyword = text.rsplit("argument", 1)[-1].strip(" '\"")
            return [f"overrides.{keyword}", f"{timm_name} does not take this keyword"]
        return ["overrides", f"{timm_name} cannot be built with these overrides ({text})"]
    return None


def check_entries(entries: list[tuple[str, str, Mapping[str, Any]]]) -> list[tuple[str, str]]:
    """The problems of ``(where, timm name, overrides)`` entries, from the cache when it knows.

    Returns:
        ``(dotted key, message)`` for every entry that does not build, in order.
    """
    cache = _read_cache()
    problems = []
    dirty = False
    for where, timm_name, overrides in entries:
        key = _key(timm_name, overrides)
        if key not in cache:
            cache[key] = build_problem(timm_name, overrides)
            dirty = True
        verdict = cache[key]
        if verdict is not None:
            problems.append((f"{where}.{verdict[0]}", str(verdict[1])))
    if dirty:
        _write_cache(cache)
    return problems
