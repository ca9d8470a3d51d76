"""The layer-wise engine: prune a causal LM's decoder blocks one at a time on calibration windows.

1. Capture the inputs of the first decoder block for every calibration batch, together with the
   keyword arguments the model's own forward passes to it (rotary ``position_embeddings``,
   ``position_ids``, the causal mask or None, ...). A pre-hook records them and stops the forward,
   so this works for any transformers version and any ``model.model.layers`` architecture
   (Llama, Mistral, Qwen2, ...) without re-deriving how a decoder layer is called.
2. For each block, in one of two modes (:class:`~agentprune.lm.settings.EngineSettings`):

   * two passes (``sequential=False``): run the captured inputs through the block in batches with
     forward hooks on its Linears to collect what the method needs
     (:mod:`agentprune.lm.calibration`), prune each Linear, then recompute the block's outputs
     *from the pruned block*; every Linear is calibrated on the dense block's activations;
   * one pass (``sequential=True``): all windows in one batch; a forward pre-hook on each Linear
     computes its statistics from the input it is about to receive, prunes it, and lets the
     forward continue with the pruned weights, so the pass yields the pruned block's outputs
     and later Linears (o_proj, down_proj) are calibrated on the pruned ones before them.

   Either way the outputs are the next block's inputs.

Only one block's activations (the inputs, overwritten batch by batch with the outputs) are held
at a time, never the whole model's; on a GPU device only the current block is moved there.
Embeddings, the final norm and ``lm_head`` are never pruned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from agentprune.lm.calibration import NEEDS, LinearStats, Need, StatsCollector, stats_of
from agentprune.lm.settings import EngineSettings

LinearPruner = Callable[[str, nn.Linear, LinearStats | None], dict[str, Any]]
"""``prune(name, linear, stats)`` prunes ``linear`` in place and returns a JSON-able report;
``stats`` is None when the method needs no calibration."""


class _Captured(Exception):
    """Raised by the capture hook to stop the forward at the first decoder block."""


@dataclass
class BlockInputs:
    """The current block's inputs, one entry per calibration batch.

    Attributes:
        hidden: ``(batch, seq, hidden)`` hidden states per batch.
        kwargs: the keyword arguments the model passed to its decoder layers for that batch.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a ``LlamaForCausalLM``-like model (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{type(model).__name__} has no decoder blocks at model.model.layers; "
            "the lm engine needs a LlamaForCausalLM-like causal LM"
        )
    return layers


def block_linears(block: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``block``, named ``<prefix>.<path>``, in module order."""
    return {
        f"{prefix}.{name}": module
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    }


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    return value


def _stem(model: nn.Module) -> list[nn.Module]:
    """The modules the forward runs before the first block (embeddings, rotary), which the
    capture needs on the device."""
    inner = model.model
    return [m for m in inner.children() if not isinstance(m, nn.ModuleList)]


@torch.no_grad()
def capture_inputs(
    model: nn.Module, windows: torch.Tensor, settings: EngineSettings
) -> BlockInputs:
    """The first decoder block's inputs for ``windows`` (``(n, seq)`` token ids), batched."""
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"calibration windows must be (n >= 1, seq), got {tuple(windows.shape)}")
    device = torch.device(settings.device)
    batch_size = windows.shape[0] if settings.sequential else settings.batch_size
    first = decoder_layers(model)[0]
    captured = BlockInputs()

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    stem = _stem(model)
    for module in [*stem, first]:
        module.to(device)
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Captured:
                continue
            raise RuntimeError("the first decoder block was never called by the model's forward")
    finally:
        handle.remove()
        for module in [*stem, first]:
            module.to("cpu")
    return captured


def _layer_output(out: Any) -> torch.Tensor:
    """A decoder layer returns a tensor (transformers 5) or a tuple led by one (4.x)."""
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, collector: StatsCollector | None) -> None:
    """Forward every batch through ``block`` (for the hooks only)."""
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
        if collector is not None:
            collector.batch()
        block(hidden, **kwargs)


@torch.no_grad()
def advance(block: nn.Module, inputs: BlockInputs) -> None:
    """Replace every batch's inputs by ``block``'s outputs, in place (one block's activations)."""
    for i, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
        inputs.hidden[i] = _layer_output(block(hidden, **kwargs)).detach()


def _block_stats(
    block: nn.Module, linears: dict[str, nn.Linear], inputs: BlockInputs, need: Need
) -> dict[str, LinearStats | None]:
    if need == "none":
        return dict.fromkeys(linears)
    with StatsCollector(linears, need) as collector:
        run_block(block, inputs, collector)
    return dict(collector.stats())


def _prune_in_one_pass(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    inputs: BlockInputs,
    prune: LinearPruner,
    need: Need,
) -> dict[str, Any]:
    """Prune each Linear from a pre-hook as its input arrives; ``inputs`` become the outputs."""
    if len(inputs.hidden) != 1:
        raise ValueError("the one-pass mode needs all calibration windows in one batch")
    reports: dict[str, Any] = {}
    seen: list[tuple[torch.Tensor, LinearStats | None]] = []

    def hook(name: str):
        def pre(module: nn.Module, args: tuple) -> None:
            x = args[0]
            stats = next((st for t, st in seen if t is x), None)  # q/k/v, gate/up share x
            if stats is None and need != "none":
                stats = stats_of(x, need)
                seen.append((x, stats))
            with torch.no_grad():
                reports[name] = prune(name, module, stats)

        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        advance(block, inputs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in linears if name not in reports]
    if missing:
        raise RuntimeError(f"the block's forward never called {missing[0]}")
    return reports


def _prune_in_two_passes(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    inputs: BlockInputs,
    prune: LinearPruner,
    need: Need,
) -> dict[str, Any]:
    """Collect every Linear's statistics on the dense block, prune, recompute the outputs."""
    stats = _block_stats(block, linears, inputs, need)
    reports = {name: prune(name, linear, stats[name]) for name, linear in linears.items()}
    del stats
    advance(block, inputs)
    return reports


def prune_layerwise(
    model: nn.Module,
    windows: torch.Tensor,
    prune: LinearPruner,
    need: Need,
    settings: EngineSettings,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Prune every Linear of every decoder block of ``model`` in place, block by block.

    Args:
        model: a ``LlamaForCausalLM``-like model on the CPU (it is put in eval mode).
        windows: ``(n, seq)`` calibration token ids.
        prune: called once per Linear with its calibration statistics.
        need: ``norms`` (Wanda), ``hessian`` (SparseGPT, iCBS) or ``none``.
        settings: one or two passes per block, batch size, device.
        log: optional line logger (one line per block).

    Returns:
        ``{"layers": {linear name: report}, "capture_seconds": s, "blocks_seconds": s}``.
    """
    if need not in NEEDS:
        raise ValueError(f"need must be one of {NEEDS}, got {need!r}")
    model.eval()
    device = torch.device(settings.device)
    start = time.perf_counter()
    inputs = capture_inputs(model, windows, settings)
    captured = time.perf_counter()
    reports: dict[str, Any] = {}
    for i, block in enumerate(decoder_layers(model)):
        block.to(device)
        linears = block_linears(block, f"model.layers.{i}")
        one_block = _prune_in_one_pass if settings.sequential else _prune_in_two_passes
        reports.update(one_block(block, linears, inputs, prune, need))
        block.to("cpu")
        if log:
            log(f"block {i}: {len(linears)} linears pruned ({time.perf_counter() - start:.1f} s)")
    return {
        "layers": reports,
        "capture_seconds": captured - start,
        "blocks_seconds": time.perf_counter() - captured,
    }
