"""Text for calibration and evaluation, cut into fixed-length token windows.

Corpora and their split (calibration and evaluation never share text):

* ``pydoc``: the help topics that CPython ships in ``pydoc_data.topics`` (every CPython has
  them, so no download is needed). The topic keys are sorted; every fourth key, starting with the
  first, goes to evaluation, the rest to calibration; each part is its topics' texts joined by a
  blank line in key order. The text is the running interpreter's documentation, so the numbers
  depend on the CPython minor version; its SHA-256 is recorded with the windows.
* ``wikitext2``: WikiText-2 raw (``wikitext-2-raw-v1``) through ``datasets``, from the hub or a
  local copy; as in Wanda and SparseGPT, calibration is drawn from the train split and
  evaluation is the test split, each joined by a blank line.

Windows: calibration = ``n`` windows at random starts drawn with the seed from the tokenized
calibration text (Wanda/SparseGPT style); evaluation = the consecutive non-overlapping windows of
the tokenized evaluation text (a trailing partial window is dropped), the first ``m`` of them or
all. :func:`save_windows` writes them to safetensors, so later steps need no tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agentprune.lm.settings import TextSettings

FORMAT = "agentprune.lm.windows/v1"
PYDOC_EVAL_EVERY = 4
WIKITEXT = ("wikitext", "wikitext-2-raw-v1")


@dataclass
class TokenWindows:
    """Token ids ready for pruning and evaluation.

    Attributes:
        calibration: ``(n, seq)`` int64 calibration windows.
        evaluation: ``(m, seq)`` int64 evaluation windows.
        meta: provenance (settings, corpus hashes, token counts, tokenizer name).
    """

    calibration: torch.Tensor
    evaluation: torch.Tensor
    meta: dict[str, Any]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def pydoc_split() -> tuple[str, str]:
    """``(calibration text, evaluation text)`` of Python's ``pydoc_data.topics``."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:
        raise ValueError(f"this Python has no pydoc_data.topics ({err})") from err
    keys = sorted(topics)
    evaluation = [topics[k] for i, k in enumerate(keys) if i % PYDOC_EVAL_EVERY == 0]
    calibration = [topics[k] for i, k in enumerate(keys) if i % PYDOC_EVAL_EVERY != 0]
    return "\n\n".join(calibration), "\n\n".join(evaluation)


def _wikitext_local(root: Path) -> Any:
    """A local WikiText-2 copy: a ``save_to_disk`` folder or a folder with its parquet files."""
    import datasets

    if (root / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(root))
    files = {}
    for split in ("train", "test"):
        found = sorted(root.rglob(f"{split}-*.parquet")) or sorted(root.rglob(f"*{split}*.parquet"))
        if found:
            files[split] = [str(p) for p in found]
    if set(files) != {"train", "test"}:
        raise ValueError(
            f"{root}: no WikiText-2 copy here (need a save_to_disk folder or train/test parquet "
            "files)"
        )
    return datasets.load_dataset("parquet", data_files=files)


def wikitext2_split(root: str | None) -> tuple[str, str]:
    """``(train text, test text)`` of WikiText-2 raw, from ``root`` or the hub."""
    import datasets

    if root is not None:
        path = Path(root)
        if not path.is_dir():
            raise ValueError(f"{root}: the WikiText-2 root is not a directory")
        data = _wikitext_local(path)
    else:
        try:
            data = datasets.load_dataset(*WIKITEXT)
        except Exception as err:  # offline, no cache: datasets raises many kinds
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"cannot read WikiText-2 from the hub ({first}); set the dataset root to a copy"
            ) from err
    for split in ("train", "test"):
        if split not in data or "text" not in data[split].column_names:
            raise ValueError(f"the WikiText-2 copy has no {split!r} split with a 'text' column")
    return "\n\n".join(data["train"]["text"]), "\n\n".join(data["test"]["text"])


def corpus_split(settings: TextSettings) -> tuple[str, str]:
    """``(calibration text, evaluation text)`` of the configured corpus."""
    if settings.corpus == "pydoc":
        return pydoc_split()
    return wikitext2_split(settings.root)


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The 1-D int64 token ids of ``text`` (with the tokenizer's own special tokens, as Wanda
    tokenizes its joined corpora)."""
    # The tokenizer warns about texts longer than the model's context; windows come later.
    verbose = getattr(tokenizer, "verbose", None)
    if verbose is not None:
        tokenizer.verbose = False
    try:
        ids = tokenizer(text, return_tensors="pt").input_ids
    finally:
        if verbose is not None:
            tokenizer.verbose = verbose
    return ids.reshape(-1).to(torch.int64)


def calibration_windows(ids: torch.Tensor, count: int, seq_len: int, seed: int) -> torch.Tensor:
    """``count`` windows of ``seq_len`` tokens at uniformly random starts (seeded)."""
    if ids.numel() < seq_len + 1:
        raise ValueError(
            f"the calibration text has {ids.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (count,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def evaluation_windows(ids: torch.Tensor, seq_len: int, limit: int | None) -> torch.Tensor:
    """The consecutive non-overlapping ``seq_len`` windows of ``ids``, the first ``limit`` or
    all."""
    available = ids.numel() // seq_len
    if available == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than {seq_len}")
    if limit is not None and limit > available:
        raise ValueError(
            f"evaluation_sequences = {limit} but the evaluation text has only {available} "
            f"windows of {seq_len} tokens"
        )
    count = available if limit is None else limit
    return ids[: count * seq_len].reshape(count, seq_len).clone()


def build_windows(tokenizer: Any, settings: TextSettings) -> TokenWindows:
    """Split the corpus, tokenize both parts and cut them into windows."""
    calibration_text, evaluation_text = corpus_split(settings)
    calibration_ids = tokenize(tokenizer, calibration_text)
    evaluation_ids = tokenize(tokenizer, evaluation_text)
    meta = {
        "settings": settings.to_dict(),
        "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
        "calibration_text_sha256": _sha(calibration_text),
        "evaluation_text_sha256": _sha(evaluation_text),
        "calibration_tokens": int(calibration_ids.numel()),
        "evaluation_tokens": int(evaluation_ids.numel()),
    }
    return TokenWindows(
        calibration=calibration_windows(
            calibration_ids, settings.calibration_sequences, settings.seq_len, settings.seed
        ),
        evaluation=evaluation_windows(
            evaluation_ids, settings.seq_len, settings.evaluation_sequences
        ),
        meta=meta,
    )


def save_windows(windows: TokenWindows, path: str | Path) -> Path:
    """Write ``windows`` to one safetensors file (the meta as JSON in its header)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "calibration": windows.calibration.contiguous(),
        "evaluation": windows.evaluation.contiguous(),
    }
    save_file(tensors, str(path), metadata={"format": FORMAT, "meta": json.dumps(windows.meta)})
    return path


def load_windows(path: str | Path) -> TokenWindows:
    """Read windows written by :func:`save_windows`; one-line errors name the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: token windows file is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if header.get("format") != FORMAT:
                raise ValueError(f"{path}: not an agentprune token windows file")
            tensors = {k: handle.get_tensor(k) for k in ("calibration", "evaluation")}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    return TokenWindows(meta=json.loads(header["meta"]), **tensors)
