"""A scriptable OpenAI-compatible chat-completions server for fault-injection tests.

Each POST to ``/v1/chat/completions`` takes the next step of ``script`` (or ``default`` when the
script is spent). A step is a ``Step`` or a callable ``(body, headers) -> Step``. Every request's
JSON body and headers (names in lower case) are recorded.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Step:
    """One scripted answer: a completion with ``content``, or an error ``status`` with ``body``."""

    content: str | None = None
    status: int = 200
    body: Any = None
    delay: float = 0.0
    usage: tuple[int, int] = (12, 7)


def completion(content: str, usage: tuple[int, int] = (12, 7)) -> dict:
    """An OpenAI chat-completion response body."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "fault-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": sum(usage),
        },
    }


@dataclass
class FaultServer:
    """The server; ``url`` is the base URL to give the openai SDK (ends with ``/v1``)."""

    script: list[Step | Callable[[dict, dict], Step]] = field(default_factory=list)
    default: Step | Callable[[dict, dict], Step] = field(default_factory=lambda: Step("{}"))
    requests: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw or b"{}")
                headers = {k.lower(): v for k, v in self.headers.items()}
                with server._lock:
                    server.requests.append(body)
                    server.headers.append(headers)
                    step = server.script.pop(0) if server.script else server.default
                if callable(step):
                    step = step(body, headers)
                if step.delay:
                    time.sleep(step.delay)
                if step.status == 200 and step.body is None:
                    payload = completion(step.content or "", step.usage)
                else:
                    payload = step.body if step.body is not None else {"error": {"message": "x"}}
                data = json.dumps(payload).encode()
                try:
                    self.send_response(step.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout tests)
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
