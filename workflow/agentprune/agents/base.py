"""What every LLM-backed agent shares: a role prompt, one decision schema, a default policy that
answers when there is no LLM or the LLM fails, and the record of where each decision came from.

The prompt describes every field of the decision (its meaning and its range or enum) and gives
the measured state; it does not contain the default policy's answer unless the run asks for an
anchored prompt (``agents.anchor_default``), so an unanchored LLM decision is the model's own.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from agentprune.agents.json_schema import describe_schema
from agentprune.agents.schemas import Decision

if TYPE_CHECKING:
    from agentprune.agents.llm import LLM, Avoid

PROMPTS = ("unanchored", "anchored")
"""The two prompt kinds a plan records (``agents.anchor_default`` picks ``anchored``)."""

SOURCES = ("llm", "llm_equal_default", "default")
"""Where a decision came from: the LLM with a decision of its own, the LLM with the same decision
the default policy takes in that state, or the default policy (see :data:`DEFAULT_REASONS`)."""

DEFAULT_REASONS = ("transport", "invalid", "repeat", "no_llm")
"""Why the default policy answered: the LLM could not be reached, its replies kept failing
validation, it repeated a trial already run (after one re-ask), or there is no LLM."""


def compact(obj: Any) -> str:
    """Short, stable JSON for prompts (a 135M-parameter model has a small context)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, default=str)


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


@dataclass
class Answer:
    """One decision and where it came from.

    Attributes:
        decision: the decision the loop acts on.
        default: what the default policy decides in the same state.
        source: one of :data:`SOURCES`.
        reason: for ``source == "default"``, one of :data:`DEFAULT_REASONS`; else None.
    """

    decision: Decision
    default: Decision
    source: str
    reason: str | None = None

    @property
    def from_llm(self) -> bool:
        """Whether the LLM answered (with its own decision or the default's)."""
        return self.source != "default"

    def record(self, agent: str, **extra: Any) -> dict[str, Any]:
        """The JSON record of this decision for the plan's provenance."""
        return {
            "agent": agent,
            "source": self.source,
            "reason": self.reason,
            "decision": self.decision.acting_fields(),
            "default": self.default.acting_fields(),
            **extra,
        }


def classify(llm_decision: Decision | None, default: Decision, failure: str | None) -> Answer:
    """The :class:`Answer` for a validated LLM decision (or None when the default answered)."""
    if llm_decision is None:
        return Answer(default, default, "default", failure or "no_llm")
    same = llm_decision.acting_fields() == default.acting_fields()
    return Answer(llm_decision, default, "llm_equal_default" if same else "llm")


class LLMAgent:
    """An agent that asks the LLM for one kind of decision.

    Subclasses set ``name``, ``decision`` and ``role``, and build the payload and the default
    decision.
    """

    name: ClassVar[str] = ""
    decision: ClassVar[type[Decision]] = Decision
    role: ClassVar[str] = ""

    def system_prompt(
        self,
        default: Decision | None,
        limits: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
    ) -> str:
        """The role, every field of the reply with its meaning and range (``limits`` fill the
        ``{name}`` placeholders of the descriptions), the run's fixed ``context`` and, for
        anchored prompts only, the default policy's reply."""
        fields = "\n".join(describe_schema(self.decision.model_json_schema()))
        lines = [self.role, "Reply with one JSON object:", fields.format_map(limits or {})]
        if context is not None:
            lines.append(f"The run: {compact(rounded(context))}")
        if default is not None:
            lines.append(
                f"The default policy would reply: {compact(rounded(default.model_dump()))}. "
                "Improve on it when the data suggests so."
            )
        return "\n".join(lines)

    def messages(
        self,
        payload: dict[str, Any] | list[dict[str, Any]],
        default: Decision | None,
        limits: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
    ) -> list[dict[str, str]]:
        """The chat messages: the system prompt (see :meth:`system_prompt`), then the payload,
        one user message per turn when it is a list.

        What stays fixed over a plan's calls goes in ``context`` (the system prompt), what
        changes in the turns. A later call's turns extend an earlier call's, so the backend
        evaluates each turn once and a call costs only its new turn's tokens.
        """
        turns = payload if isinstance(payload, list) else [payload]
        return [
            {"role": "system", "content": self.system_prompt(default, limits, context)},
            *({"role": "user", "content": compact(rounded(turn))} for turn in turns),
        ]

    def ask(
        self,
        llm: LLM,
        payload: dict[str, Any] | list[dict[str, Any]],
        heuristic: Callable[[], Decision],
        seed: int,
        anchored: bool = False,
        feedback: list[dict[str, str]] | None = None,
        limits: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        avoid: Avoid | None = None,
    ) -> Answer:
        """The LLM's decision on ``payload`` (validated), or the default one on failure.

        Args:
            llm: the LLM.
            payload: the measured state (sent as JSON), or its turns (one message each).
            heuristic: builds the default policy's decision in this state.
            seed: the sampling seed.
            anchored: show the default decision in the prompt.
            feedback: extra messages after the payload (a re-ask with feedback).
            limits: the run's limits quoted in the field descriptions.
            context: the run's fixed state (in the system prompt).
            avoid: decisions the backend should steer away from (see :class:`LLM.decide`).
        """
        default = heuristic()
        messages = self.messages(payload, default if anchored else None, limits, context)
        messages += list(feedback or [])
        decision, from_llm = llm.decide(
            self.name, messages, self.decision, lambda: default, seed, avoid
        )
        return classify(decision if from_llm else None, default, llm.last_failure)
