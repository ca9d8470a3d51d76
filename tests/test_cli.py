"""Tests of the ``agentprune`` command line (agentprune.cli).

The end-to-end runs prune ``deit_tiny_patch16_224`` on the synthetic data set at 64 px; with the
repository config that name resolves to the config's shrunk ``vit`` entry (matched by its timm
name), so a whole run takes seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from agentprune.cli import main

ROOT = Path(__file__).resolve().parents[1]


TINY = [
    "--model",
    "deit_tiny_patch16_224",
    "--method",
    "magnitude_l2",
    "--dataset",
    "synthetic",
    "--no-pretrained",
    "--img-size",
    "64",
]


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line]


@pytest.fixture(scope="module")
def ratio_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """One ``--ratio 0.4`` run, shared by the tests that need a finished run."""
    out = tmp_path_factory.mktemp("ratio")
    code = main(["prune", *TINY, "--ratio", "0.4", "--out", str(out)])
    return code, out


def test_prune_ratio_writes_artifacts(ratio_run: tuple[int, Path]) -> None:
    code, out = ratio_run
    assert code == 0
    for name in ("plan.json", "pruned.safetensors", "pruned.json", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = _read(out / "metrics.json")
    assert metrics["family"] == "structured"
    assert metrics["method"] == "magnitude_l2"
    assert metrics["dataset"] == "synthetic"
    assert metrics["ratio"] == pytest.approx(0.4)
    assert abs(metrics["achieved"] - 0.4) <= 0.005
    assert metrics["macs"] < metrics["macs_base"]
    assert _read(out / "profile.json") == {}  # magnitude_l2 does not read the profile


def test_prune_target_gmacs(
    ratio_run: tuple[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, first = ratio_run
    base_macs = _read(first / "base" / "metrics.json")["macs"]
    target_macs = 0.65 * base_macs
    code = main(["prune", *TINY, "--target-gmacs", repr(target_macs / 1e9), "--out", str(tmp_path)])
    assert code == 0
    metrics = _read(tmp_path / "metrics.json")
    assert metrics["macs_base"] == base_macs
    assert metrics["ratio"] == pytest.approx(0.35)
    # A GMACs target is met within 0.5 % of itself, not of the base model's MACs.
    assert abs(metrics["macs"] - target_macs) <= 0.005 * target_macs
    plan = _read(tmp_path / "plan.json")
    assert plan["target"]["gmacs"] == pytest.approx(target_macs / 1e9)
    assert _read(tmp_path / "prune_report.json")["search"]["target_macs"] == int(target_macs)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "magnitude_l2" in summary and "GMACs" in summary


def test_bad_ratio_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["prune", *TINY, "--ratio", "1.5", "--out", str(tmp_path)])
    assert exc.value.code == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1
    assert "--ratio" in errors[0] and "1.5" in errors[0]
    assert not any(tmp_path.iterdir())


def test_unknown_method_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["prune", *TINY, "--ratio", "0.4", "--out", str(tmp_path)]
    argv[argv.index("magnitude_l2")] = "no_such_method"
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1
    assert "no_such_method" in errors[0] and "magnitude_l2" in errors[0]


def test_ratio_and_gmacs_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["prune", *TINY, "--ratio", "0.4", "--target-gmacs", "1", "--out", str(tmp_path)])
    assert exc.value.code == 2


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SystemExit) as exc:
        main(["prune", *TINY, "--ratio", "0.4", "--config", str(missing), "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "nope.yaml" in _error_lines(capsys.readouterr().err)[0]


def test_unknown_model_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["prune", *TINY, "--ratio", "0.4", "--out", str(tmp_path)]
    argv[argv.index("deit_tiny_patch16_224")] = "no_such_model_xyz"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == "agentprune: error: model 'no_such_model_xyz' is not a timm model name"


def test_target_gmacs_above_base_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["prune", *TINY, "--target-gmacs", "1000", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("agentprune: error: --target-gmacs 1000 must be below")
    assert "\n" not in err


def test_method_settings_parse_as_yaml() -> None:
    from agentprune.cli import parse_method_settings

    parsed = parse_method_settings(["mode=as_published", "round_to=4", "ignored=[a, b]"])
    assert parsed == {"mode": "as_published", "round_to": 4, "ignored": ["a", "b"]}


@pytest.mark.parametrize(
    ("item", "message"),
    [("round_to", "'round_to' is not KEY=VALUE"), ("=4", "'=4' is not KEY=VALUE")],
)
def test_bad_method_setting_exits_2(
    item: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["prune", *TINY, "--ratio", "0.4", "--method-setting", item, "--out", str(tmp_path)])
    assert exc.value.code == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and message in errors[0]


def test_unknown_method_setting_key_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --method-setting key the method's settings do not accept is a ConfigError of
    ``Method.resolve_settings`` naming the key and the close known one."""
    argv = ["prune", *TINY, "--ratio", "0.4", "--method-setting", "round_too=4"]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "agentprune: error: config error at 'method_settings.magnitude_l2': "
        "unknown key 'round_too' (did you mean 'round_to'?)"
    )
    assert not (tmp_path / "plan.json").exists()


def test_published_recipes_come_from_the_paper_config() -> None:
    """Without rows in the loaded config, isomorphic gets config/paper.yaml's (the published
    recipes per architecture and GMACs target); --method-setting goes on top."""
    import yaml
    from agentprune.cli import build_config, build_parser

    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text(encoding="utf-8"))
    rows = paper["method_settings"]["isomorphic"]["published"]
    argv = ["prune", *TINY, "--ratio", "0.4", "--out", "unused"]
    argv[argv.index("magnitude_l2")] = "isomorphic"
    args = build_parser().parse_args([*argv, "--method-setting", "mode=as_published"])
    settings = build_config(args)["method_settings"]
    assert settings == {"isomorphic": {"published": rows, "mode": "as_published"}}
    args = build_parser().parse_args(["prune", *TINY, "--ratio", "0.4", "--out", "unused"])
    assert build_config(args)["method_settings"] == {}  # magnitude_l2 has no published rows


def test_as_published_without_a_row_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["prune", *TINY, "--ratio", "0.4", "--out", str(tmp_path)]
    argv[argv.index("magnitude_l2")] = "isomorphic"
    assert main([*argv, "--method-setting", "mode=as_published"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("agentprune: error: isomorphic mode as_published needs a published row")
    assert "\n" not in err
