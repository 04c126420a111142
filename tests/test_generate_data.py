import json
import os
import signal
import subprocess
import sys
import time

import pytest

import api
import fileio
import generate_data as gd
from tests.fake_openai import FakeOpenAI

KEY = "sk-test-7d1f0e9c4b2a-SECRET"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_coco(folder, n_images=4):
    """Image i has captions tagged 'img{i}' (so replies can be routed per image) and two boxes."""
    images, captions, instances = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": 200, "height": 100})
        captions += [{"id": 10 * i + k, "image_id": i, "caption": f"img{i} caption {k} of a  cat\n"} for k in range(3)]
        instances += [{"id": 10 * i, "image_id": i, "category_id": 17, "bbox": [20, 10, 100, 50]},
                      {"id": 10 * i + 1, "image_id": i, "category_id": 1, "bbox": [150, 0, 60, 100]}]
    cap_path, inst_path = str(folder / "captions.json"), str(folder / "instances.json")
    with open(cap_path, "w") as f:
        json.dump({"images": images, "annotations": captions}, f)
    with open(inst_path, "w") as f:
        json.dump({"images": images, "annotations": instances,
                   "categories": [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"}]}, f)
    return cap_path, inst_path


def task_of(messages):
    system = messages[0]["content"]
    return "detail" if "detailed description" in system else "complex" if "requires reasoning" in system else \
        "conversation"


def reply(messages):
    """A well-formed reply for the task, naming the image's tag (its first caption word) so pairing is checkable."""
    tag, task = messages[-1]["content"].split()[0], task_of(messages)
    if task == "detail":
        return f"A detailed description of {tag}.\nIt has a cat."
    if task == "complex":
        return f"Question: Why is the cat in {tag}?\nAnswer: Because\nit lives there."
    return f"Question: What is in {tag}?\nAnswer: A cat.\nQuestion: How many?\nAnswer: One."


def cli(server, cap, inst, out, *extra):
    return ["--captions", cap, "--instances", inst, "--out", str(out), "--base-url", server.url,
            "--timeout", "1", "--backoff", "0.01", "--workers", "3", "--model", "gpt-test", *extra]


def pairs_in(path):
    return [(r["image_id"], r["task"]) for r in fileio.read_jsonl(str(path))]


def all_pairs(n_images):
    return {(i, t) for i in range(1, n_images + 1) for t in gd.TASKS}


# --------------------------------------------------------------------------------------------------------------------
def test_context_boxes_and_errors(tmp_path):
    cap, inst = make_coco(tmp_path, 2)
    images = gd.load_coco(cap, inst)
    # [x, y, w, h] = [20, 10, 100, 50] on 200x100 -> x1 .1, y1 .1, x2 .6, y2 .6; the person box is clipped at 1
    assert gd.image_context(images[1], with_boxes=True) == (
        "img1 caption 0 of a cat\nimg1 caption 1 of a cat\nimg1 caption 2 of a cat\n\n"
        "cat: [0.100, 0.100, 0.600, 0.600]\nperson: [0.750, 0.000, 1.000, 1.000]")
    assert "cat:" not in gd.image_context(images[1], with_boxes=False)
    with open(cap) as f:
        data = json.load(f)
    data["annotations"][4]["image_id"] = 99
    with open(cap, "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match=r"captions.json: annotations\[4\] refers to image_id 99"):
        gd.load_coco(cap, inst)
    del data["annotations"][4]["image_id"]
    with open(cap, "w") as f:
        json.dump(data, f)
    with pytest.raises(SystemExit, match=r"error: .*captions.json: annotations\[4\] has no key 'image_id'"):
        gd.main(["--captions", cap, "--instances", inst, "--out", str(tmp_path / "o.jsonl"), "--dry-run"])


def test_select_images_is_seeded_and_growing():
    images = {i: {"captions": ["c"] if i != 5 else []} for i in range(20)}
    a, b = gd.select_images(images, 6, seed=1), gd.select_images(images, 10, seed=1)
    assert a == gd.select_images(images, 6, seed=1) and b[:6] == a and 5 not in b
    assert a != gd.select_images(images, 6, seed=2)


def test_parse_replies():
    reply_text = "Question: What?\nAnswer: A cat\non a mat.\n\nquestion: Why?\nAnswer: Sun."
    turns = gd.parse_reply("conversation", reply_text, "")
    assert turns == [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat\non a mat."},
                     {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "Sun."}]
    assert gd.parse_reply("complex", "**Question:** Why?\n**Answer:** Sun.", "") == [
        {"from": "human", "value": "<image>\nWhy?"}, {"from": "gpt", "value": "Sun."}]
    assert gd.parse_reply("detail", "  A cat.\n", "Describe it.") == [
        {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A cat."}]
    for bad in ["Sure! Question: a\nAnswer: b", "Question: a\nQuestion: b\nAnswer: c", "Question: a", "Answer: b",
                "Question: a\nAnswer:", "no markers at all"]:
        with pytest.raises(ValueError):
            gd.parse_reply("conversation", bad, "")
    with pytest.raises(ValueError, match="one question"):
        gd.parse_reply("complex", "Question: a\nAnswer: b\nQuestion: c\nAnswer: d", "")
    with pytest.raises(ValueError):
        gd.parse_reply("detail", "Question: a\nAnswer: b", "")


def test_prompts_parse_as_their_own_task():
    prompts = gd.load_prompts()
    assert len(prompts["detail_instructions"]) >= 10
    for task in gd.TASKS:
        assert prompts[task]["system"] and prompts[task]["examples"]
        for context, example_reply in prompts[task]["examples"]:  # the few-shot replies show the format we parse
            gd.parse_reply(task, example_reply, "Describe.")
            assert ("\n\n" in context) == (task != "conversation")  # boxes only for detail and complex


# --------------------------------------------------------------------------------------------------------------------
def test_client_retries_every_transient_fault():
    with FakeOpenAI(reply=lambda m: "hi") as server:
        client = api.ChatClient(server.url, KEY, "gpt-test", timeout=0.5, backoff=0.01)
        server.push("429:0.4", "500", "503", "drop", "malformed", "slow:1.5")
        start = time.monotonic()
        result = client.complete([{"role": "user", "content": "x"}])
        assert time.monotonic() - start >= 0.4 + 0.5  # Retry-After honoured, and the slow reply waited for a timeout
        assert result["content"] == "hi" and result["finish_reason"] == "stop" and result["model"] == "gpt-test"
        assert result["usage"]["completion_tokens"] == 1
        assert [r["behaviour"] for r in server.requests] == ["429:0.4", "500", "503", "drop", "malformed", "slow:1.5",
                                                             "ok"]


def test_client_fatal_and_give_up():
    with FakeOpenAI() as server:
        client = api.ChatClient(server.url, KEY, "gpt-test", timeout=1, backoff=0.01, max_retries=2)
        for status in ("400", "404", "401", "403"):
            server.push(status)
            with pytest.raises(api.FatalAPIError) as e:
                client.complete([{"role": "user", "content": "x"}])
            assert e.value.status == int(status)
            assert KEY not in str(e.value) and KEY not in repr(e.value) and KEY not in repr(client)
        assert "refused" in str(e.value)
        assert len(server.requests) == 4  # no retry on a 4xx
        server.push("500", "503", "500", "ok")
        with pytest.raises(api.APIError, match="gave up after 3 attempts.*500") as e:
            client.complete([{"role": "user", "content": "x"}])
        assert not isinstance(e.value, api.FatalAPIError) and len(server.requests) == 7


def test_rate_limit_spaces_requests():
    with FakeOpenAI() as server:
        client = api.ChatClient(server.url, KEY, "gpt-test", rpm=600)  # one request per 0.1 s
        start = time.monotonic()
        for _ in range(4):
            client.complete([{"role": "user", "content": "x"}])
        assert time.monotonic() - start >= 0.29


# --------------------------------------------------------------------------------------------------------------------
def test_run_faults_headers_resume_export(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    cap, inst = make_coco(tmp_path, 4)
    out, failed, exported = tmp_path / "out.jsonl", tmp_path / "out.failed.jsonl", tmp_path / "llava.json"
    with FakeOpenAI(reply=reply) as server:
        server.push("429", "500", "drop", "malformed", "empty", "length", "503")  # transient: all pairs recover
        server.on(lambda m: "img2" in m[-1]["content"] and task_of(m) == "conversation", "empty", times=None)
        server.on(lambda m: "img3" in m[-1]["content"] and task_of(m) == "detail", "length", times=None)
        server.on(lambda m: "img4" in m[-1]["content"] and task_of(m) == "complex", "400", times=None)
        assert gd.main(cli(server, cap, inst, out, "--parse-retries", "2", "--export", str(exported))) == 0
        done, fails = pairs_in(out), fileio.read_jsonl(str(failed))
        # every pair exactly once, in the output or in the failures
        assert sorted(done + [(r["image_id"], r["task"]) for r in fails]) == sorted(all_pairs(4))
        reasons = {(r["image_id"], r["task"]): r["reason"] for r in fails}
        assert reasons.keys() == {(2, "conversation"), (3, "detail"), (4, "complex")}
        assert reasons[(2, "conversation")] == "empty reply" and "finish_reason: length" in reasons[(3, "detail")]
        assert "HTTP 400" in reasons[(4, "complex")]
        asked = [(r["body"]["messages"][-1]["content"].split()[0], task_of(r["body"]["messages"]))
                 for r in server.requests]
        # the two unusable pairs were each asked 1 + --parse-retries times; an HTTP 400 is not retried
        assert asked.count(("img2", "conversation")) == asked.count(("img3", "detail")) == 3
        assert asked.count(("img4", "complex")) == 1
        for record in fileio.read_jsonl(str(out)):
            tag = f"img{record['image_id']}"
            assert tag in record["raw"] and record["model"] == "gpt-test" and record["usage"]["prompt_tokens"] > 0
            assert record["conversations"][0]["value"].startswith("<image>\n")
        # what the server saw: headers, body, message order
        request = server.requests[-1]
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == f"Bearer {KEY}"
        assert request["headers"]["Content-Type"] == "application/json"
        body = request["body"]
        assert body["model"] == "gpt-test" and body["temperature"] == 0.7 and body["max_tokens"] == 1024
        prompts, task = gd.load_prompts(), task_of(body["messages"])
        assert [m["role"] for m in body["messages"]] == ["system"] + ["user", "assistant"] * len(
            prompts[task]["examples"]) + ["user"]
        assert body["messages"][1]["content"] == prompts[task]["examples"][0][0]
        assert body["messages"][2]["content"] == prompts[task]["examples"][0][1]
        image_id = int(body["messages"][-1]["content"].split()[0][3:])
        images = gd.load_coco(cap, inst)
        assert body["messages"][-1]["content"] == gd.image_context(images[image_id], task != "conversation")
        # the export is the LLaVA JSON list
        with open(exported) as f:
            data = json.load(f)
        assert len(data) == len(done) and len({d["id"] for d in data}) == len(data)
        for d in data:
            assert set(d) == {"id", "image", "conversations"} and d["image"].endswith(".jpg")
            assert [t["from"] for t in d["conversations"]] == ["human", "gpt"] * (len(d["conversations"]) // 2)
            assert d["conversations"][0]["value"].count("<image>") == 1
        detail = next(d for d in data if d["id"].endswith("_detail"))
        assert detail["conversations"][0]["value"].split("\n", 1)[1] in prompts["detail_instructions"]
        # re-running skips everything; --retry-failed redoes only the failures
        n = len(server.requests)
        assert gd.main(cli(server, cap, inst, out)) == 0 and len(server.requests) == n
        server._rules.clear()
        assert gd.main(cli(server, cap, inst, out, "--retry-failed")) == 0
        assert len(server.requests) == n + 3
        assert sorted(pairs_in(out)) == sorted(all_pairs(4)) and fileio.read_jsonl(str(failed)) == []
    captured = capsys.readouterr()
    assert "this run: 3 done, 0 failed" in captured.out
    for path in tmp_path.iterdir():
        assert KEY not in path.read_text()
    assert KEY not in captured.out + captured.err
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_401_stops_the_run_and_never_leaks_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MY_KEY", KEY)
    cap, inst = make_coco(tmp_path, 4)
    out = tmp_path / "out.jsonl"
    with FakeOpenAI(reply=reply, default="401") as server:
        server.push("ok")
        code = gd.main(cli(server, cap, inst, out, "--api-key-env", "MY_KEY", "--workers", "2"))
        assert code == 1 and len(server.requests) <= 3  # nothing new starts after the 401
    captured = capsys.readouterr()
    assert "HTTP 401" in captured.err and "refused" in captured.err
    assert len(pairs_in(out)) <= 1 and not (tmp_path / "out.failed.jsonl").exists()  # not the pairs' fault
    for path in tmp_path.iterdir():
        assert KEY not in path.read_text()
    assert KEY not in captured.out + captured.err


def test_max_cost_stops_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    cap, inst = make_coco(tmp_path, 4)
    out = tmp_path / "out.jsonl"
    with FakeOpenAI(reply=reply) as server:
        # a completion is 8-13 words ("tokens") here: $1 per completion token makes each pair cost $8-$13
        args = cli(server, cap, inst, out, "--workers", "1", "--price-in", "0", "--price-out", "1e6")
        assert gd.main(args + ["--max-cost", "25"]) == 3
        assert len(pairs_in(out)) == 3 and len(server.requests) == 3
        assert "--max-cost $25.0 reached" in capsys.readouterr().err
        assert gd.main(args) == 0 and sorted(pairs_in(out)) == sorted(all_pairs(4))


def test_dry_run_needs_no_key_and_no_network(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cap, inst = make_coco(tmp_path, 2)
    out = tmp_path / "out.jsonl"
    args = ["--captions", cap, "--instances", inst, "--out", str(out), "--base-url", "http://127.0.0.1:9/v1"]
    assert gd.main(args + ["--dry-run", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    first = gd.select_images(gd.load_coco(cap, inst), None, 3)[0]
    assert printed.count("--- system ---") == 3 and f"img{first} caption 0" in printed and "cat: [0.100" in printed
    assert not out.exists()
    with pytest.raises(SystemExit, match="OPENAI_API_KEY"):
        gd.main(args)


# --------------------------------------------------------------------------------------------------------------------
def test_jsonl_torn_and_corrupt_lines(tmp_path):
    path = str(tmp_path / "x.jsonl")
    fileio.append_jsonl(path, {"a": 1})
    fileio.append_jsonl(path, {"a": 2})
    with open(path, "a") as f:
        f.write('{"a": 3}')  # parses, but without its newline the write may be incomplete: torn
    assert fileio.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert fileio.repair_jsonl(path) == [{"a": 1}, {"a": 2}]
    with open(path) as f:
        assert f.read() == '{"a": 1}\n{"a": 2}\n'
    with open(path, "a") as f:
        f.write("\0\0\0\0\n")  # zeros a crash can leave behind
    assert fileio.repair_jsonl(path) == [{"a": 1}, {"a": 2}] and os.path.getsize(path) == 18
    with open(path, "w") as f:
        f.write('{"a": 1}\n{"a": \n{"a": 2}\n')
    with pytest.raises(ValueError, match="x.jsonl: line 2"):
        fileio.read_jsonl(path)


def test_resume_redoes_a_torn_line(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    cap, inst = make_coco(tmp_path, 2)
    out = tmp_path / "out.jsonl"
    with FakeOpenAI(reply=reply) as server:
        assert gd.main(cli(server, cap, inst, out, "--tasks", "conversation,detail")) == 0
        text = out.read_text()
        out.write_text(text[: len(text) - 40])  # the last record loses its tail and its newline
        torn = json.loads(text.splitlines()[-1])
        n = len(server.requests)
        assert gd.main(cli(server, cap, inst, out, "--tasks", "conversation,detail")) == 0
        assert len(server.requests) == n + 1
        assert server.requests[-1]["body"]["messages"][-1]["content"].startswith(f"img{torn['image_id']} ")
    lines = out.read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # every line valid
    assert sorted(pairs_in(out)) == sorted((i, t) for i in (1, 2) for t in ("conversation", "detail"))


def test_sigkill_mid_run_then_resume(tmp_path):
    cap, inst = make_coco(tmp_path, 8)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    with FakeOpenAI(reply=reply, default="slow:0.3") as server:
        args = [sys.executable, os.path.join(ROOT, "generate_data.py"), *cli(server, cap, inst, out, "--workers", "2")]
        args[args.index("--timeout") + 1] = "5"
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while (not out.exists() or out.read_text().count("\n") < 4) and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        stdout, stderr = proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        n_before = len(pairs_in(out))
        assert 4 <= n_before < 24
        server.default = "ok"
        resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
        assert resumed.returncode == 0, resumed.stderr
    lines = out.read_text().splitlines()
    assert all(json.loads(line)["conversations"] for line in lines)
    assert sorted(pairs_in(out)) == sorted(all_pairs(8))  # each pair exactly once
    assert f"{24 - n_before} to generate" in resumed.stdout
    for text in (stdout.decode(), stderr.decode(), resumed.stdout, resumed.stderr, out.read_text()):
        assert KEY not in text
