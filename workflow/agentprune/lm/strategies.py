"""The methods of the ``lm`` family: one small strategy per registered method name.

A registered method (:mod:`agentprune.pruning.registry`) that lists ``lm`` in its ``families``
has a strategy here, keyed by the same name: its settings come from the ``lm`` config section
(``lm.sparsegpt``, ``lm.icbs``) with ``method_settings.<method>`` merged over them, and its
``prune`` calls the method's entry point of :mod:`agentprune.lm.pruning` on a whole causal LM.
The rest of the pipeline looks strategies up by name and never branches on one.

``sparsegpt`` is registered here too (it prunes only LMs; a vision study naming it is refused at
config time). This module imports no torch: the entry points import it to check a config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from agentprune.lm.settings import (
    EngineSettings,
    LayerICBSSettings,
    SparseGPTSettings,
    Sparsity,
)
from agentprune.pruning.registry import Method, register
from agentprune.settings import fail, unknown_keys

Log = Callable[[str], None] | None


class LMStrategy:
    """How one method prunes a causal LM.

    Attributes:
        name: the registered method's name.
        section: the key of the ``lm`` section holding its settings (None: it has none).
        settings_type: the settings class (``from_dict``/``to_dict``), None without settings.
        source: the published method, for ``plan.json``'s provenance.
    """

    name: ClassVar[str] = ""
    section: ClassVar[str | None] = None
    settings_type: ClassVar[Any] = None
    source: ClassVar[str] = ""

    def resolve(self, lm: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The strategy's settings in plain form: ``lm.<section>`` with ``overrides`` (the
        ``method_settings`` entry) merged over it, every key and value checked.

        Raises:
            ConfigError: one line naming the unknown key or the bad value.
        """
        where = f"method_settings.{self.name}"
        if not isinstance(overrides, Mapping):
            raise fail(where, "expected a mapping of settings")
        if self.settings_type is None:
            if overrides:
                raise fail(where, f"{self.name} on an lm model has no settings to override")
            return {}
        known = list(self.settings_type.__dataclass_fields__)
        if set(overrides) - set(known):
            raise fail(where, unknown_keys(overrides, known))
        values = {**lm[self.section], **overrides}
        try:
            return self.settings_type.from_dict(values).to_dict()
        except (TypeError, ValueError) as err:
            raise fail(where if overrides else f"lm.{self.section}", str(err)) from None

    def prune(
        self,
        model: Any,
        windows: Any,
        sparsity: Sparsity,
        settings: Mapping[str, Any],
        engine: EngineSettings,
        seed: int,
        log: Log = None,
    ) -> dict[str, Any]:
        """Prune ``model`` in place; return the report of :mod:`agentprune.lm.pruning`."""
        raise NotImplementedError


class LMMagnitude(LMStrategy):
    """|W| per output row (or N:M group); no calibration."""

    name = "magnitude"
    source = "magnitude per output row, as in Wanda's baselines (Sun et al., arXiv 2306.11695)"

    def prune(self, model, windows, sparsity, settings, engine, seed, log=None):
        from agentprune.lm import pruning

        return pruning.prune_magnitude(model, sparsity)


class LMWanda(LMStrategy):
    """|W|·‖X‖ per output row (or N:M group), block by block."""

    name = "wanda"
    source = "Wanda (Sun et al., arXiv 2306.11695)"

    def prune(self, model, windows, sparsity, settings, engine, seed, log=None):
        from agentprune.lm import pruning

        return pruning.prune_wanda(model, windows, sparsity, engine, log)


class LMSparseGPT(LMStrategy):
    """OBS row updates with the calibration Hessian, block by block."""

    name = "sparsegpt"
    section = "sparsegpt"
    settings_type = SparseGPTSettings
    source = "SparseGPT (Frantar & Alistarh, arXiv 2301.00774), implemented from Algorithm 1"

    def prune(self, model, windows, sparsity, settings, engine, seed, log=None):
        from agentprune.lm import pruning

        cfg = SparseGPTSettings.from_dict(dict(settings))
        return pruning.prune_sparsegpt(model, windows, sparsity, cfg, engine, log)


class LMICBS(LMStrategy):
    """iCBS block QUBOs on the layer-wise objective, from the Wanda mask, block by block."""

    name = "icbs"
    section = "icbs"
    settings_type = LayerICBSSettings
    source = "iCBS (arXiv 2411.17796) on the layer-wise objective, implemented from the algorithm"

    def prune(self, model, windows, sparsity, settings, engine, seed, log=None):
        from agentprune.lm import pruning

        cfg = LayerICBSSettings.from_dict(dict(settings))
        return pruning.prune_icbs(model, windows, sparsity, cfg, engine, seed, log)


STRATEGIES: dict[str, LMStrategy] = {
    s.name: s for s in (LMMagnitude(), LMWanda(), LMSparseGPT(), LMICBS())
}
"""Method name -> its lm strategy (every registered method whose ``families`` include lm)."""


def get(name: str) -> LMStrategy:
    """The lm strategy of method ``name``."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(
            f"method {name!r} has no lm strategy (lm methods: {sorted(STRATEGIES)})"
        ) from None


@register
class SparseGPT(Method):
    """SparseGPT: a method of the lm family only (see :class:`LMSparseGPT`)."""

    name = "sparsegpt"
    family = "unstructured"
    families = ("lm",)

    def resolve_settings(self, sections, overrides):
        raise NotImplementedError("sparsegpt prunes lm models only (see agentprune.lm.strategies)")
