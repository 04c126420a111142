import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

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
    # [x, y, w, h] = [20, 10, 100, 50] on 200x100 -> x1 .1, y1 .1, x2 .6, y2 .6; the person box is clipped at 1;
    # numbers are written as the original's few-shot contexts write them ("[0.0, 0.24, 0.214, 1.0]")
    assert gd.image_context(images[1], with_boxes=True) == (
        "img1 caption 0 of a cat\nimg1 caption 1 of a cat\nimg1 caption 2 of a cat\n\n"
        "cat: [0.1, 0.1, 0.6, 0.6]\nperson: [0.75, 0.0, 1.0, 1.0]")
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
    # the original's few-shot format: markers on their own line, "===" between blocks
    assert gd.parse_reply("conversation", "Question:\nWhat?\n===\nAnswer:\nA cat.\n\nOn a mat.\n===\nQuestion:\n"
                          "Why?\n===\nAnswer:\nSun.", "") == [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat.\n\nOn a mat."},
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


def test_built_in_examples_write_boxes_as_the_query_does():
    # an example whose numbers look unlike the query's ("0.120" beside "0.12") shows the model two formats
    for task in ("detail", "complex"):
        for context, _ in gd.load_prompts()[task]["examples"]:
            captions, boxes = context.split("\n\n")
            parsed = [(line.split(": ")[0], *json.loads(line.split(": ")[1])) for line in boxes.splitlines()]
            image = {"captions": captions.splitlines(), "boxes": parsed}
            assert gd.image_context(image, with_boxes=True) == context


# --------------------------------------------------------------------------------------------------------------------
# --prompts DIR: the original's playground/data/prompts layout


def write_task(folder, task_folder, system, pairs):
    """folder/task_folder/system_message.txt and {stem: (caps, conv)} as stem_caps.txt + stem_conv.txt."""
    d = folder / task_folder
    d.mkdir(parents=True, exist_ok=True)
    (d / "system_message.txt").write_text(system + "\n")
    for stem, (caps, conv) in pairs.items():
        (d / f"{stem}_caps.txt").write_text(caps)
        (d / f"{stem}_conv.txt").write_text(conv)
    return d


def test_a_prompts_folder_gives_the_original_few_shot_messages(tmp_path):
    cap, inst = make_coco(tmp_path, 1)
    prompts_dir = tmp_path / "paper"
    write_task(prompts_dir, "complex_reasoning", "You are an AI visual assistant.", {
        "001": ("Two dogs.\n\ndog: [0.0, 0.24, 0.214, 1.0]", "Question:\nWhy?\n===\nAnswer:\nPlay.\n"),
        "000": ("A man with ties.\n\ntie: [0.574, 0.298, 0.752, 0.704]\n",
                "Question:\nOdd?\n===\nAnswer:\nTen ties.")})
    prompts = gd.load_prompts(str(prompts_dir), ("complex",))
    image = {**gd.load_coco(cap, inst)[1], "boxes": [("dog", 0.12345, 0.0, 1 / 3, 1.0)]}
    assert gd.build_messages(prompts["complex"], gd.image_context(image, with_boxes=True)) == [
        {"role": "system", "content": "You are an AI visual assistant."},
        {"role": "user", "content": "A man with ties.\n\ntie: [0.574, 0.298, 0.752, 0.704]"},
        {"role": "assistant", "content": "Question:\nOdd?\n===\nAnswer:\nTen ties."},
        {"role": "user", "content": "Two dogs.\n\ndog: [0.0, 0.24, 0.214, 1.0]"},
        {"role": "assistant", "content": "Question:\nWhy?\n===\nAnswer:\nPlay."},
        {"role": "user", "content": "img1 caption 0 of a cat\nimg1 caption 1 of a cat\nimg1 caption 2 of a cat\n\n"
                                    "dog: [0.123, 0.0, 0.333, 1.0]"}]
    # a folder without detail_instructions.txt (the original's has none) draws from the built-in list
    assert prompts["detail_instructions"] == gd.load_prompts()["detail_instructions"]


def test_few_shot_pairs_come_in_number_order(tmp_path):
    pairs = {stem: (f"caps {stem}", f"Question: q{stem}\nAnswer: a") for stem in ("010", "002", "9", "000")}
    write_task(tmp_path, "conversation", "S", pairs)
    examples = gd.load_prompts(str(tmp_path), ("conversation",))["conversation"]["examples"]
    assert [context for context, _ in examples] == ["caps 000", "caps 002", "caps 9", "caps 010"]


@pytest.mark.parametrize("missing, message", [
    ("001_conv.txt", r"conversation/001_caps.txt: has no 001_conv.txt beside it"),
    ("001_caps.txt", r"conversation/001_conv.txt: has no 001_caps.txt beside it"),
    ("system_message.txt", r"conversation/system_message.txt: missing")])
def test_an_incomplete_task_folder_is_named(tmp_path, missing, message):
    d = write_task(tmp_path, "conversation", "S", {s: ("c", "Question: q\nAnswer: a") for s in ("000", "001")})
    (d / missing).unlink()
    with pytest.raises(ValueError, match=message):
        gd.load_prompts(str(tmp_path), ("conversation",))


def test_an_empty_or_absent_task_folder_is_named(tmp_path):
    (tmp_path / "conversation").mkdir()
    with pytest.raises(ValueError, match=r"conversation: empty folder"):
        gd.load_prompts(str(tmp_path), ("conversation",))
    with pytest.raises(ValueError, match=r"detail_description: no such folder"):
        gd.load_prompts(str(tmp_path), ("detail",))


def test_an_example_reply_the_parser_cannot_read_is_named(tmp_path):
    write_task(tmp_path, "conversation", "S", {"000": ("c", '{"question": "What?", "answer": "A cat."}')})
    with pytest.raises(ValueError, match=r"conversation/000_conv.txt: not a conversation reply"):
        gd.load_prompts(str(tmp_path), ("conversation",))


def test_the_fingerprint_follows_the_prompts(tmp_path):
    shutil.copytree(gd.PROMPTS, tmp_path / "p")
    built_in = gd.load_prompts()
    (tmp_path / "p" / "complex_reasoning" / "001_conv.txt").write_text("Question: Why?\nAnswer: Because.")
    changed = gd.load_prompts(str(tmp_path / "p"))
    assert changed["complex"]["fingerprint"] != built_in["complex"]["fingerprint"]
    assert changed["conversation"]["fingerprint"] == built_in["conversation"]["fingerprint"]
    (tmp_path / "p" / "detail_instructions.txt").write_text("Describe the following image in detail.\n")
    assert gd.load_prompts(str(tmp_path / "p"))["detail"]["fingerprint"] != built_in["detail"]["fingerprint"]


def test_a_resume_with_other_prompts_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    cap, inst = make_coco(tmp_path, 2)
    out, other = tmp_path / "out.jsonl", tmp_path / "other"
    example = ("A cat.", "Question:\nWhat?\n===\nAnswer:\nA cat.")
    write_task(other, "conversation", "Talk about the photo.", {"000": example})
    with FakeOpenAI(reply=reply) as server:
        assert gd.main(cli(server, cap, inst, out, "--tasks", "conversation", "--images", "1")) == 0
        built_in = gd.load_prompts()["conversation"]["fingerprint"]
        assert {r["prompts"] for r in fileio.read_jsonl(str(out))} == {built_in}
        flags = ("--tasks", "conversation", "--prompts", str(other))
        with pytest.raises(SystemExit, match=r"out.jsonl: holds records made with other prompts than .*other"):
            gd.main(cli(server, cap, inst, out, *flags))
        n = len(server.requests)
        assert gd.main(cli(server, cap, inst, tmp_path / "paper.jsonl", *flags)) == 0  # a new --out is fine
        assert server.requests[n]["body"]["messages"][:3] == [
            {"role": "system", "content": "Talk about the photo."}, {"role": "user", "content": example[0]},
            {"role": "assistant", "content": example[1]}]


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
        assert gd.main(cli(server, cap, inst, out, "--parse-retries", "2", "--export", str(exported))) == 1
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
    assert printed.count("--- system ---") == 3 and f"img{first} caption 0" in printed and "cat: [0.1, " in printed
    assert not out.exists()
    with pytest.raises(SystemExit, match="OPENAI_API_KEY"):
        gd.main(args)


# --------------------------------------------------------------------------------------------------------------------
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


@pytest.mark.slow
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


# --------------------------------------------------------------------------------------------------------------------
# faults: the key, waits, Ctrl-C, replies of the wrong shape, a run where everything fails


def run_in_thread(seconds, fn):
    """fn() in a daemon thread; fails the test if it has not finished after `seconds` (an unfixed run would sleep
    for hours: the thread is left behind rather than waited for)."""
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(value=fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return outcome.get("value")


def test_a_key_pasted_with_a_newline_works_and_is_never_shown(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY + "\r\n")
    cap, inst = make_coco(tmp_path, 1)
    out = tmp_path / "out.jsonl"
    with FakeOpenAI(reply=reply) as server:
        assert gd.main(cli(server, cap, inst, out)) == 0
        assert {r["headers"]["Authorization"] for r in server.requests} == {f"Bearer {KEY}"}
    assert len(pairs_in(out)) == 3
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err


def test_a_key_that_cannot_be_a_header_stops_before_any_request_without_showing_it(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY[:8] + "\u2019" + KEY[8:])  # a curly quote from a copy-paste
    cap, inst = make_coco(tmp_path, 1)
    with FakeOpenAI(reply=reply) as server:
        with pytest.raises(SystemExit, match="OPENAI_API_KEY.*character 9") as e:
            gd.main(cli(server, cap, inst, tmp_path / "out.jsonl"))
        assert KEY[:8] not in str(e.value) and not server.requests


@pytest.mark.parametrize("flags, cap", [([], "max_wait 120"), (["--max-wait", "30"], "max_wait 30")])
def test_retry_after_beyond_max_wait_fails_the_pair_and_the_run_goes_on(tmp_path, monkeypatch, flags, cap):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    captions, instances = make_coco(tmp_path, 2)
    out = tmp_path / "out.jsonl"
    with FakeOpenAI(reply=reply) as server:
        server.on("img2", "429:100000", times=None)  # 28 hours
        code = run_in_thread(20, lambda: gd.main(cli(server, captions, instances, out, *flags)))
    assert code == 1 and sorted(pairs_in(out)) == [(1, t) for t in sorted(gd.TASKS)]
    reasons = [r["reason"] for r in fileio.read_jsonl(str(tmp_path / "out.failed.jsonl"))]
    assert len(reasons) == 3 and all("Retry-After" in r and cap in r for r in reasons)


def test_replies_of_the_wrong_shape_fail_their_pair_only(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    cap, inst = make_coco(tmp_path, 2)
    out = tmp_path / "out.jsonl"
    with FakeOpenAI(reply=reply) as server:
        server.on(lambda m: "img2" in m[-1]["content"] and task_of(m) == "conversation", 'field:content=["a"]',
                  times=None)
        server.on(lambda m: "img2" in m[-1]["content"] and task_of(m) == "detail", 'field:usage="12"', times=None)
        server.on(lambda m: "img1" in m[-1]["content"] and task_of(m) == "complex", 'field:usage={"prompt_tokens": '
                  '"many"}', times=1)  # once: the retry succeeds
        assert gd.main(cli(server, cap, inst, out, "--max-retries", "1")) == 1
    assert sorted(pairs_in(out)) == sorted(all_pairs(2) - {(2, "conversation"), (2, "detail")})
    failures = {(r["image_id"], r["task"]): r["reason"] for r in fileio.read_jsonl(str(tmp_path / "out.failed.jsonl"))}
    assert failures.keys() == {(2, "conversation"), (2, "detail")}
    assert all("malformed response" in reason for reason in failures.values())


def test_an_error_in_one_pair_never_ends_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    cap, inst = make_coco(tmp_path, 3)
    out = tmp_path / "out.jsonl"
    parse = gd.parse_reply

    def buggy(task, text, instruction):
        if "img2" in text:
            raise AttributeError("'list' object has no attribute 'strip'")
        return parse(task, text, instruction)
    monkeypatch.setattr(gd, "parse_reply", buggy)
    with FakeOpenAI(reply=reply) as server:
        assert gd.main(cli(server, cap, inst, out)) == 1
        assert len(server.requests) == 9  # nothing asked twice
    assert sorted(pairs_in(out)) == sorted((i, t) for i in (1, 3) for t in gd.TASKS)
    reasons = [r["reason"] for r in fileio.read_jsonl(str(tmp_path / "out.failed.jsonl"))]
    assert len(reasons) == 3 and all(r.startswith("unexpected error: AttributeError") for r in reasons)


def test_a_run_where_every_pair_failed_exits_non_zero(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    cap, inst = make_coco(tmp_path, 2)
    with FakeOpenAI(reply=reply, default="404") as server:  # e.g. a wrong --base-url path or --model
        assert gd.main(cli(server, cap, inst, tmp_path / "out.jsonl")) == 1
    assert "error: 6 of 6 pairs of this run failed" in capsys.readouterr().err


def test_a_run_where_some_pairs_failed_exits_non_zero(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    cap, inst = make_coco(tmp_path, 2)
    out = tmp_path / "out.jsonl"
    with FakeOpenAI(reply=reply) as server:
        server.on(lambda m: "img2" in m[-1]["content"] and task_of(m) == "detail", "404", times=None)
        assert gd.main(cli(server, cap, inst, out)) == 1
        assert len(pairs_in(out)) == 5
        assert gd.main(cli(server, cap, inst, out)) == 0  # a rerun asks nothing: this run failed nothing
    err = capsys.readouterr().err
    assert "error: 1 of 6 pairs of this run failed" in err and "out.failed.jsonl" in err and "--retry-failed" in err


def test_a_slow_trickling_reply_times_out(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    cap, inst = make_coco(tmp_path, 1)
    out = tmp_path / "out.jsonl"
    with FakeOpenAI(reply=reply) as server:
        server.on(lambda m: task_of(m) == "detail", "trickle:0.3", times=None)  # 1 byte per 0.3 s: minutes
        args = cli(server, cap, inst, out, "--max-retries", "0")
        assert run_in_thread(20, lambda: gd.main(args)) == 1  # --timeout 1
    [failure] = fileio.read_jsonl(str(tmp_path / "out.failed.jsonl"))
    assert failure["task"] == "detail" and "timeout" in failure["reason"]


@pytest.mark.slow
def test_ctrl_c_exits_at_once_with_every_reply_on_disk(tmp_path):
    cap, inst = make_coco(tmp_path, 2)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    with FakeOpenAI(reply=reply) as server:
        # img1's three pairs come back; of img2's, one hangs in a slow reply and two wait out Retry-After: 100 s
        server.on(lambda m: "img2" in m[-1]["content"] and task_of(m) == "conversation", "slow:60", times=None)
        server.on("img2", "429:100", times=None)
        args = [sys.executable, os.path.join(ROOT, "generate_data.py"), *cli(server, cap, inst, out)]
        args[args.index("--timeout") + 1] = "90"
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
                len(pairs_in(out)) == 3 and sum("img2" in str(r["body"]) for r in server.requests) == 3):
            time.sleep(0.05)
        time.sleep(0.2)  # the two 429s are now in their 100 s wait
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        try:
            stdout, stderr = proc.communicate(timeout=5)
        finally:
            proc.kill()
        seconds = time.monotonic() - start
    assert proc.returncode == 130 and seconds < 1.5, (proc.returncode, seconds, stderr)
    assert "interrupted" in stderr and "Traceback" not in stderr and KEY not in stdout + stderr
    assert sorted(pairs_in(out)) == [(1, t) for t in sorted(gd.TASKS)]
    assert not (tmp_path / "out.failed.jsonl").exists()  # the interrupted pairs are not failures: a rerun does them


def test_inputs_that_are_not_utf8_are_named(tmp_path):
    cap, inst = make_coco(tmp_path, 1)
    prompts = tmp_path / "prompts"
    shutil.copytree(gd.PROMPTS, prompts)
    (prompts / "detail_description" / "system_message.txt").write_bytes("Décris l'image.".encode("latin-1"))
    args = ["--captions", cap, "--instances", inst, "--out", str(tmp_path / "o.jsonl"), "--dry-run"]
    with pytest.raises(SystemExit, match=r"error: .*detail_description/system_message.txt: not UTF-8"):
        gd.main(args + ["--prompts", str(prompts)])
    with open(cap, "rb") as f:
        captions = f.read()
    with open(cap, "wb") as f:
        f.write(captions.replace(b"caption 0 of", "légende 0 de".encode("latin-1")))
    with pytest.raises(SystemExit, match=r"error: .*captions.json: not UTF-8"):
        gd.main(args)
