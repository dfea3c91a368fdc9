"""A real HTTP server on 127.0.0.1 that speaks enough of the chat-completions protocol for tests.

Each request is answered by a `behaviour(index, body)` function returning a Reply,
so a test scripts failures (429, 500, malformed bodies, slow replies) per request.
It records every request's JSON body and headers, and the peak number of
requests in flight, so tests can check retries, the key's use and concurrency.
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
class Reply:
    status: int = 200
    body: Any = None  # dict/list -> JSON; bytes -> sent as is; None -> a completion echoing the prompt
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


def completion(content: Any, model: str = "test-model") -> dict[str, Any]:
    """A well-formed chat.completion object whose first choice says `content`."""
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def user_prompt(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"])


def echo(index: int, body: dict[str, Any]) -> Reply:
    """Default behaviour: a valid answer naming the prompt and the request number."""
    return Reply(body=completion(f"It looks like this, in answer to '{user_prompt(body)}' (reply {index})."))


class ChatServer:
    """Context manager: `with ChatServer(behaviour) as srv: ... srv.url ...`."""

    def __init__(self, behaviour: Callable[[int, dict[str, Any]], Reply] = echo) -> None:
        self.behaviour = behaviour
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.inflight = 0
        self.max_inflight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    index = len(server.requests)
                    server.requests.append(body)
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    reply = server.behaviour(index, body)
                    if reply.delay_s:
                        time.sleep(reply.delay_s)
                    payload = reply.body if reply.body is not None else echo(index, body).body
                    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                finally:
                    # Leave the in-flight count before answering: once the client has the reply it may send
                    # its next request, which must not be counted as overlapping this one.
                    with server._lock:
                        server.inflight -= 1
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test); nothing to report

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()


def fast_retry(status: int) -> Reply:
    """An error reply that asks the client to retry after 1 ms, so retry tests run fast."""
    return Reply(status=status, body={"error": {"message": f"simulated {status}", "type": "test"}},
                 headers={"retry-after-ms": "1"})
