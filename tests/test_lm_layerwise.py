"""The layer-wise engine and the whole-model methods on a tiny random-init Llama."""

from __future__ import annotations

import copy

import pytest
import torch
from agentprune.lm import layerwise, masks, methods, pruning
from agentprune.lm.calibration import StatsCollector
from agentprune.lm.settings import EngineSettings, LayerICBSSettings, SparseGPTSettings, Sparsity
from torch import nn

transformers = pytest.importorskip("transformers")

ENGINE = EngineSettings(sequential=True, batch_size=2, device="cpu")
TWO_PASS = EngineSettings(sequential=False, batch_size=2, device="cpu")
SPARSEGPT = SparseGPTSettings(dampening=0.01, block_size=32, selection="row")
ICBS = LayerICBSSettings(
    block_size=16,
    blocks_per_row=1,
    row_fraction=0.5,
    restarts=1,
    beta_initial=1e-3,
    beta_final=100.0,
    beta_factor=1.3,
    sweeps=1,
    group_penalty=2.0,
)
TARGETS = [Sparsity.unstructured(0.5), Sparsity.unstructured(0.6), Sparsity.n_m(2, 4)]


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


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, 96, (5, 12), generator=torch.Generator().manual_seed(1))


def run(method: str, model: nn.Module, windows: torch.Tensor, sparsity: Sparsity) -> dict:
    if method == "magnitude":
        return pruning.prune_magnitude(model, sparsity)
    if method == "wanda":
        return pruning.prune_wanda(model, windows, sparsity, ENGINE)
    if method == "sparsegpt":
        return pruning.prune_sparsegpt(model, windows, sparsity, SPARSEGPT, ENGINE)
    return pruning.prune_icbs(model, windows, sparsity, ICBS, ENGINE, seed=0)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "icbs"])
@pytest.mark.parametrize("sparsity", TARGETS, ids=lambda s: s.label())
def test_every_decoder_linear_has_the_exact_pattern(method, sparsity, windows) -> None:
    model = tiny_llama()
    dense = copy.deepcopy(model)
    report = run(method, model, windows, sparsity)
    linears = pruning.prunable_linears(model)
    assert len(linears) == 2 * 7
    for name, linear in linears.items():
        assert masks.satisfies(linear.weight != 0, sparsity), name
    numel = sum(linear.weight.numel() for linear in linears.values())
    if sparsity.is_n_m:
        expected = numel // 2
    else:  # every row loses round(f * in_features)
        expected = sum(
            linear.out_features * round(sparsity.fraction * linear.in_features)
            for linear in linears.values()
        )
    assert report["pruned"] == expected
    assert report["achieved"] == pytest.approx(expected / numel)
    assert report["method"] == method and report["seconds"] > 0
    assert report["target"] == sparsity.label()
    # Embeddings, norms and the (tied) lm_head stay dense and unchanged.
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(model.get_parameter(name), dense.get_parameter(name)), name
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_icbs_report_totals_do_not_rise(windows) -> None:
    report = run("icbs", tiny_llama(), windows, Sparsity.unstructured(0.5))
    totals = report["icbs"]
    assert totals["loss"] <= totals["loss_init"]
    assert totals["blocks"] > 0


def final_input_stats(model: nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every decoder Linear's input sq-norms in a plain forward of ``model``."""
    linears = pruning.prunable_linears(model)
    with StatsCollector(linears, "norms") as collector, torch.no_grad():
        collector.batch()
        model(input_ids=windows, use_cache=False)
    return {name: st.sq_norms for name, st in collector.stats().items()}


@pytest.mark.parametrize("engine", [ENGINE, TWO_PASS], ids=["one-pass", "two-pass"])
def test_blocks_are_calibrated_on_the_pruned_blocks_outputs(engine, windows) -> None:
    """The inputs the engine calibrates a block on are those the *final pruned* model produces:
    each block's inputs were recomputed from the pruned blocks before it. In one pass, this holds
    for every Linear (o_proj and down_proj see the pruned Linears of their own block too); in two
    passes, only for the block's first Linears, the rest see the dense block."""
    model = tiny_llama()
    seen: dict[str, torch.Tensor] = {}

    def prune(name: str, linear: nn.Linear, stats) -> dict:
        seen[name] = stats.sq_norms.clone()
        methods.magnitude_prune(linear, Sparsity.unstructured(0.5))
        return {}

    layerwise.prune_layerwise(model, windows, prune, "norms", engine)
    final = final_input_stats(model, windows)
    dense = final_input_stats(tiny_llama(), windows)
    for name in final:
        first_of_block = name.endswith(("q_proj", "k_proj", "v_proj"))
        if engine.sequential or first_of_block:
            torch.testing.assert_close(seen[name], final[name], rtol=1e-5, atol=1e-6)
        elif name.startswith("model.layers.0."):  # block 0 is calibrated on the dense model
            torch.testing.assert_close(seen[name], dense[name], rtol=1e-5, atol=1e-6)
        in_block_0 = name.startswith("model.layers.0.")
        if not in_block_0 or (engine.sequential and not first_of_block):
            assert not torch.allclose(seen[name], dense[name]), name  # pruning changed them


def test_engine_results_do_not_depend_on_the_batch_size(windows) -> None:
    one, two = tiny_llama(), tiny_llama()
    sparsity = Sparsity.unstructured(0.5)
    for model, batch_size in ((one, 1), (two, 5)):
        engine = EngineSettings(sequential=False, batch_size=batch_size, device="cpu")
        pruning.prune_sparsegpt(model, windows, sparsity, SPARSEGPT, engine)
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_engine_rejects_a_model_without_decoder_blocks() -> None:
    with pytest.raises(ValueError, match="no decoder blocks at model.model.layers"):
        layerwise.decoder_layers(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="calibration windows"):
        layerwise.capture_inputs(tiny_llama(), torch.zeros(3, dtype=torch.long), ENGINE)
