"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions format and injects faults on demand.

    with FakeOpenAI(reply=lambda messages: "Question: ...\nAnswer: ...") as server:
        server.push("429:1", "500")            # the next two requests fail like this, then replies are normal
        server.on("kitchen", "drop", times=2)  # requests whose last message contains "kitchen" drop twice
        client = ChatClient(server.url, "sk-test", "gpt-test")
        ...
        server.requests  # [{"path", "headers", "body", "behaviour"}] in arrival order

Behaviours (a string, "name:param" where a parameter applies):
    ok            200 with reply(messages) as content, finish_reason "stop"
    empty         200 with content ""
    length        200 with the first half of the reply and finish_reason "length" (max_tokens cut it off)
    malformed     200 with a body that is not valid JSON
    slow[:s]      sleeps s seconds (default server.slow_seconds) before a normal reply: past a short client timeout
    trickle[:s]   a normal reply's status and headers at once, then its body one byte every s seconds (default 2):
                  each read is quick, only a deadline on the whole reply stops it
    field:K=JSON  200 with a normal reply whose field K (content, finish_reason, usage, model) is set to JSON, e.g.
                  field:content=["a"] or field:usage="12": a reply of the wrong shape
    drop          reads the request, then closes the connection without a response
    429[:s]       rate limited, with header Retry-After: s (default server.retry_after)
    500, 503, 400, 404   an error status with an OpenAI-style error body
    401, 403      auth error; the body echoes the key it was sent, as some servers do, so key scrubbing is tested
A rule from on() beats the push() queue; with neither, `default` applies (set it, e.g. "slow:0.2", to slow a run).
"""
import json
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


def default_reply(messages):
    return "Question: What is in the image?\nAnswer: " + messages[-1]["content"].splitlines()[0]


class FakeOpenAI:
    def __init__(self, reply=default_reply, default="ok", slow_seconds=2.0, retry_after="0"):
        self.reply = reply              # messages -> content string
        self.default = default
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after
        self.requests = []
        self._script = deque()
        self._rules = []                # [match, behaviour, times_left or None]
        self._lock = threading.Lock()
        self._server = None

    # --- fault injection -------------------------------------------------------------------------------------------
    def push(self, *behaviours):
        """The next requests (in arrival order) get these behaviours, one each."""
        with self._lock:
            self._script.extend(behaviours)

    def on(self, match, behaviour, times=1):
        """Requests whose last message contains `match` (or for which match(messages) is true) get `behaviour`,
        `times` times (None: always)."""
        with self._lock:
            self._rules.append([match, behaviour, times])

    def _choose(self, messages):
        with self._lock:
            last = messages[-1].get("content", "") if messages else ""
            for rule in self._rules:
                match, behaviour, left = rule
                hit = match(messages) if callable(match) else match in last
                if hit and (left is None or left > 0):
                    if left is not None:
                        rule[2] -= 1
                    return behaviour
            return self._script.popleft() if self._script else self.default

    # --- server ----------------------------------------------------------------------------------------------------
    @property
    def url(self):
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body_bytes = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(body_bytes)
                except ValueError:
                    body = None
                messages = body.get("messages", []) if isinstance(body, dict) else []
                behaviour = fake._choose(messages)
                with fake._lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                          "behaviour": behaviour})
                try:
                    fake._respond(self, body, messages, behaviour)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): nothing to do
                    pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _respond(self, handler, body, messages, behaviour):
        name, _, param = behaviour.partition(":")
        if handler.path.rstrip("/") != "/v1/chat/completions":
            return self._send(handler, 404, {"error": {"message": f"no route {handler.path}"}})
        if body is None:
            return self._send(handler, 400, {"error": {"message": "body is not JSON"}})
        if name == "drop":
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        if name in ("401", "403"):
            key = handler.headers.get("Authorization", "").removeprefix("Bearer ")
            return self._send(handler, int(name), {"error": {"message": f"Incorrect API key provided: {key}"}})
        if name == "429":
            return self._send(handler, 429, {"error": {"message": "Rate limit reached"}},
                              {"Retry-After": param or self.retry_after})
        if name.isdigit():
            return self._send(handler, int(name), {"error": {"message": f"server error {name}"}})
        if name == "malformed":
            return self._send(handler, 200, '{"choices": [{"message": ')
        if name == "slow":
            time.sleep(float(param or self.slow_seconds))
        content = "" if name == "empty" else self.reply(messages)
        finish = "stop"
        if name == "length":
            content, finish = content[: len(content) // 2], "length"
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        completion_tokens = len(content.split())
        payload = {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
        if name == "field":  # a reply of the wrong shape
            key, _, value = param.partition("=")
            choice = payload["choices"][0]
            {"content": choice["message"], "finish_reason": choice}.get(key, payload)[key] = json.loads(value)
        self._send(handler, 200, payload, byte_every=float(param or 2.0) if name == "trickle" else None)

    @staticmethod
    def _send(handler, status, payload, headers=None, byte_every=None):
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        for i in range(0, len(data), 1 if byte_every else max(1, len(data))):
            if byte_every:
                time.sleep(byte_every)
            handler.wfile.write(data[i:i + 1] if byte_every else data)
            handler.wfile.flush()


@pytest.fixture
def fake_openai():
    """A running FakeOpenAI; `from tests.fake_openai import fake_openai` in a test module makes it a fixture."""
    with FakeOpenAI() as server:
        yield server
