"""The one chat-completions client (OpenAI's wire format over raw HTTP): generate_data.py, evaluate.py and
scienceqa.py talk to GPT-4 through it.

Retries with exponential backoff and jitter on timeouts, dropped connections, 429 and 5xx (honouring Retry-After),
a requests-per-minute limit shared by worker threads, and an API key that never leaves the Authorization header:
it is left out of repr and scrubbed from every error text.
"""
import email.utils
import random
import threading
import time

import requests


class APIError(Exception):
    """A request that failed for good (retries used up, or refused): the pair is recorded as failed, the run goes on."""


class FatalAPIError(APIError):
    """A non-retryable HTTP status (401/403 and other 4xx). `status` says which; 401/403 stop the whole run."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


class RateLimiter:
    """Spaces request starts at least 60/rpm seconds apart, across all worker threads."""

    def __init__(self, rpm):
        self.interval = 60.0 / rpm if rpm else 0.0
        self.next_start = 0.0
        self.lock = threading.Lock()

    def wait(self):
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        time.sleep(max(0.0, start - now))


def retry_after_seconds(value):
    """Retry-After is either seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class ChatClient:
    def __init__(self, base_url, api_key, model, temperature=0.7, max_tokens=1024, timeout=60.0, max_retries=6,
                 rpm=None, backoff=1.0, max_backoff=60.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key  # private, left out of repr, scrubbed from every error text
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.limiter = RateLimiter(rpm)
        self._local = threading.local()  # one requests.Session (connection pool) per worker thread

    def __repr__(self):
        return f"ChatClient(url={self.url!r}, model={self.model!r})"

    def scrub(self, text):
        text = str(text)
        return text.replace(self._api_key, "***") if self._api_key else text

    def _session(self):
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def complete(self, messages):
        """One chat completion -> {"content", "finish_reason", "usage", "model"}; raises APIError / FatalAPIError."""
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        headers = {"Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json"}
        reason, retry_after = "", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                # exponential backoff with jitter (so workers do not retry in lockstep), at least Retry-After
                wait = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                time.sleep(wait if retry_after is None else retry_after)
            retry_after = None
            self.limiter.wait()
            try:
                r = self._session().post(self.url, json=body, headers=headers, timeout=self.timeout)
            except requests.Timeout:
                reason = f"timeout after {self.timeout}s"
                continue
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:  # refused or dropped
                reason = "connection error: " + self.scrub(e)[:200]
                continue
            if r.status_code == 200:
                try:
                    data = r.json()
                    choice = data["choices"][0]
                    return {"content": choice["message"].get("content") or "",
                            "finish_reason": choice.get("finish_reason"), "usage": data.get("usage") or {},
                            "model": data.get("model", self.model)}
                except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                    reason = "malformed response: " + self.scrub(r.text)[:200]
                    continue
            message = f"HTTP {r.status_code} from {self.url}: {self.scrub(r.text)[:300]}"
            if r.status_code == 429 or r.status_code >= 500:
                reason, retry_after = message, retry_after_seconds(r.headers.get("Retry-After"))
                continue
            if r.status_code in (401, 403):
                message += " -- the API key was refused; check the key and its permissions"
            raise FatalAPIError(message, r.status_code)
        raise APIError(f"gave up after {self.max_retries + 1} attempts; last error: {reason}")
