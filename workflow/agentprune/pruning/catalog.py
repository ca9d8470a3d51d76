"""Every pruning method: importing this module registers them all.

The registry (:mod:`agentprune.pruning.registry`) imports no method; the entry points (the
workflow, the CLI, the steps) import this module once and then look methods up by name.
"""

from __future__ import annotations

from agentprune.agents import method as _agents  # noqa: F401  (multi_agent, agents_heuristic)
from agentprune.lm import strategies as _lm  # noqa: F401  (sparsegpt; the lm strategies)
from agentprune.pruning import methods as _recipes  # noqa: F401  (the fixed recipes)
from agentprune.pruning.icbs import method as _icbs  # noqa: F401  (icbs)
from agentprune.pruning.registry import REGISTRY, Method, UnknownMethodError, get, names

__all__ = ["REGISTRY", "Method", "UnknownMethodError", "get", "names"]
