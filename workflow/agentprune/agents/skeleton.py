"""Schema-skeleton decoding: a JSON reply built from its schema, sampling only the choices.

A decision's JSON schema fixes most of a reply: the braces, the keys, the quotes and commas. Under
a sampling grammar (llama-cpp-python's ``response_format``) the model still generates those
tokens one decode step at a time, although the grammar allows only one. Of a master reply's ~98
tokens most are forced that way. Measured with the bundled SmolLM2 on one laptop core: a
decode step under the grammar costs ~27 ms, while forced tokens evaluated in a batch cost ~5 ms
each, so a master reply takes ~0.9 s here instead of ~3 s.

This decoder walks the schema instead. Forced text is queued and evaluated in one batch with the
next choice; at each choice (an enum value, ``null`` or an object, another list item or the end,
the next token of a free string) it evaluates the queue once and picks among the tokens the
schema allows there: the most likely one at temperature 0, else one sampled from the allowed
tokens' softmax with the call's seed. The reply is therefore valid JSON of the schema's shape by
construction (numeric ranges are still checked by validation). It is a greedy choice over each
option's canonical tokenisation and compact JSON; a grammar also admits other tokenisations and
whitespace, so the two decoders can reply differently to the same prompt.

A caller may reject a reply (the master rejects a plan it has already measured). The decoder
then tries the replies one choice away from it, the choice whose runner-up came closest first,
and returns the first one the caller accepts, or the first reply when none is. An alternative
replays the picks before its switched choice without evaluating them and re-evaluates only the
text the model no longer holds.

Supported schemas: objects (every property emitted, in schema order), enums and consts of any
JSON type, booleans, nullable values (``anyOf`` with ``null``), strings (free text of at most
``maxLength`` characters, without quotes, backslashes or control characters) and arrays of those
(``minItems``/``maxItems``). :func:`supported` tells whether a schema is; anything else
(a free number, say) is decoded under the grammar as before.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agentprune.agents.json_schema import resolve_node

FREE_STRING_CHARS = 200
"""Length cap of a free string whose schema sets no ``maxLength``."""
FREE_ARRAY_ITEMS = 8
"""Item cap of an array whose schema sets no ``maxItems``."""


class ReplyCut(Exception):
    """The reply reached the token budget before the schema was complete."""


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A schema node with ``$ref`` followed and a nullable ``anyOf`` unwrapped (an ``anyOf`` of
    several non-null options is not supported)."""
    if "anyOf" in node and len([o for o in node["anyOf"] if o.get("type") != "null"]) != 1:
        return {"unsupported": True}, False
    return resolve_node(node, defs)


def supported(schema: dict[str, Any]) -> bool:
    """Whether :class:`SkeletonDecoder` can decode replies of ``schema`` (an object schema)."""
    defs = schema.get("$defs", {})

    def ok(raw: dict[str, Any]) -> bool:
        node, _ = _resolve(raw, defs)
        if "enum" in node or "const" in node:
            return True
        kind = node.get("type")
        if kind == "object":
            return bool(node.get("properties")) and all(
                ok(sub) for sub in node["properties"].values()
            )
        if kind == "array":
            item, nullable = _resolve(node.get("items", {}), defs)
            return not nullable and item.get("type") != "array" and ok(item)
        return kind in ("string", "boolean")

    return schema.get("type") == "object" and ok(schema)


@dataclass
class _Vocab:
    """What free-string decoding needs to know about every token of a model."""

    texts: list[str]
    lengths: np.ndarray
    string_safe: np.ndarray
    """Tokens whose text may stand inside a JSON string as it is (no quote, backslash or control
    character, valid UTF-8 on its own, not empty)."""


_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocab(llama: Any) -> _Vocab:
    """The token table of ``llama`` (built once per model object)."""
    if llama in _VOCABS:
        return _VOCABS[llama]
    texts: list[str] = []
    safe = np.zeros(llama.n_vocab(), dtype=bool)
    for token in range(llama.n_vocab()):
        try:
            text = llama.detokenize([token]).decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        texts.append(text)
        safe[token] = bool(text) and not any(c in '"\\' or ord(c) < 0x20 for c in text)
    vocab = _Vocab(texts, np.array([len(t) for t in texts]), safe)
    _VOCABS[llama] = vocab
    return vocab


@dataclass
class _Pick:
    """One choice of a reply: the model state it was made in and what it could have been."""

    n_tokens: int
    """Tokens the model held evaluated when the choice was made (its logits are theirs)."""
    allowed: np.ndarray
    logits: np.ndarray
    """The allowed tokens' logits."""
    token: int


@dataclass
class _Switch:
    """Replay a reply's first ``at`` picks, then take ``token`` instead of pick ``at``."""

    picks: list[_Pick]
    at: int
    token: int
    held: list[int]
    """The tokens that reply had the model evaluate (past the decode's starting state)."""


class SkeletonDecoder:
    """Decodes one reply of a schema after a prompt (see the module docstring).

    Args:
        llama: a ``llama_cpp.Llama`` in the state the reply starts from (its prompt prefix
            evaluated, or reset).
        temperature: 0 picks the most likely allowed token; above 0, samples.
        seed: the sampling seed.
        max_tokens: the reply's token budget; reaching it raises :class:`ReplyCut`.
    """

    def __init__(self, llama: Any, temperature: float, seed: int, max_tokens: int) -> None:
        self.llama = llama
        self.temperature = float(temperature)
        self.rng = np.random.default_rng(seed)
        self.max_tokens = int(max_tokens)
        self.pending: list[int] = []
        self.pieces: list[str] = []
        self.reply_tokens = 0
        self._defs: dict[str, Any] = {}
        self.picks: list[_Pick] = []
        self._switch: _Switch | None = None
        self.alternatives_tried = 0
        self._start = 0
        self._held: list[int] = []
        """The tokens the model holds evaluated past ``_start`` (which walk put them there)."""

    def decode(
        self,
        prompt: list[int],
        schema: dict[str, Any],
        accept: Callable[[str], bool] | None = None,
        alternatives: int = 0,
    ) -> str:
        """The reply's text; ``prompt`` are the prompt tokens not yet evaluated.

        With ``accept``, a reply it rejects (a trial already run, say) is replaced by the model's
        most likely reply that differs from it in one choice: each choice's runner-up (the most
        likely other allowed token there), in order of how close it came to the chosen one, the
        reply continued greedily after it; the first of at most ``alternatives`` such replies
        that ``accept`` takes. Only the tokens after the changed choice are evaluated again.
        When none is accepted, the first reply is returned.

        Raises:
            ReplyCut: the budget ran out (``partial`` holds the text so far).
            ValueError: the prompt and reply do not fit in the model's context.
        """
        if self.llama.n_tokens + len(prompt) + self.max_tokens > self.llama.n_ctx():
            raise ValueError(
                f"prompt of {self.llama.n_tokens + len(prompt)} tokens plus max_tokens="
                f"{self.max_tokens} exceeds the context of {self.llama.n_ctx()} tokens"
            )
        self._defs = schema.get("$defs", {})
        self._start, self._held = self.llama.n_tokens, []
        first = self._walk(prompt, schema, None)
        if accept is None or accept(first):
            return first
        picks, held = self.picks, list(self._held)
        for at, token in _runners_up(picks)[: max(0, alternatives)]:
            self.alternatives_tried += 1
            try:
                text = self._walk(prompt, schema, _Switch(picks, at, token, held))
            except ReplyCut:
                continue
            if accept(text):
                return text
        return first

    def _walk(self, prompt: list[int], schema: dict[str, Any], switch: _Switch | None) -> str:
        """One pass over the schema from the prompt (replaying ``switch``'s picks first)."""
        self.pending = list(prompt)
        self.pieces = []
        self.reply_tokens = 0
        self.picks = []
        self._switch = switch
        self._value(schema, "")
        return self.text

    @property
    def text(self) -> str:
        """The reply decoded so far."""
        return "".join(self.pieces)

    # ---------------------------------------------------------------------------------------
    # the schema walk: every value writes its own text and then ``follow`` (the text that comes
    # after it: ``,`` ``}`` ``]`` or nothing), so that no option is a prefix of another.

    def _value(self, raw: dict[str, Any], follow: str) -> None:
        node, nullable = _resolve(raw, self._defs)
        if _is_simple(node):
            values = _simple_values(node)
            if nullable and None not in values:
                values = [*values, None]
            self._choose([json.dumps(v) + follow for v in values])
            return
        kind = node["type"]
        opener = {"object": "{", "array": "[", "string": '"'}[kind]
        if nullable:
            if self._choose([f"null{follow}", opener]) != opener:
                return
        else:
            self._force(opener)
        if kind == "object":
            self._object(node)
            self._force(follow)
        elif kind == "array":
            self._array(node)
            self._force(follow)
        else:
            self._string(int(node.get("maxLength", FREE_STRING_CHARS)), [follow])

    def _object(self, node: dict[str, Any]) -> None:
        """An object's properties and its closing brace (the opening one is written)."""
        names = list(node["properties"])
        for i, name in enumerate(names):
            self._force(json.dumps(name) + ":")
            self._value(node["properties"][name], "," if i < len(names) - 1 else "}")

    def _array(self, node: dict[str, Any]) -> None:
        """An array's items and its closing bracket (the opening one is written)."""
        item, _ = _resolve(node.get("items", {}), self._defs)
        low = int(node.get("minItems", 0))
        high = int(node.get("maxItems", FREE_ARRAY_ITEMS))
        count = 0
        while True:
            may_close = count == 0 and low == 0
            if count == 0 and high == 0:
                self._force("]")
                return
            seps = ([","] if count + 1 < high else []) + (["]"] if count + 1 >= low else [])
            if _is_simple(item):
                options = [json.dumps(v) + sep for v in _simple_values(item) for sep in seps]
                chosen = self._choose((["]"] if may_close else []) + options)
                count += 1
                if chosen.endswith("]"):
                    return
                continue
            opener = "{" if item["type"] == "object" else '"'
            if may_close:
                if self._choose(["]", opener]) == "]":
                    return
            else:
                self._force(opener)
            if item["type"] == "object":
                self._object(item)
                sep = self._choose(seps)
            else:
                sep = self._string(int(item.get("maxLength", FREE_STRING_CHARS)), seps)
            count += 1
            if sep == "]":
                return

    def _string(self, limit: int, ends: list[str]) -> str:
        """Free text of at most ``limit`` characters (the opening quote is written), then the
        closing quote and one of ``ends``, which it returns."""
        vocab = _vocab(self.llama)
        closers = [f'"{end}' for end in ends]
        closer_starts = sorted({self._tokens(c)[0] for c in closers})
        used = 0
        while True:
            allowed = vocab.string_safe & (vocab.lengths <= limit - used)
            allowed[closer_starts] = True
            token = self._pick(np.flatnonzero(allowed))
            if token in closer_starts:
                return self._choose(closers, first=token)[1:]
            self._push([token], vocab.texts[token])
            used += int(vocab.lengths[token])

    # ---------------------------------------------------------------------------------------
    # tokens

    def _tokens(self, text: str) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def _push(self, tokens: list[int], text: str, decided: int = 0) -> None:
        """Queue ``tokens`` as part of the reply; with the ``decided`` tokens before them
        (already queued by :meth:`_choose`) they spell ``text``. Past the budget, the reply is
        cut after its ``max_tokens``-th token."""
        room = self.max_tokens - self.reply_tokens
        if decided + len(tokens) > room:
            whole = self._tokens(text)
            kept = self.llama.detokenize(whole[:room]).decode("utf-8", errors="ignore")
            self.pieces.append(kept)
            self.reply_tokens = self.max_tokens
            raise ReplyCut(self.text)
        self.reply_tokens += decided + len(tokens)
        self.pieces.append(text)
        self.pending += tokens

    def _force(self, text: str) -> None:
        if text:
            self._push(self._tokens(text), text)

    def _choose(self, options: list[str], first: int | None = None) -> str:
        """The option the model picks, token by token over the options' tokenisations (no
        evaluation while they agree), queued as part of the reply. ``first``: the first token,
        already picked."""
        sequences = {option: self._tokens(option) for option in dict.fromkeys(options)}
        alive = list(sequences)
        step = 0
        while len(alive) > 1:
            nexts = sorted({sequences[o][step] for o in alive})
            if step == 0 and first is not None:
                token = first
            elif len(nexts) == 1:
                token = nexts[0]
            else:
                token = self._pick(np.array(nexts))
            alive = [o for o in alive if sequences[o][step] == token]
            self.pending.append(token)
            step += 1
        chosen = alive[0]
        self._push(sequences[chosen][step:], chosen, decided=step)
        return chosen

    def _pick(self, allowed: np.ndarray) -> int:
        """Evaluates the queue and picks one of the ``allowed`` token ids."""
        switch, index = self._switch, len(self.picks)
        if switch is not None and index <= switch.at:
            # Replaying: the model already holds this state; only the changed choice is new.
            pick = switch.picks[index]
            self.pending = []
            if index < switch.at:
                self.picks.append(pick)
                return pick.token
            self._rewind(switch.held[: pick.n_tokens - self._start])
            self.picks.append(_Pick(pick.n_tokens, pick.allowed, pick.logits, switch.token))
            return switch.token
        if self.pending:
            self._eval(self.pending)
            self.pending = []
        logits = np.ctypeslib.as_array(
            self.llama._ctx.get_logits_ith(-1), shape=(self.llama.n_vocab(),)
        )[allowed].copy()
        if self.temperature <= 0:
            token = int(allowed[int(np.argmax(logits))])
        else:
            z = logits.astype(np.float64) / self.temperature
            p = np.exp(z - z.max())
            token = int(self.rng.choice(allowed, p=p / p.sum()))
        self.picks.append(_Pick(self.llama.n_tokens, allowed, logits, token))
        return token

    def _eval(self, tokens: list[int]) -> None:
        """Evaluates ``tokens`` after what the model holds up to its ``n_tokens``."""
        self._held = self._held[: self.llama.n_tokens - self._start] + list(tokens)
        self.llama.eval(tokens)

    def _rewind(self, needed: list[int]) -> None:
        """Leaves the model holding exactly ``needed`` past the decode's start: what it holds
        in common with them is kept, the rest evaluated (another alternative may have
        replaced part of the first reply's tokens)."""
        common = 0
        for a, b in zip(self._held, needed):
            if a != b:
                break
            common += 1
        self.llama.n_tokens = self._start + common  # the next eval drops what lies past it
        if common < len(needed):
            self._eval(needed[common:])


def _runners_up(picks: list[_Pick]) -> list[tuple[int, int]]:
    """``(pick index, token)``: every pick's most likely other allowed token, the closest to
    the chosen one's logit first (ties: the earlier pick)."""
    options = []
    for index, pick in enumerate(picks):
        others = pick.allowed != pick.token
        if not others.any():
            continue
        best = int(np.argmax(np.where(others, pick.logits, -np.inf)))
        chosen = float(pick.logits[pick.allowed == pick.token][0])
        options.append((chosen - float(pick.logits[best]), index, int(pick.allowed[best])))
    return [(index, token) for _, index, token in sorted(options)]


def _is_simple(node: dict[str, Any]) -> bool:
    """An enum, a const or a boolean: a value chosen from a list."""
    return "enum" in node or "const" in node or node.get("type") == "boolean"


def _simple_values(node: dict[str, Any]) -> list[Any]:
    if "enum" in node:
        return list(node["enum"])
    if "const" in node:
        return [node["const"]]
    return [True, False]
