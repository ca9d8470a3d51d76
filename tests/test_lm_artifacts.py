"""lm artifacts, text windows, settings and perplexity, on tiny models (CPU, no network)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from agentprune.lm import evaluate, models, text
from agentprune.lm.settings import (
    EngineSettings,
    LayerICBSSettings,
    ModelSource,
    SparseGPTSettings,
    TextSettings,
)
from agentprune.models import CheckpointError
from torch import nn

transformers = pytest.importorskip("transformers")

SOURCE = ModelSource(name="tiny-test", gguf_file=None, dtype="float32")


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


def text_settings(**overrides) -> TextSettings:
    raw = {
        "corpus": "pydoc",
        "root": None,
        "seq_len": 32,
        "calibration_sequences": 4,
        "evaluation_sequences": 3,
        "seed": 0,
    }
    return TextSettings(**{**raw, **overrides})


class CharTokenizer:
    """A stand-in tokenizer: one id per byte (the windows' logic does not need a real one)."""

    name_or_path = "bytes"

    def __call__(self, text: str, return_tensors: str = "pt") -> SimpleNamespace:
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)[None, :]
        return SimpleNamespace(input_ids=ids)


# --- artifacts --------------------------------------------------------------------------------


def test_save_load_round_trip_is_bitwise(tmp_path) -> None:
    model = tiny_llama()
    with torch.no_grad():  # a pruned-looking model: zeros must survive too
        model.model.layers[0].mlp.up_proj.weight[:, ::2] = 0
    weights, meta = models.save(model, tmp_path / "pruned", SOURCE, extra={"note": 1})
    loaded, desc = models.load(tmp_path / "pruned")
    assert desc["format"] == models.FORMAT and desc["source"] == SOURCE.to_dict()
    assert desc["extra"] == {"note": 1} and "quantization_config" not in desc["config"]
    state, back = model.state_dict(), loaded.state_dict()
    assert state.keys() == back.keys()
    for name in state:
        assert torch.equal(state[name], back[name]), name
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    # Tied weights are stored once.
    assert (
        models.artifact_bytes(tmp_path / "pruned") == weights.stat().st_size + meta.stat().st_size
    )
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        stored = set(handle.keys())
    assert len(stored & {"lm_head.weight", "model.embed_tokens.weight"}) == 1
    params = sum(p.numel() for p in model.parameters())  # parameters() lists a tied one once
    assert weights.stat().st_size < params * 4 + 10_000  # + the JSON header


def test_bad_artifacts_give_one_line_errors_naming_the_file(tmp_path) -> None:
    model = tiny_llama()
    weights, meta = models.save(model, tmp_path / "m", SOURCE)
    with pytest.raises(CheckpointError, match="checksum differs") as err:
        weights.write_bytes(b"garbage" + weights.read_bytes()[7:])
        models.load(tmp_path / "m")
    assert str(weights) in str(err.value) and "\n" not in str(err.value)
    meta.write_text(json.dumps({"format": "something/else"}))
    with pytest.raises(CheckpointError, match=r"m\.json: not an agentprune LM"):
        models.load(tmp_path / "m")
    with pytest.raises(CheckpointError, match="missing"):
        models.load(tmp_path / "absent")
    models.save(model, tmp_path / "n", SOURCE)
    desc = json.loads((tmp_path / "n.json").read_text())
    desc["config"]["num_hidden_layers"] = 3
    del desc["sha256"]
    (tmp_path / "n.json").write_text(json.dumps(desc))
    with pytest.raises(CheckpointError, match=r"n\.safetensors: tensors do not fit") as err:
        models.load(tmp_path / "n.safetensors")
    assert "\n" not in str(err.value)


def test_unknown_source_fails_with_the_loaders_error() -> None:
    missing = ModelSource(name="/nonexistent/model-dir", gguf_file=None, dtype="float32")
    with pytest.raises(ValueError, match="cannot load the causal LM /nonexistent/model-dir"):
        models.load_pretrained(missing)


# --- settings ---------------------------------------------------------------------------------


def test_settings_reject_unknown_missing_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown keys: \\['colour'\\]"):
        TextSettings.from_dict({**text_settings().to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="lack keys: \\['seed'\\]"):
        TextSettings.from_dict({k: v for k, v in text_settings().to_dict().items() if k != "seed"})
    with pytest.raises(ValueError, match="corpus 'c4' is not one of"):
        text_settings(corpus="c4")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        ModelSource(name="x", gguf_file=None, dtype="int8")
    with pytest.raises(ValueError, match="selection 'layer'"):
        SparseGPTSettings(dampening=0.01, block_size=128, selection="layer")
    with pytest.raises(ValueError, match="row_fraction"):
        LayerICBSSettings.from_dict(
            {
                "block_size": 32,
                "blocks_per_row": 1,
                "row_fraction": 0.0,
                "restarts": 1,
                "beta_initial": 1e-3,
                "beta_final": 100.0,
                "beta_factor": 1.3,
                "sweeps": 1,
                "group_penalty": 2.0,
            }
        )
    engine = {"sequential": True, "batch_size": 2, "device": "cpu"}
    assert EngineSettings.from_dict(engine).batch_size == 2


# --- text -------------------------------------------------------------------------------------


def test_pydoc_split_is_deterministic_and_disjoint_by_topic() -> None:
    from pydoc_data.topics import topics

    calibration, evaluation = text.pydoc_split()
    assert (calibration, evaluation) == text.pydoc_split()
    keys = sorted(topics)
    eval_keys = keys[:: text.PYDOC_EVAL_EVERY]
    assert evaluation == "\n\n".join(topics[k] for k in eval_keys)
    assert len(calibration) + len(evaluation) + 2 == len("\n\n".join(topics[k] for k in keys))
    for k in eval_keys:  # no evaluation topic is part of the calibration text
        assert topics[k] not in calibration


def test_windows_are_seeded_and_evaluation_windows_are_consecutive() -> None:
    tok = CharTokenizer()
    first = text.build_windows(tok, text_settings(seed=0))
    again = text.build_windows(tok, text_settings(seed=0))
    other = text.build_windows(tok, text_settings(seed=1))
    assert first.calibration.shape == (4, 32) and first.evaluation.shape == (3, 32)
    assert torch.equal(first.calibration, again.calibration)
    assert not torch.equal(first.calibration, other.calibration)
    assert torch.equal(first.evaluation, other.evaluation)  # the seed only draws calibration
    _, evaluation_text = text.pydoc_split()
    head = torch.tensor(list(evaluation_text.encode("utf-8"))[: 3 * 32])
    assert torch.equal(first.evaluation.reshape(-1), head)
    everything = text.build_windows(tok, text_settings(evaluation_sequences=None))
    assert everything.evaluation.shape[0] == len(evaluation_text.encode("utf-8")) // 32
    with pytest.raises(ValueError, match="only"):
        text.evaluation_windows(torch.arange(100), 32, 4)


def test_windows_round_trip_without_a_tokenizer(tmp_path) -> None:
    windows = text.build_windows(CharTokenizer(), text_settings())
    path = text.save_windows(windows, tmp_path / "windows.safetensors")
    back = text.load_windows(path)
    assert torch.equal(back.calibration, windows.calibration)
    assert torch.equal(back.evaluation, windows.evaluation)
    assert back.meta == windows.meta and back.meta["settings"]["seed"] == 0
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="bad.safetensors: not a readable safetensors"):
        text.load_windows(tmp_path / "bad.safetensors")


def test_wikitext2_reads_a_local_copy_train_for_calibration_test_for_evaluation(tmp_path):
    datasets = pytest.importorskip("datasets")
    copy = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["train one", " = Heading = ", "two"]}),
            "test": datasets.Dataset.from_dict({"text": ["test line", "more"]}),
        }
    )
    copy.save_to_disk(str(tmp_path / "wikitext"))
    train, test = text.wikitext2_split(str(tmp_path / "wikitext"))
    assert train == "train one\n\n = Heading = \n\ntwo" and test == "test line\n\nmore"
    with pytest.raises(ValueError, match="no WikiText-2 copy here"):
        text.wikitext2_split(str(tmp_path))
    with pytest.raises(ValueError, match="not a directory"):
        text.wikitext2_split(str(tmp_path / "absent"))


# --- perplexity -------------------------------------------------------------------------------


class ConstantLogits(nn.Module):
    """A 'model' whose next-token distribution is uniform over ``vocab`` tokens."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size() -> None:
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    result = evaluate.perplexity(ConstantLogits(50), ids, batch_size=2)
    assert result.perplexity == pytest.approx(50.0, rel=1e-6)
    assert result.tokens == 3 * 8 and result.windows == 3


def test_perplexity_equals_a_token_by_token_hand_computation() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(2))
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in ids:
            logits = model(input_ids=window[None]).logits[0]
            for t in range(6):  # token t predicts token t + 1, within the window only
                logp = torch.log_softmax(logits[t].double(), dim=-1)
                nll -= float(logp[window[t + 1]])
                count += 1
    result = evaluate.perplexity(model, ids, batch_size=2)
    assert result.tokens == count
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    with pytest.raises(ValueError, match="evaluation windows"):
        evaluate.perplexity(model, ids[:, :1], batch_size=1)


def test_semi_structured_speed_needs_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the path is exercised by benchmarks/bench_lm.py")
    assert evaluate.semi_structured_speed(tiny_llama(), torch.zeros(1, 4, dtype=torch.long)) is None
    assert evaluate.peak_rss_bytes() > 0


def test_evaluate_reuses_the_prune_steps_perplexity_only_for_the_file_it_measured(tmp_path):
    from agentprune.lm import steps as lm_steps

    weights = tmp_path / "finetuned.safetensors"
    weights.write_bytes(b"the pruned model's tensors")
    measured = {"perplexity": 31.5, "nll": math.log(31.5), "tokens": 2040}
    good = measured | {"artifact_sha256": lm_steps._sha256(weights)}
    ppl = lm_steps._one_shot_measurement(good, tmp_path / "finetuned")
    assert (ppl.perplexity, ppl.tokens) == (31.5, 2040)
    weights.write_bytes(b"another model")
    with pytest.raises(ValueError, match="not the model the prune step measured"):
        lm_steps._one_shot_measurement(good, tmp_path / "finetuned")
