"""What every LLM-backed agent shares: a role prompt, one decision schema, and a heuristic policy
that answers when there is no LLM or the LLM fails."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from agentprune.agents.schemas import Decision

if TYPE_CHECKING:
    from agentprune.agents.llm import LLM


def compact(obj: Any) -> str:
    """Short, stable JSON for prompts (a 135M-parameter model has a small context)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, default=_round)


def _round(value: Any) -> Any:
    return str(value)


def rounded(obj: Any, digits: int = 3) -> Any:
    """``obj`` with every float cut to ``digits`` significant digits, so prompts stay short and
    identical across platforms (0.001 stays 0.001)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [rounded(v, digits) for v in obj]
    return obj


class LLMAgent:
    """An agent that asks the LLM for one kind of decision.

    Subclasses set ``name``, ``decision`` and ``role``, and build the payload and the heuristic
    decision.
    """

    name: ClassVar[str] = ""
    decision: ClassVar[type[Decision]] = Decision
    role: ClassVar[str] = ""

    def messages(self, payload: dict[str, Any], default: Decision) -> list[dict[str, str]]:
        """The chat messages: the role, the reply's keys and the default policy's reply (small
        models need an example of the shape and the scale of the numbers), then the payload."""
        keys = ", ".join(self.decision.model_json_schema()["properties"])
        system = (
            f"{self.role} Reply with one JSON object with the keys: {keys}. "
            f"The default policy would reply: {compact(rounded(default.model_dump()))}. "
            "Improve on it when the data below suggests so."
        )
        return [
            {"role": "system", "content": system},
            {"role": "user", "content": compact(rounded(payload))},
        ]

    def ask(
        self,
        llm: LLM,
        payload: dict[str, Any],
        heuristic: Callable[[], Decision],
        seed: int,
    ) -> tuple[Decision, bool]:
        """The LLM's decision on ``payload`` (validated), or the heuristic one on failure.

        Returns:
            The decision and whether it came from the LLM.
        """
        default = heuristic()
        return llm.decide(
            self.name, self.messages(payload, default), self.decision, lambda: default, seed
        )
