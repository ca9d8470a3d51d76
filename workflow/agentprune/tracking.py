"""Optional experiment tracking: each run's settings and results sent to MLflow or W&B.

Off by default (``tracking.backend: none``). The evaluate step calls :func:`log_run` after it has
written ``metrics.json``, so a tracking server that is down never costs a result: the failure is
logged and the job succeeds. A backend whose package is missing is a configuration error, raised
by :func:`check` before the step does any work.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Mapping
from typing import Any

from agentprune.settings import TrackingSettings

BACKENDS = ("none", "mlflow", "wandb")
# The package each backend imports, and how to get it.
PACKAGES = {
    "mlflow": ("mlflow", "pip install mlflow-skinny"),
    "wandb": ("wandb", "pip install wandb"),
}


class TrackingError(ValueError):
    """The tracking settings cannot work (unknown backend, package missing)."""


def check(settings: TrackingSettings) -> TrackingSettings:
    """Check that the tracking backend is known and its package importable.

    Raises:
        TrackingError: one line naming the key and the fix.
    """
    if settings.backend not in BACKENDS:
        raise TrackingError(
            f"tracking.backend={settings.backend!r}: expected one of {', '.join(BACKENDS)}"
        )
    if settings.backend != "none":
        module, install = PACKAGES[settings.backend]
        if importlib.util.find_spec(module) is None:
            raise TrackingError(
                f"tracking.backend={settings.backend!r} but {module} is not installed ({install})"
            )
    return settings


def run_name(identity: Mapping[str, Any]) -> str:
    """``model/method/r{ratio}/s{seed}``: the same name in every backend."""
    return f"{identity['model']}/{identity['method']}/r{identity['ratio']}/s{identity['seed']}"


def scalar_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of ``metrics.json``, nested keys joined with ``/``."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= scalar_metrics(value, prefix=f"{name}/")
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int | float) and math.isfinite(float(value)):
            flat[name] = float(value)
    return flat


def flat_params(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``a/b`` keys, every leaf kept (lists and None as their text)."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flat_params(value, prefix=f"{name}/")
        else:
            flat[name] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def _log_mlflow(
    settings: TrackingSettings,
    name: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    curves: Mapping[str, list[float]],
    tags: Mapping[str, str],
) -> str:
    import mlflow

    if settings.uri:
        mlflow.set_tracking_uri(settings.uri)
    mlflow.set_experiment(settings.project)
    with mlflow.start_run(run_name=name, tags=dict(tags)) as run:
        mlflow.log_params({k: str(v) for k, v in params.items()})
        for curve, values in curves.items():
            for step, value in enumerate(values):
                mlflow.log_metric(curve, float(value), step=step)
        mlflow.log_metrics(dict(metrics))
    return run.info.run_id


def _log_wandb(
    settings: TrackingSettings,
    name: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    curves: Mapping[str, list[float]],
    tags: Mapping[str, str],
) -> str:
    import wandb

    run = wandb.init(
        project=settings.project,
        name=name,
        config=dict(params),
        tags=[f"{k}={v}" for k, v in tags.items()],
        mode=settings.mode,
        dir=settings.uri,
        reinit="finish_previous",
    )
    try:
        length = max((len(v) for v in curves.values()), default=0)
        for step in range(length):
            run.log({c: float(v[step]) for c, v in curves.items() if step < len(v)}, step=step)
        run.summary.update(dict(metrics))
        return str(run.id)
    finally:
        run.finish()


LOGGERS: dict[str, Callable[..., str]] = {"mlflow": _log_mlflow, "wandb": _log_wandb}


def log_run(
    settings: TrackingSettings,
    metrics: Mapping[str, Any],
    params: Mapping[str, Any],
    curves: Mapping[str, list[float]] | None = None,
    log: Callable[[str], None] = print,
) -> str | None:
    """Send one run to the configured tracker.

    Args:
        settings: The tracking settings.
        metrics: The run's ``metrics.json`` (identity keys name the run and become tags).
        params: Flat settings to record (plan, fine-tuning recipe).
        curves: Per-epoch series, e.g. ``{"finetune/loss": [...]}``.
        log: Where the one-line outcome (or failure) goes.

    Returns:
        The tracker's run id, or None when tracking is off or failed.
    """
    check(settings)
    if settings.backend == "none":
        return None
    identity = {k: str(metrics[k]) for k in ("dataset", "model", "method", "ratio", "seed")}
    tags = {**identity, **settings.tags}
    name = run_name(identity)
    try:
        run_id = LOGGERS[settings.backend](
            settings, name, params, scalar_metrics(metrics), dict(curves or {}), tags
        )
    except Exception as err:  # noqa: BLE001 — the results are written; tracking is best effort
        log(f"tracking: {settings.backend} failed for {name}: {type(err).__name__}: {err}")
        return None
    log(f"tracking: {name} logged to {settings.backend} as run {run_id}")
    return run_id
