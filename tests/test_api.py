"""api.ChatClient against a real HTTP server on 127.0.0.1 that injects faults (tests/fake_openai.py); api.ask_all
and api.run_pool with plain functions."""
import json
import threading
import time
import traceback

import pytest
import requests

import api
import fileio
from tests.fake_openai import FakeOpenAI

KEY = "sk-test-7d1f0e9c4b2a-SECRET"
MESSAGES = [{"role": "user", "content": "x"}]


def within(seconds, fn):
    """fn() in a daemon thread -> what it returned or raised; fails the test if it is still running after `seconds`
    (an unfixed client would sleep or read for minutes: the thread is left behind, not waited for)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as e:  # noqa: B902  the test inspects it
            outcome["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return outcome.get("value", outcome.get("error")), time.monotonic() - start


def test_retries_every_transient_fault():
    with FakeOpenAI(reply=lambda m: "hi") as server:
        client = api.ChatClient(server.url, KEY, "gpt-test", timeout=0.5, backoff=0.01)
        server.push("429:0.4", "500", "503", "drop", "malformed", "slow:1.5")
        start = time.monotonic()
        result = client.complete(MESSAGES)
        assert time.monotonic() - start >= 0.4 + 0.5  # Retry-After honoured, and the slow reply waited for a timeout
        assert result == {"content": "hi", "finish_reason": "stop", "model": "gpt-test",
                          "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
        assert [r["behaviour"] for r in server.requests] == ["429:0.4", "500", "503", "drop", "malformed", "slow:1.5",
                                                             "ok"]


WRONG_SHAPES = ['field:content=["a", "b"]', 'field:usage="12"', 'field:usage={"completion_tokens": "7"}',
                'field:usage={"prompt_tokens": -1}', "field:model=5", "field:finish_reason=3", "field:content=null",
                "malformed"]


@pytest.mark.parametrize("fault", WRONG_SHAPES)
def test_a_wrong_shaped_reply_is_retried_once(fault):
    with FakeOpenAI(reply=lambda m: "hi") as server:
        client = api.ChatClient(server.url, KEY, "gpt-test", backoff=0.01, max_retries=6)
        server.push(fault)
        assert client.complete(MESSAGES)["content"] == "hi"
        assert [r["behaviour"] for r in server.requests] == [fault, "ok"]


def test_a_second_malformed_reply_fails_the_request():
    """each may be billed: a server that answers malformed twice is not asked the other five times"""
    with FakeOpenAI(reply=lambda m: "hi") as server:
        client = api.ChatClient(server.url, KEY, "gpt-test", backoff=0.01, max_retries=6)
        server.push("500", "malformed", "503", "field:content=null", "ok")
        with pytest.raises(api.APIError, match="malformed response.*twice"):
            client.complete(MESSAGES)
        assert len(server.requests) == 4  # the 5xx between them are retried as any 5xx is


def test_null_usage_counts_nothing():
    with FakeOpenAI() as server:
        server.push("field:usage=null")
        client = api.ChatClient(server.url, KEY, "gpt-test", max_retries=0)
        assert client.complete(MESSAGES)["usage"] == {"prompt_tokens": 0, "completion_tokens": 0}


def test_4xx_is_fatal_at_once_and_never_shows_the_key():
    with FakeOpenAI() as server:  # the fake's 401/403 bodies echo the key they were sent
        client = api.ChatClient(server.url, KEY, "gpt-test", timeout=1, backoff=0.01, max_retries=2)
        for status in ("400", "404", "401", "403"):
            server.push(status)
            with pytest.raises(api.FatalAPIError) as e:
                client.complete(MESSAGES)
            assert e.value.status == int(status)
            assert KEY not in str(e.value) and KEY not in repr(e.value) and KEY not in repr(client)
        assert "refused" in str(e.value)
        assert len(server.requests) == 4  # no retry on a 4xx


def test_gives_up_after_max_retries():
    with FakeOpenAI() as server:
        client = api.ChatClient(server.url, KEY, "gpt-test", timeout=1, backoff=0.01, max_retries=2)
        server.push("500", "503", "500", "ok")
        with pytest.raises(api.APIError, match="gave up after 3 attempts.*500") as e:
            client.complete(MESSAGES)
        assert not isinstance(e.value, api.FatalAPIError) and len(server.requests) == 3


def test_rate_limit_spaces_requests():
    with FakeOpenAI() as server:
        client = api.ChatClient(server.url, KEY, "gpt-test", rpm=600)  # one request per 0.1 s
        start = time.monotonic()
        for _ in range(4):
            client.complete(MESSAGES)
        assert time.monotonic() - start >= 0.29


# ---------------------------------------------------------------------------------------------------------------------
# the key: stripped, checked, never shown


def test_key_pasted_with_a_newline_is_stripped():
    with FakeOpenAI() as server:
        for pasted in (KEY + "\n", KEY + "\r\n", " " + KEY + "\r"):
            api.ChatClient(server.url, pasted, "gpt-test", max_retries=0).complete(MESSAGES)
        assert [r["headers"]["Authorization"] for r in server.requests] == [f"Bearer {KEY}"] * 3


@pytest.mark.parametrize("bad", [KEY[:10] + "\u2019" + KEY[10:], KEY[:10] + "\n" + KEY[10:], KEY + "\u00e9", "  \n"])
def test_a_key_that_cannot_be_a_header_is_refused_without_showing_it(bad):
    with pytest.raises(ValueError) as e:
        api.ChatClient("http://127.0.0.1:9/v1", bad, "gpt-test")
    assert KEY not in str(e.value) and KEY[:10] not in str(e.value)
    assert "empty" in str(e.value) or "character" in str(e.value)


def test_read_api_key_names_the_variable_not_the_key(monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY + "\n")
    assert api.read_api_key("MY_KEY") == KEY
    monkeypatch.setenv("MY_KEY", KEY + "\u2019")
    with pytest.raises(ValueError, match="MY_KEY") as e:
        api.read_api_key("MY_KEY")
    assert KEY not in str(e.value)
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(ValueError, match="MY_KEY.*empty"):
        api.read_api_key("MY_KEY")


def test_requests_own_errors_are_scrubbed_and_not_chained(monkeypatch):
    """requests puts header values in its messages (InvalidHeader: 'Bearer sk-...'): the APIError raised instead
    carries no key, and `from None` keeps the original out of the traceback."""
    def post(self, url, **kw):
        raise requests.exceptions.InvalidHeader(f"Invalid return character or leading space in header: "
                                                f"Authorization: {kw['headers']['Authorization']!r}")
    monkeypatch.setattr(requests.Session, "post", post)
    client = api.ChatClient("http://127.0.0.1:9/v1", KEY, "gpt-test", max_retries=3)
    with pytest.raises(api.APIError, match="InvalidHeader") as e:
        client.complete(MESSAGES)
    assert e.value.__cause__ is None and e.value.__suppress_context__
    shown = "".join(traceback.format_exception(e.value))
    assert KEY not in shown and "***" in shown


def test_connection_errors_are_scrubbed(monkeypatch):
    def post(self, url, **kw):
        raise requests.ConnectionError(f"proxy said: bad credentials {KEY}")
    monkeypatch.setattr(requests.Session, "post", post)
    client = api.ChatClient("http://127.0.0.1:9/v1", KEY, "gpt-test", max_retries=1, backoff=0.01)
    with pytest.raises(api.APIError) as e:
        client.complete(MESSAGES)
    assert KEY not in "".join(traceback.format_exception(e.value))


# ---------------------------------------------------------------------------------------------------------------------
# waits and deadlines


def test_retry_after_beyond_max_wait_fails_at_once():
    with FakeOpenAI() as server:
        server.push("429:100000")  # 28 hours
        client = api.ChatClient(server.url, KEY, "gpt-test")  # default max_wait 120 s
        error, seconds = within(5, lambda: client.complete(MESSAGES))
        assert isinstance(error, api.APIError) and not isinstance(error, api.FatalAPIError)
        assert "Retry-After" in str(error) and "max_wait 120" in str(error) and len(server.requests) == 1


def test_backoff_is_capped_by_max_wait():
    with FakeOpenAI() as server:
        server.push("500", "500")
        client = api.ChatClient(server.url, KEY, "gpt-test", backoff=60, max_wait=0.2)
        result, seconds = within(5, lambda: client.complete(MESSAGES))
        assert isinstance(result, dict) and seconds < 2 and len(server.requests) == 3


def test_cancel_ends_a_wait_at_once():
    with FakeOpenAI() as server:
        server.push("429:60")
        client = api.ChatClient(server.url, KEY, "gpt-test")
        threading.Timer(0.3, client.cancel).start()
        error, seconds = within(5, lambda: client.complete(MESSAGES))
        assert isinstance(error, api.Cancelled) and not isinstance(error, api.APIError) and seconds < 1.5
        with pytest.raises(api.Cancelled):  # a cancelled client starts nothing new
            client.complete(MESSAGES)
        assert len(server.requests) == 1


def test_timeout_is_a_deadline_for_the_whole_reply():
    with FakeOpenAI() as server:
        server.push("trickle:0.4")  # every read gets a byte within 0.4 s: a per-read timeout never fires
        client = api.ChatClient(server.url, KEY, "gpt-test", timeout=1.0, max_retries=0)
        error, seconds = within(10, lambda: client.complete(MESSAGES))
        assert isinstance(error, api.APIError) and "timeout" in str(error) and seconds < 2.5


def test_a_trickling_server_holds_a_request_no_longer_than_its_deadline():
    with FakeOpenAI() as server:
        server.default = "trickle:0.3"  # every attempt runs into the timeout, and would be retried six times
        client = api.ChatClient(server.url, KEY, "gpt-test", timeout=1.0, deadline=2.5, backoff=0.01)
        error, seconds = within(10, lambda: client.complete(MESSAGES))
        assert isinstance(error, api.APIError) and "deadline of 2.5 s" in str(error) and seconds < 3.5
        assert len(server.requests) <= 3


def test_the_deadline_defaults_to_five_timeouts():
    assert api.ChatClient("http://127.0.0.1:9/v1", KEY, "gpt-test", timeout=7.0).deadline == 35.0


# ---------------------------------------------------------------------------------------------------------------------
# the client from the environment; many requests


def test_client_from_env_names_the_variable_not_the_key(monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY + "\u2019")
    with pytest.raises(ValueError, match="MY_KEY") as e:
        api.client_from_env("http://127.0.0.1:9/v1", "MY_KEY", "gpt-test")
    assert KEY not in str(e.value)


def test_client_from_env_sends_its_settings(monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY + "\n")
    with FakeOpenAI() as server:
        api.client_from_env(server.url, "MY_KEY", "gpt-test", temperature=0.0, max_tokens=7).complete(MESSAGES)
        request = server.requests[0]
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert (request["body"]["model"], request["body"]["temperature"], request["body"]["max_tokens"]) == (
        "gpt-test", 0.0, 7)


def record(item, text):
    return {"question_id": item["question_id"], "text": text}


SOURCE = {"api_model": "gpt-test", "temperature": 0.0}


def asker(asked, fail=()):
    """ask(item) that notes what it was asked and fails (None) on the ids in `fail`."""
    def ask(item):
        asked.append(item["question_id"])
        return None if item["question_id"] in fail else "answer " + item["question_id"]
    return ask


def test_ask_all_skips_what_is_there_and_cuts_a_torn_line(tmp_path):
    out = tmp_path / "answers.jsonl"
    out.write_text('{"question_id": "q0", "text": "kept"}\n{"question_id": "q1", "te')  # a run killed mid-write
    (tmp_path / "answers.jsonl.source.json").write_text(json.dumps(SOURCE))
    items = [{"question_id": f"q{i}"} for i in range(4)]
    asked = []
    assert api.ask_all(items, asker(asked), str(out), record, SOURCE) == (1, 3, 0)
    assert asked == ["q1", "q2", "q3"]  # q0 was not asked again; the torn q1 was
    assert out.read_text().splitlines() == ['{"question_id": "q0", "text": "kept"}'] + [
        json.dumps({"question_id": f"q{i}", "text": f"answer q{i}"}) for i in (1, 2, 3)]
    assert api.ask_all(items, asker(asked), str(out), record, SOURCE) == (4, 0, 0) and len(asked) == 3


def test_ask_all_leaves_a_failed_request_for_the_next_run(tmp_path):
    out = str(tmp_path / "answers.jsonl")
    items = [{"question_id": f"q{i}"} for i in range(3)]
    asked = []
    assert api.ask_all(items, asker(asked, fail={"q1"}), out, record, SOURCE) == (0, 2, 1)
    assert [r["question_id"] for r in fileio.read_jsonl(out)] == ["q0", "q2"]
    assert api.ask_all(items, asker(asked), out, record, SOURCE) == (2, 1, 0) and asked[3:] == ["q1"]


def test_ask_all_asks_workers_at_a_time_and_records_every_reply(tmp_path):
    out = str(tmp_path / "answers.jsonl")
    items = [{"question_id": f"q{i}"} for i in range(8)]
    together = threading.Barrier(4, timeout=5)  # lets requests through only four at once

    def ask(item):
        together.wait()
        return "answer " + item["question_id"]
    assert api.ask_all(items, ask, out, record, SOURCE, workers=4) == (0, 8, 0)
    records = fileio.read_jsonl(out)
    assert sorted(r["question_id"] for r in records) == [item["question_id"] for item in items]
    assert all(r["text"] == "answer " + r["question_id"] for r in records)


def test_ask_all_refuses_repeated_ids(tmp_path):
    items = [{"question_id": "q0"}, {"question_id": "q1"}, {"question_id": "q0"}]
    with pytest.raises(ValueError, match="answers.jsonl: question ids repeated: 'q0'"):
        api.ask_all(items, asker([]), str(tmp_path / "answers.jsonl"), record, SOURCE)


def test_ask_all_refuses_to_continue_another_models_answers(tmp_path):
    out, items = str(tmp_path / "answers.jsonl"), [{"question_id": f"q{i}"} for i in range(2)]
    api.ask_all(items[:1], asker([]), out, record, SOURCE)
    asked = []
    with pytest.raises(ValueError, match="api_model 'gpt-test' there, 'gpt-other' now"):
        api.ask_all(items, asker(asked), out, record, {**SOURCE, "api_model": "gpt-other"})
    assert asked == [] and len(fileio.read_jsonl(out)) == 1


def test_a_reply_with_null_content_is_not_recorded_and_asked_again(tmp_path):
    out, items = str(tmp_path / "answers.jsonl"), [{"question_id": "q0"}]
    with FakeOpenAI(reply=lambda m: "real") as server:
        client = api.ChatClient(server.url, KEY, "gpt-test", backoff=0.01)
        server.push("field:content=null", "field:content=null")

        def ask(item):
            return api.complete_or_none(client, MESSAGES, item["question_id"])
        assert api.ask_all(items, ask, out, record, SOURCE) == (0, 0, 1) and fileio.read_jsonl(out) == []
        assert api.ask_all(items, ask, out, record, SOURCE) == (0, 1, 0)
    assert fileio.read_jsonl(out) == [{"question_id": "q0", "text": "real"}]


def test_ctrl_c_in_the_pool_cancels_the_requests_in_flight():
    cancelled = threading.Event()

    def one(item):
        if item == 0:
            raise KeyboardInterrupt  # as if Ctrl-C reached the main thread while item 1 waits in a backoff
        return cancelled.wait(5)  # a client's wait: ends only when cancel() is called

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        api.run_pool(one, [0, 1], workers=2, desc="test", cancel=cancelled.set)
    assert cancelled.is_set() and time.monotonic() - start < 2
