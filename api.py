"""The one chat-completions client (OpenAI's wire format over raw HTTP): generate_data.py, evaluate.py and
scienceqa.py talk to GPT-4 through it, and ask many questions through ask_all, which a rerun continues.

Retries with exponential backoff and jitter on timeouts, dropped connections, 429 and 5xx (honouring Retry-After up
to max_wait); a malformed reply is retried once (each may be billed). A requests-per-minute limit shared by worker
threads, a deadline per attempt and one per request (the worst case, whatever the server does), waits that cancel()
ends at once, and an API key that never leaves the Authorization header: it is stripped and checked where it is
read, left out of repr, and scrubbed from every error text, requests' own included.
"""
import email.utils
import http.client
import json
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
import urllib3
from tqdm import tqdm

from fileio import append_jsonl, check_unique, resume_jsonl

MAX_BODY = 32 * 2**20  # a chat completion is kilobytes; a server sending more than this is broken


class APIError(Exception):
    """A request that failed for good (retries used up, or refused): the pair is recorded as failed, the run goes on."""


class FatalAPIError(APIError):
    """A non-retryable HTTP status (401/403 and other 4xx). `status` says which; 401/403 stop the whole run."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


class Cancelled(Exception):
    """cancel() was called (Ctrl-C): the request stopped waiting. Not an APIError: it is nobody's failure."""


def check_api_key(key, where="the API key"):
    """The key without surrounding whitespace (a key pasted from a file ends in a newline), or a ValueError that
    says what is wrong with it and never shows it. Keys are visible ASCII: anything else cannot go in a header."""
    key = key.strip() if isinstance(key, str) else ""
    if not key:
        raise ValueError(f"{where} is empty")
    bad = next((i for i, c in enumerate(key) if not "!" <= c <= "~"), None)
    if bad is not None:
        raise ValueError(f"{where} has a character that cannot be sent in an HTTP header (character {bad + 1} of "
                         f"{len(key)}, U+{ord(key[bad]):04X}); copy the key again")
    return key


def read_api_key(env_name):
    """The key in the environment variable env_name, checked; a ValueError names the variable, never the key."""
    return check_api_key(os.environ.get(env_name, ""), f"the environment variable {env_name} (the API key)")


class RateLimiter:
    """Spaces request starts at least 60/rpm seconds apart, across all worker threads."""

    def __init__(self, rpm):
        self.interval = 60.0 / rpm if rpm else 0.0
        self.next_start = 0.0
        self.lock = threading.Lock()

    def wait(self, sleep=time.sleep):
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        sleep(max(0.0, start - now))


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


def parse_completion(data, default_model):
    """A 200 body -> {"content", "finish_reason", "usage", "model"}, every field of the type callers rely on;
    ValueError for anything else (a malformed reply is retried once). Content null (a refusal by a filter, a tool
    call) is malformed too: stored as "" it would count as an answer and never be asked again."""
    choice = data["choices"][0]
    content, finish_reason = choice["message"].get("content"), choice.get("finish_reason")
    usage, model = data.get("usage") or {}, data.get("model", default_model)
    if not isinstance(content, str) or not isinstance(finish_reason, (str, type(None))):
        raise ValueError("content is not a string, or finish_reason not a string or null")
    if not isinstance(usage, dict) or not isinstance(model, str):
        raise ValueError("usage is not an object or model not a string")
    tokens = {key: usage.get(key) or 0 for key in ("prompt_tokens", "completion_tokens")}
    if not all(type(n) is int and n >= 0 for n in tokens.values()):
        raise ValueError(f"token counts are not counts: {tokens}")
    return {"content": content, "finish_reason": finish_reason, "usage": tokens, "model": model}


class _Timeout(Exception):
    pass


class _TooLarge(Exception):
    pass


class ChatClient:
    """timeout: seconds one attempt may take, from sending the request to the last byte of the reply (the reply is
    read as it arrives and the clock checked between reads, so a server trickling bytes times out too; the status
    line and headers are bounded per read by the same number). deadline: seconds one complete() may take in all,
    attempts, backoffs and Retry-After waits together (default 5 x timeout): without it a server that trickles every
    reply would hold each request (max_retries + 1) x timeout plus the waits, 7 x 60 s + up to 6 x 120 s by default.
    A retry whose wait would reach the deadline is not made, and the last attempt is cut short to end by it, so a
    request takes at most `deadline` seconds (plus, with rpm, one wait for its turn). max_wait: the longest wait
    before a retry; a server asking for more (Retry-After) fails the request at once, like one whose retries are
    used up."""

    def __init__(self, base_url, api_key, model, temperature=0.7, max_tokens=1024, timeout=60.0, max_retries=6,
                 rpm=None, backoff=1.0, max_backoff=60.0, max_wait=120.0, deadline=None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = check_api_key(api_key)  # private, left out of repr, scrubbed from every error text
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.timeout, self.max_retries = timeout, max_retries
        self.deadline = 5 * timeout if deadline is None else deadline
        self.backoff, self.max_backoff, self.max_wait = backoff, max_backoff, max_wait
        self.limiter = RateLimiter(rpm)
        self.cancelled = threading.Event()
        self._local = threading.local()  # one requests.Session (connection pool) per worker thread

    def __repr__(self):
        return f"ChatClient(url={self.url!r}, model={self.model!r})"

    def scrub(self, text):
        return str(text).replace(self._api_key, "***")

    def cancel(self):
        """Every wait (backoff, Retry-After, rate limit) in any thread ends now and raises Cancelled."""
        self.cancelled.set()

    def _sleep(self, seconds):
        if self.cancelled.wait(max(0.0, seconds)):  # an Event, not time.sleep: cancel() ends every wait at once
            raise Cancelled("the client was cancelled")

    def _session(self):
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _post(self, body, headers, seconds):
        """One attempt -> (status, headers, body text), all of it within `seconds`."""
        deadline = time.monotonic() + seconds
        with self._session().post(self.url, json=body, headers=headers, timeout=seconds, stream=True) as r:
            chunks, size = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise _Timeout
                # read1: whatever has arrived (up to 64 KiB), so the deadline is checked however slowly bytes come
                chunk = r.raw.read1(65536, decode_content=True) if hasattr(r.raw, "read1") else \
                    r.raw.read(1024, decode_content=True)  # urllib3 < 2: the deadline is checked every 1 KiB
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_BODY:
                    raise _TooLarge(f"a reply larger than {MAX_BODY} bytes")
            try:
                text = b"".join(chunks).decode(r.encoding or "utf-8", errors="replace")
            except LookupError:  # a charset Python does not know
                text = b"".join(chunks).decode("utf-8", errors="replace")
            return r.status_code, r.headers, text

    def complete(self, messages):
        """One chat completion -> {"content", "finish_reason", "usage", "model"}; raises APIError / FatalAPIError,
        or Cancelled after cancel()."""
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        headers = {"Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json"}
        reason, retry_after, malformed = "", None, 0
        deadline = time.monotonic() + self.deadline
        for attempt in range(self.max_retries + 1):
            if attempt:
                # exponential backoff with jitter (so workers do not retry in lockstep), or Retry-After when given
                wait = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                if retry_after is not None and retry_after > self.max_wait:
                    raise APIError(f"gave up after {attempt} attempt(s): the server asks to wait {retry_after:.0f} s "
                                   f"(Retry-After), more than max_wait {self.max_wait:g} s; last error: {reason}")
                wait = min(self.max_wait, wait if retry_after is None else retry_after)
                if time.monotonic() + wait >= deadline:
                    raise APIError(f"gave up after {attempt} attempt(s): the next would start past the request's "
                                   f"deadline of {self.deadline:g} s; last error: {reason}")
                self._sleep(wait)
            retry_after = None
            self.limiter.wait(self._sleep)
            seconds = min(self.timeout, deadline - time.monotonic())  # the last attempt ends at the deadline
            if seconds <= 0:
                raise APIError(f"gave up after {attempt} attempt(s): the request's deadline of {self.deadline:g} s "
                               f"passed; last error: {reason}")
            try:
                status, response_headers, text = self._post(body, headers, seconds)
            except (_Timeout, requests.Timeout, urllib3.exceptions.ReadTimeoutError):
                reason = f"timeout: no complete reply within {seconds:g} s"
                continue
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, urllib3.exceptions.HTTPError,
                    _TooLarge) as e:  # refused, dropped, cut short, undecodable or oversized
                reason = "connection error: " + self.scrub(e)[:200]
                continue
            except requests.RequestException as e:  # a bad URL or header: retrying cannot help. `from None`: the
                # chained original would print the key (requests puts header values in its messages)
                raise APIError(f"request to {self.url} failed: {type(e).__name__}: {self.scrub(e)[:300]}") from None
            except (OSError, http.client.HTTPException) as e:  # a socket error urllib3 did not wrap
                reason = "connection error: " + self.scrub(e)[:200]
                continue
            if status == 200:
                try:
                    return parse_completion(json.loads(text), self.model)
                except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
                    reason = f"malformed response ({self.scrub(e)[:100]}): {self.scrub(text)[:200]}"
                    malformed += 1
                    if malformed == 2:  # each may have been billed, and a server that sent two will send more
                        raise APIError(f"gave up after {attempt + 1} attempts: a malformed response twice; last: "
                                       f"{reason}")
                    continue
            message = f"HTTP {status} from {self.url}: {self.scrub(text)[:300]}"
            if status == 429 or status >= 500:
                reason, retry_after = message, retry_after_seconds(response_headers.get("Retry-After"))
                continue
            if status in (401, 403):
                message += " -- the API key was refused; check the key and its permissions"
            raise FatalAPIError(message, status)
        raise APIError(f"gave up after {self.max_retries + 1} attempts; last error: {reason}")


def client_from_env(base_url, key_env, model, **settings):
    """A ChatClient whose key is in the environment variable key_env; a ValueError names the variable, never the
    key. settings: ChatClient's (temperature, max_tokens, max_wait, ...)."""
    return ChatClient(base_url, read_api_key(key_env), model, **settings)


def client_source(client, **prompt):
    """What a client's answers depend on, for the record beside an answer file (ask_all's source): the model and
    its sampling settings, and the caller's prompt settings (shots, ...). Not the URL: the same model elsewhere."""
    return {"api_model": client.model, "temperature": client.temperature, "max_tokens": client.max_tokens, **prompt}


def complete_or_none(client, messages, what):
    """The reply text, or None when the request failed for good (a warning naming `what` on stderr) or was
    cancelled: ask_all's `ask`, so that the question is asked again on the next run. A refused key raises."""
    try:
        return client.complete(messages)["content"]
    except Cancelled:  # Ctrl-C: nobody's failure
        return None
    except APIError as e:
        if isinstance(e, FatalAPIError) and e.status in (401, 403):
            raise
        print(f"warning: {what}: {e}", file=sys.stderr)
        return None


# -----------------------------------------------------------------------------------------------------------------
# many requests: worker threads, and an answer file that a rerun continues


def run_pool(fn, items, workers, desc, cancel=None):
    """[fn(item)] in order, `workers` at a time; on an error or Ctrl-C the items not started are dropped, and
    cancel() (a ChatClient's) ends the waits of those in flight, so Ctrl-C exits at once."""
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, disable=not items))
    except KeyboardInterrupt:
        if cancel:
            cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ask_all(items, ask, out_path, record, source, workers=1, cancel=None):
    """Ask every item whose question_id is not yet in the JSONL file out_path and append record(item, text) as each
    reply comes, so that an interrupted run asks nothing twice. The file is opened with fileio.resume_jsonl: a torn
    last line is cut, and answers that another `source` (client_source: model, settings) produced are refused.
    ask(item) -> text, or None for a failed request (complete_or_none): nothing is recorded and the next run asks
    again. workers and cancel: run_pool's. Returns (answers that were there, new answers, failed requests)."""
    check_unique([item["question_id"] for item in items], out_path)
    there = {r["question_id"] for r in resume_jsonl(out_path, source)}
    todo = [item for item in items if item["question_id"] not in there]
    lock = threading.Lock()  # one writer at a time: two threads' lines never interleave

    def one(item):
        text = ask(item)
        if text is not None:
            with lock:
                append_jsonl(out_path, record(item, text))
        return text is not None

    new = sum(run_pool(one, todo, workers, os.path.basename(out_path), cancel))
    return len(there), new, len(todo) - new
