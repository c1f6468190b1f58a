"""Helpers for the judge tests: a scripted OpenAI-compatible server on 127.0.0.1 and tiny Llama configs.

Kept out of conftest.py under a unique module name so test files can import them. The server speaks just enough of ``POST /v1/chat/completions`` for the real ``openai`` client. Each test sets
``server.script(body, n) -> Reply`` (n = 0-based request index) to choose the reply, status, headers and
delay; the server records every request (body, headers, arrival time) and the peak number in flight.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SECRET = "sk-test-Zq8vN3-never-log-me"


@dataclass
class Reply:
    """One scripted reply: chat content for status 200, else an error body; optional headers and delay."""

    content: str = ""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Seen:
    body: dict[str, Any]
    headers: dict[str, str]
    arrived: float


def user_text(body: dict[str, Any]) -> str:
    """The first user message of a chat request (the filled judging prompt)."""
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


def fields(body: dict[str, Any]) -> dict[str, str]:
    """Parse the test template ``P=...\\nA=...\\nB=...`` (or ``P=...\\nR=...``) back into its fields."""
    return dict(line.split("=", 1) for line in user_text(body).splitlines() if "=" in line)


class FakeChatServer:
    """ThreadingHTTPServer serving scripted chat completions; see the module docstring."""

    def __init__(self) -> None:
        self.script: Callable[[dict[str, Any], int], Reply] = lambda body, n: Reply('{"winner": "tie"}')
        self.requests: list[Seen] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner._lock:
                    n = len(owner.requests)
                    owner.requests.append(
                        Seen(body, {k.lower(): v for k, v in self.headers.items()}, time.monotonic())
                    )
                    owner.in_flight += 1
                    owner.peak_in_flight = max(owner.peak_in_flight, owner.in_flight)
                try:
                    reply = owner.script(body, n)
                    time.sleep(reply.delay)
                    self._send(reply, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    with owner._lock:
                        owner.in_flight -= 1

            def _send(self, reply: Reply, body: dict[str, Any]) -> None:
                if reply.status == 200:
                    payload = {
                        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": reply.content}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }  # fmt: skip
                else:
                    payload = {"error": {"message": reply.content or "scripted error", "type": "test"}}
                data = json.dumps(payload).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def llama_config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **extra,
    )  # fmt: skip
