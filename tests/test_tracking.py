"""Experiment tracking: real MLflow (file store) and W&B (offline) runs, and the error paths."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from agentprune import tracking
from agentprune.config import defaults
from agentprune.settings import ConfigError, TrackingSettings, build


def settings(**section) -> TrackingSettings:
    """The tracking settings: the schema's defaults with ``section`` over them."""
    return build(TrackingSettings, {**defaults("tracking"), **section}, "tracking")


METRICS = {
    "dataset": "digits",
    "model": "vit",
    "method": "isomorphic",
    "family": "structured",
    "ratio": 0.3,
    "seed": 1,
    "top1": 91.5,
    "loss": 0.31,
    "latency_ms": float("nan"),  # not finite: not logged
    "seconds": {"prune": 1.5, "finetune": 2.5},
    "planning": {"backend": None, "llm_calls": 0},
}
PARAMS = tracking.flat_params({"target": 0.3, "finetune": {"lr": 0.001, "augment": False}})
CURVES = {"finetune/loss": [0.9, 0.6, 0.4]}


def test_flat_views_of_metrics_and_params() -> None:
    flat = tracking.scalar_metrics(METRICS)
    assert flat["top1"] == 91.5 and flat["seconds/finetune"] == 2.5
    assert "latency_ms" not in flat and "dataset" not in flat and "planning/backend" not in flat
    assert PARAMS == {"target": 0.3, "finetune/lr": 0.001, "finetune/augment": False}


def test_off_by_default_logs_nothing() -> None:
    lines: list[str] = []
    assert tracking.log_run(settings(), METRICS, PARAMS, CURVES, log=lines.append) is None
    assert lines == []


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(tracking.TrackingError, match="tracking.backend='neptune': expected one"):
        tracking.check(settings(backend="neptune"))
    with pytest.raises(ConfigError, match="unknown key 'url'") as err:
        settings(url="x")
    assert "\n" not in str(err.value)


def test_missing_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(tracking.PACKAGES, "wandb", ("agentprune_no_such_module", "pip install x"))
    with pytest.raises(tracking.TrackingError, match="agentprune_no_such_module is not installed"):
        tracking.check(settings(backend="wandb"))


def test_mlflow_run_holds_params_curve_and_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlflow = pytest.importorskip("mlflow")
    # The file store needs no server or database (MLflow 3 wants this opt-in for it).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    section = settings(backend="mlflow", uri=uri, project="study", tags={"site": "test"})
    run_id = tracking.log_run(section, METRICS, PARAMS, CURVES, log=lambda _: None)
    assert run_id
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "vit/isomorphic/r0.3/s1"
    assert run.data.params == {k: str(v) for k, v in PARAMS.items()}
    assert run.data.metrics["top1"] == 91.5 and run.data.metrics["seconds/prune"] == 1.5
    history = client.get_metric_history(run_id, "finetune/loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.6), (2, 0.4)]
    assert run.data.tags["method"] == "isomorphic" and run.data.tags["site"] == "test"
    assert client.get_experiment(run.info.experiment_id).name == "study"


def test_wandb_offline_run_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    section = settings(backend="wandb", uri=str(tmp_path), mode="offline")
    run_id = tracking.log_run(section, METRICS, PARAMS, CURVES, log=lambda _: None)
    assert run_id
    files = list(tmp_path.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    data = files[0].read_bytes()
    # The run file is W&B's binary log: its records carry the names and keys in plain bytes.
    for text in (b"vit/isomorphic/r0.3/s1", b"finetune/loss", b"top1", b"finetune/lr"):
        assert text in data, text


def test_a_failing_tracker_never_fails_the_run(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    lines: list[str] = []
    # A tracking URI that no store accepts: MLflow raises, log_run reports and returns None.
    section = settings(backend="mlflow", uri="nosuchscheme://x")
    assert tracking.log_run(section, METRICS, PARAMS, CURVES, log=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("tracking: mlflow failed for vit/isomorphic")
    assert not math.isnan(METRICS["top1"])
