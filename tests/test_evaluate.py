import json
import os

import pytest
import torch

import demo
import evaluate
import fileio
import inference
from api import APIError, ChatClient
from tests.fake_openai import FakeOpenAI

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# judge mode

QUESTIONS = [  # (question_id, image, category, text)
    (1, "a.jpg", "conv", "Q1 what colour is the bus?"),
    (2, "a.jpg", "conv", "Q2 how many people?"),
    (3, "b.jpg", "detail", "Q3 describe the image."),
    (4, "b.jpg", "complex", "Q4 why is this unusual?"),
]
# judge replies per question; Q3 answers garbage once before a good reply, Q4 never gives two scores
JUDGE_REPLIES = {"Q1": ["8 6\nAssistant 1 is more precise."], "Q2": ["9, 3\nAssistant 2 miscounts."],
                 "Q3": ["I think both are fine.", "Assistant 1: 10, Assistant 2: 7\nReasons..."],
                 "Q4": ["Scores: 11 and 5 out of 10", "Assistant 1 wins", "8\n7"]}


def bench_files(tmp_path):
    from PIL import Image
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (50, 30), (200, 10, 10)).save(tmp_path / name)
    q = write_jsonl(tmp_path / "questions.jsonl", [{"question_id": i, "image": im, "category": c, "text": t}
                                                 for i, im, c, t in QUESTIONS])
    ctx = write_jsonl(tmp_path / "context.jsonl", [
        {"id": "a", "image": "a.jpg", "caption": "A red bus with two people."},
        {"id": "b", "image": "b.jpg", "captions": ["A man irons.", "A taxi."],
         "instances": [{"category": "person", "bbox": [0.1, 0.2, 0.5, 0.9]}]}])
    refs = write_jsonl(tmp_path / "answers_gpt4.jsonl", [{"question_id": i, "text": f"reference {i}"}
                                                        for i, *_ in QUESTIONS])
    return q, ctx, refs


def judge_server():
    calls = {}

    def reply(messages):
        if messages[0]["content"] != evaluate.JUDGE_SYSTEM:  # a reference-answer request
            return "ref:" + messages[-1]["content"].splitlines()[-1]
        question = messages[-1]["content"].split("[Question]\n")[1].split()[0]
        n = calls[question] = calls.get(question, 0) + 1
        replies = JUDGE_REPLIES[question]
        return replies[min(n - 1, len(replies) - 1)]
    return FakeOpenAI(reply=reply), calls


def test_parse_scores():
    assert evaluate.parse_scores("8 6\nexplanation 3 4") == [8.0, 6.0]
    assert evaluate.parse_scores("\n  7.5, 9\n") == [7.5, 9.0]
    assert evaluate.parse_scores("**8/10 7/10**") == [8.0, 7.0]
    assert evaluate.parse_scores("Assistant 1: 10, Assistant 2: 2") == [10.0, 2.0]
    for bad in ("", "8\n7", "8 7 6", "11 5", "0 5", "Both are good."):
        assert evaluate.parse_scores(bad) is None, bad


@pytest.mark.parametrize("reply", ["-5 8", "8 -5", "-8 -7", "8 +11", "Assistant 1: -3 Assistant 2: 9"])
def test_negative_and_out_of_range_scores_are_unparseable(reply):
    assert evaluate.parse_scores(reply) is None


def test_context_and_prompt(tmp_path):
    items = evaluate.judge_items(*bench_files(tmp_path)[:2], image_folder=str(tmp_path))
    assert items[2]["context"] == "A man irons.\nA taxi.\n\nperson: [0.1, 0.2, 0.5, 0.9]"
    assert items[0]["image_path"] == os.path.join(str(tmp_path), "a.jpg")
    prompt = evaluate.judge_prompt("CTX", "QQ", "REF", "MODEL")
    # the reference is Assistant 1, the model Assistant 2 (so "tuple" is [reference, model] like LLaVA's reviews)
    assert prompt.index("CTX") < prompt.index("QQ") < prompt.index("[Assistant 1]\nREF") < prompt.index(
        "[Assistant 2]\nMODEL") < prompt.index(evaluate.JUDGE_RULE)


SOURCE = {"answers": {"model": "/runs/a"}, "references": "answers_gpt4.jsonl"}


def test_judge_scores_retries_and_relative_score(tmp_path):
    q, ctx, refs = bench_files(tmp_path)
    items = evaluate.judge_items(q, ctx, str(tmp_path))
    predictions = {item["question_id"]: "model says " + item["text"][:2] for item in items}
    references = evaluate.reference_answers(items, refs)
    out = str(tmp_path / "reviews.jsonl")
    server, calls = judge_server()
    with server:
        client = ChatClient(server.url, "sk-test", "judge", max_retries=0)
        reviews = evaluate.review_all(items, references, predictions, client, out, SOURCE, retries=2)
        assert calls == {"Q1": 1, "Q2": 1, "Q3": 2, "Q4": 3}  # Q3 retried once, Q4 twice then given up
        judge_body = server.requests[0]["body"]
        assert "[Assistant 1]\nreference 1" in judge_body["messages"][1]["content"]
        assert "[Assistant 2]\nmodel says Q1" in judge_body["messages"][1]["content"]
        by_id = {r["question_id"]: r for r in reviews}
        assert by_id[3]["tuple"] == [10.0, 7.0] and by_id[3]["attempts"] == 2
        assert by_id[4]["tuple"] is None and by_id[4]["failed"] and by_id[4]["content"] == "8\n7"
        summary = evaluate.summarize_reviews(reviews)
        # hand-computed: reference (8 + 9 + 10) / 3 = 9, model (6 + 3 + 7) / 3 = 16/3, relative 16/27 = 59.26 %
        assert summary["all"]["n"] == 3 and summary["all"]["failed"] == 1
        assert summary["all"]["reference"] == pytest.approx(9.0)
        assert summary["all"]["model"] == pytest.approx(16 / 3)
        assert summary["all"]["relative"] == pytest.approx(100 * 16 / 27)
        assert summary["conv"]["relative"] == pytest.approx(100 * 4.5 / 8.5)
        assert summary["detail"]["relative"] == pytest.approx(70.0)
        assert summary["complex"] == {"n": 0, "failed": 1}

        # resume: finished reviews are not asked again; the failed one is retried (and replaces the failed record)
        JUDGE_REPLIES_Q4 = JUDGE_REPLIES["Q4"]
        JUDGE_REPLIES["Q4"] = ["5 5"]
        try:
            reviews = evaluate.review_all(items, references, predictions, client, out, SOURCE, retries=2)
        finally:
            JUDGE_REPLIES["Q4"] = JUDGE_REPLIES_Q4
        assert calls == {"Q1": 1, "Q2": 1, "Q3": 2, "Q4": 4}
        summary = evaluate.summarize_reviews(reviews)
        assert summary["all"]["n"] == 4 and summary["all"]["failed"] == 0
        assert summary["all"]["relative"] == pytest.approx(100 * 21 / 32)


RULES = {  # a small file in the format of LLaVA's llava/eval/table/rule.json
    "llava_bench_conv": {"role": "Assistant", "prompt": "Rate the conversation.\nTwo scores first."},
    "llava_bench_detail": {"role": "Assistant", "prompt": "Rate the description."},
    "llava_bench_complex": {"role": "Assistant", "prompt": "Rate the reasoning."},
    "conv": {"role": "Assistant", "prompt": "not this one: the bench's keys are prefixed"}}


def write_rules(tmp_path, rules=RULES):
    (tmp_path / "rule.json").write_text(json.dumps(rules))
    return str(tmp_path / "rule.json")


def test_rules_requests_are_wrapped_as_eval_gpt_review_bench_wraps_them(tmp_path):
    q, ctx, refs = bench_files(tmp_path)
    items = evaluate.judge_items(q, ctx, str(tmp_path))
    rules = evaluate.load_rules(write_rules(tmp_path), items)
    predictions = {item["question_id"]: "model says " + item["text"][:2] for item in items}
    server, _ = judge_server()
    with server:
        client = ChatClient(server.url, "sk-test", "gpt-4-0314", max_retries=0)
        evaluate.review_all(items[:3], evaluate.reference_answers(items, refs), predictions, client,
                            str(tmp_path / "reviews.jsonl"), SOURCE, retries=0, rules=rules)
    system = {"role": "system", "content": "You are a helpful and precise assistant for checking the quality of the "
                                           "answer."}
    # written out from eval_gpt_review_bench.py: a caption string as it is, a caption list one per line, no boxes
    assert server.requests[0]["body"]["messages"] == [system, {"role": "user", "content": (
        "[Context]\nA red bus with two people.\n\n[Question]\nQ1 what colour is the bus?\n\n"
        "[Assistant 1]\nreference 1\n\n[End of Assistant 1]\n\n[Assistant 2]\nmodel says Q1\n\n"
        "[End of Assistant 2]\n\n[System]\nRate the conversation.\nTwo scores first.\n\n")}]
    assert server.requests[2]["body"]["messages"] == [system, {"role": "user", "content": (
        "[Context]\nA man irons.\nA taxi.\n\n[Question]\nQ3 describe the image.\n\n"
        "[Assistant 1]\nreference 3\n\n[End of Assistant 1]\n\n[Assistant 2]\nmodel says Q3\n\n"
        "[End of Assistant 2]\n\n[System]\nRate the description.\n\n")}]
    body = server.requests[0]["body"]
    assert (body["model"], body["temperature"]) == ("gpt-4-0314", 0.7)  # the client's (main() asks at 0.2)


def test_the_role_of_a_rule_names_the_answers():
    rule = {"role": "Reviewer", "prompt": "P."}
    assert evaluate.judge_prompt("C", "Q", "R", "M", rule) == (
        "[Context]\nC\n\n[Question]\nQ\n\n[Reviewer 1]\nR\n\n[End of Reviewer 1]\n\n[Reviewer 2]\nM\n\n"
        "[End of Reviewer 2]\n\n[System]\nP.\n\n")


def test_a_rule_file_without_a_category_s_key_is_named(tmp_path):
    q, ctx, _ = bench_files(tmp_path)
    items = evaluate.judge_items(q, ctx, str(tmp_path))
    path = write_rules(tmp_path, {k: v for k, v in RULES.items() if k != "llava_bench_complex"})
    with pytest.raises(ValueError, match=r"rule.json: no rule 'llava_bench_complex' \(for question_id 4, category "
                                         r"'complex'\); the file has 'llava_bench_conv', 'llava_bench_detail', 'conv'"):
        evaluate.load_rules(path, items)
    with pytest.raises(ValueError, match=r"rule.json: rule 'llava_bench_conv' has no string 'prompt'"):
        evaluate.load_rules(write_rules(tmp_path, {**RULES, "llava_bench_conv": {"role": "Assistant"}}), items)


def test_generated_references_resume(tmp_path):
    q, ctx, _ = bench_files(tmp_path)
    items = evaluate.judge_items(q, ctx, str(tmp_path))
    out = str(tmp_path / "references.jsonl")
    server, _ = judge_server()
    with server:
        client = ChatClient(server.url, "sk-test", "gpt-text", max_retries=0)
        refs = evaluate.reference_answers(items[:2], None, client, out)
        assert refs == {1: "ref:Q1 what colour is the bus?", 2: "ref:Q2 how many people?"}
        user = server.requests[0]["body"]["messages"][1]["content"]
        assert user.startswith("A red bus with two people.") and user.endswith("Q1 what colour is the bus?")
        refs = evaluate.reference_answers(items, None, client, out)
        assert len(server.requests) == 4 and sorted(refs) == [1, 2, 3, 4]  # only the two new ones were asked
        assert server.requests[2]["body"]["messages"][1]["content"].startswith("A man irons.\nA taxi.")


def test_generated_references_are_llava_answer_records(tmp_path):
    q, ctx, _ = bench_files(tmp_path)
    items = evaluate.judge_items(q, ctx, str(tmp_path))
    out = tmp_path / "references.jsonl"
    with judge_server()[0] as server:
        evaluate.reference_answers(items[:1], None, ChatClient(server.url, "sk-test", "gpt-text", max_retries=0),
                                   str(out))
    assert out.read_text() == json.dumps({"question_id": 1, "prompt": "Q1 what colour is the bus?",
                                          "text": "ref:Q1 what colour is the bus?", "model_id": "gpt-text"}) + "\n"


def test_missing_reference_is_named(tmp_path):
    q, ctx, refs = bench_files(tmp_path)
    items = evaluate.judge_items(q, ctx, str(tmp_path))
    write_jsonl(refs, [{"question_id": 1, "text": "x"}])
    with pytest.raises(ValueError, match="answers_gpt4.jsonl.*question_id 2"):
        evaluate.reference_answers(items, refs)


def test_reviews_of_other_answers_are_not_reused(tmp_path):
    q, ctx, refs = bench_files(tmp_path)
    items = evaluate.judge_items(q, ctx, str(tmp_path))
    references, out = evaluate.reference_answers(items, refs), str(tmp_path / "reviews.jsonl")
    server, calls = judge_server()
    with server:
        client = ChatClient(server.url, "sk-test", "judge", max_retries=0)
        evaluate.review_all(items[:2], references, {1: "a", 2: "b"}, client, out, SOURCE)
        other = {**SOURCE, "answers": {"model": "/runs/b"}}  # e.g. answers.jsonl deleted, another model's in it
        with pytest.raises(ValueError, match="answers.model '/runs/a' there, '/runs/b' now"):
            evaluate.review_all(items[:2], references, {1: "c", 2: "d"}, client, out, other)
        assert calls == {"Q1": 1, "Q2": 1}


def test_failed_reference_requests_are_counted_and_the_others_kept(tmp_path, capsys):
    q, ctx, _ = bench_files(tmp_path)
    items = evaluate.judge_items(q, ctx, str(tmp_path))
    out = str(tmp_path / "references.jsonl")
    server, _ = judge_server()
    with server:
        server.on("Q1", "500", times=None)
        client = ChatClient(server.url, "sk-test", "gpt-text", max_retries=0)
        with pytest.raises(APIError, match="references.jsonl: 1 of 2 reference answers failed"):
            evaluate.reference_answers(items[:2], None, client, out)
    assert [r["question_id"] for r in fileio.read_jsonl(out)] == [2]  # kept; 1 is asked again on the next run
    assert "HTTP 500" in capsys.readouterr().err


def mc_record(n, **fields):
    return {"id": f"p{n}", "question": f"Q{n}", "choices": ["a", "b"], "answer": 0, **fields}


def test_mc_repeated_ids_are_refused_naming_them(tmp_path):
    path = write_jsonl(tmp_path / "sqa.jsonl", [mc_record(1), mc_record(2), {**mc_record(3), "id": "p1"}])
    with pytest.raises(ValueError, match="sqa.jsonl: question ids repeated: 'p1'"):
        evaluate.mc_items(path, ".")


def test_judge_repeated_ids_are_refused_naming_them(tmp_path):
    q, ctx, _ = bench_files(tmp_path)
    write_jsonl(q, [{"question_id": 7, "image": "a.jpg", "text": "Q?"}, {"question_id": 7, "image": "b.jpg",
                                                                       "text": "Other?"}])
    with pytest.raises(ValueError, match="questions.jsonl: question ids repeated: 7"):
        evaluate.judge_items(q, ctx, str(tmp_path))


@pytest.mark.parametrize("bad", [["p2"], {"id": 2}, None, 2.5, True])
def test_an_id_that_is_not_a_string_or_integer_is_refused_naming_the_row(tmp_path, bad):
    path = write_jsonl(tmp_path / "sqa.jsonl", [mc_record(1), {**mc_record(2), "id": bad}])
    with pytest.raises(ValueError, match="sqa.jsonl, item 1: 'id' .* is not a string or an integer"):
        evaluate.mc_items(path, ".")
    q, ctx, _ = bench_files(tmp_path)
    write_jsonl(q, [{"question_id": bad, "image": "a.jpg", "text": "Q?"}])
    with pytest.raises(ValueError, match="questions.jsonl, line 1: 'question_id' .* is not a string or an integer"):
        evaluate.judge_items(q, ctx, str(tmp_path))


def test_more_than_ten_choices_are_refused_naming_the_row(tmp_path):
    path = write_jsonl(tmp_path / "sqa.jsonl", [mc_record(1), mc_record(2, choices=list("abcdefghijk"))])
    with pytest.raises(ValueError, match="sqa.jsonl, item 1: 'choices' must be a list of 1 to 10 options"):
        evaluate.mc_items(path, ".")


def test_a_missing_image_is_found_before_the_model_loads(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "sqa.jsonl", [mc_record(1), mc_record(2, image="gone.png")])
    monkeypatch.setattr(evaluate, "load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match=r"^error: .*sqa.jsonl, item 1: image .*gone.png not found$"):
        evaluate.main(["mc", "--model", str(tmp_path), "--questions", path, "--images", str(tmp_path)])


def test_a_missing_judge_image_is_named(tmp_path):
    q, ctx, _ = bench_files(tmp_path)
    os.unlink(tmp_path / "b.jpg")
    with pytest.raises(FileNotFoundError, match=r"questions.jsonl, line 3: image .*b.jpg not found"):
        evaluate.judge_items(q, ctx, str(tmp_path))


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--batch-size", "-4"), ("--max-new-tokens", "0"),
                                         ("--judge-max-tokens", "-1"), ("--retries", "-1"), ("--max-wait", "nan"),
                                         ("--max-wait", "-5"), ("--batch-size", "many")])
def test_numbers_out_of_range_are_refused_by_the_parser(tmp_path, capsys, monkeypatch, flag, value):
    q, ctx, refs = bench_files(tmp_path)
    monkeypatch.setattr(evaluate, "load_model", lambda *a: pytest.fail("the model was loaded"))
    monkeypatch.setenv("EVAL_TEST_KEY", "sk-test")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["judge", "--model", str(tmp_path), "--questions", q, "--context", ctx, "--references", refs,
                       "--images", str(tmp_path), "--api-key-env", "EVAL_TEST_KEY", "--out", str(tmp_path / "o"),
                       flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: " in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------------------
# multiple choice


def test_mc_prompt_and_parse():
    item = {"question": "Which colour?", "choices": ["red", "green", "blue"], "context": "A flag."}
    assert evaluate.mc_prompt(item) == ("Context: A flag.\nWhich colour?\nA. red\nB. green\nC. blue\n"
                                        "Answer with the option's letter from the given choices directly.")
    assert evaluate.mc_prompt({"question": "Q?", "choices": ["x", "y"]}).startswith("Q?\nA. x\nB. y\n")
    choices = ["red", "green", "blue"]
    for reply, index in [("B", 1), ("C.", 2), ("(A) red", 0), ("B) green", 1), ("The answer is C.", 2),
                         ("Answer: A", 0), ("blue", 2), ("Green.", 1), (" c ", 2),
                         ("D", None), ("A cat.", None), ("I am not sure", None), ("", None)]:
        assert evaluate.parse_choice(reply, choices) == index, reply


@pytest.mark.parametrize("reply, index", [("Answer: A dog", None), ("The answer is A cat", None), ("A dog", None),
                                          ("Answer: B dog", None), ("Answer: B", 1), ("Answer: (B) dog", 1),
                                          ("The answer is A.", 0), ("answer: b", None), ("Answer: dog", None)])
def test_a_letter_counts_only_when_it_stands_as_a_letter(reply, index):
    assert evaluate.parse_choice(reply, ["cat", "dog"]) == index


def test_mc_accuracy_is_exact(tmp_path):
    records = [{"id": "p1", "question": "Q1", "choices": ["a", "b"], "answer": 0, "subject": "physics"},
               {"id": "p2", "question": "Q2", "choices": ["a", "b", "c"], "answer": "C", "subject": "physics",
                "image": "p2.png"},
               {"id": "p3", "question": "Q3", "choices": ["a", "b"], "answer": 1, "subject": "biology"},
               {"id": "p4", "question": "Q4", "choices": ["a", "b", "c", "d"], "answer": "b", "subject": "biology"},
               {"id": "p5", "question": "Q5", "choices": ["a", "b"], "answer": 0, "category": "language"}]
    path = write_jsonl(tmp_path / "sqa.jsonl", records)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "p2.png").write_bytes(b"")
    items = evaluate.mc_items(path, str(tmp_path / "imgs"))
    assert [it["gold"] for it in items] == [0, 2, 1, 1, 0]
    assert items[1]["image_path"] == str(tmp_path / "imgs" / "p2.png") and items[0]["image_path"] is None
    # p1 right, p2 wrong, p3 unparseable, p4 right (by letter in a sentence), p5 unparseable (letter out of range)
    predictions = {"p1": "A", "p2": "B.", "p3": "maybe", "p4": "The answer is B.", "p5": "E"}
    stats = evaluate.score_mc(items, predictions)
    assert stats["all"] == {"correct": 2, "total": 5, "unparsed": 2, "accuracy": 40.0}
    assert stats["physics"] == {"correct": 1, "total": 2, "unparsed": 0, "accuracy": 50.0}
    assert stats["biology"] == {"correct": 1, "total": 2, "unparsed": 1, "accuracy": 50.0}
    assert stats["language"] == {"correct": 0, "total": 1, "unparsed": 1, "accuracy": 0.0}


def test_mc_bad_answer_is_named(tmp_path):
    path = write_jsonl(tmp_path / "sqa.jsonl", [{"id": "p1", "question": "Q", "choices": ["a", "b"], "answer": "C"}])
    with pytest.raises(ValueError, match=r"sqa.jsonl, item 0: answer 'C'"):
        evaluate.mc_items(path, ".")
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match="sqa.jsonl, line 2"):
        fileio.read_records(path)


@pytest.mark.parametrize("image", ["../../etc/passwd", "/etc/passwd", "a/../../b.png"])
def test_mc_image_paths_stay_inside_the_image_folder(tmp_path, image):
    path = write_jsonl(tmp_path / "sqa.jsonl", [{"id": "p1", "question": "Q", "choices": ["a", "b"], "answer": 0},
                                                {"id": "p2", "question": "Q", "choices": ["a", "b"], "answer": 0,
                                                 "image": image}])
    with pytest.raises(ValueError, match=r"sqa.jsonl, item 1: path .* leaves the folder"):
        evaluate.mc_items(path, str(tmp_path / "images"))


def test_judge_image_paths_stay_inside_the_image_folder(tmp_path):
    q, ctx, _ = bench_files(tmp_path)
    write_jsonl(q, [{"question_id": 1, "image": "../secret.jpg", "text": "Q?"}])
    write_jsonl(ctx, [{"image": "../secret.jpg", "caption": "c"}])
    with pytest.raises(ValueError, match=r"questions.jsonl, line 1: path '../secret.jpg' leaves the folder"):
        evaluate.judge_items(q, ctx, str(tmp_path / "images"))


def test_inputs_that_are_not_utf8_are_named(tmp_path):
    path = tmp_path / "sqa.jsonl"
    path.write_bytes(json.dumps({"id": "p1", "question": "Caf\u00e9?", "choices": ["a", "b"], "answer": 0},
                                ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match="sqa.jsonl: not UTF-8"):
        evaluate.mc_items(str(path), ".")


def test_a_key_that_cannot_be_a_header_is_refused_before_loading_the_model(tmp_path, monkeypatch):
    q, ctx, refs = bench_files(tmp_path)
    key = "sk-test-SECRET-9f8e7d"
    monkeypatch.setenv("EVAL_TEST_KEY", key[:8] + "\u2019" + key[8:])
    monkeypatch.setattr(evaluate, "load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match="EVAL_TEST_KEY") as e:
        evaluate.main(["judge", "--model", str(tmp_path), "--questions", q, "--context", ctx, "--references", refs,
                       "--images", str(tmp_path), "--out", str(tmp_path / "out"), "--api-key-env", "EVAL_TEST_KEY"])
    assert key[:8] not in str(e.value)


def test_an_unknown_dtype_is_an_argparse_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["demo", "--model", str(tmp_path), "--dtype", "fp16"])
    assert e.value.code == 2 and "argument --dtype: invalid choice: 'fp16'" in capsys.readouterr().err


def test_unreadable_inputs_exit_with_the_file_named(tmp_path, capsys):
    (tmp_path / "sqa.jsonl").write_text("{not json\n")
    with pytest.raises(SystemExit, match=r"error: .*sqa.jsonl, line 1"):
        evaluate.main(["mc", "--model", str(tmp_path), "--questions", str(tmp_path / "sqa.jsonl")])


@pytest.mark.parametrize("image", ["../secret.png", "/etc/passwd"])
def test_demo_image_paths_stay_inside_the_data_folder(tmp_path, image):
    (tmp_path / "eval.json").write_text(json.dumps([
        {"id": 0, "image": "eval_00000.png", "question": "Q?", "answer": "red"},
        {"id": 1, "image": image, "question": "Q?", "answer": "red"}]))
    with pytest.raises(ValueError, match=r"eval.json, item 1: path .* leaves the folder"):
        demo.demo_items(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# the model: demo accuracy and the answering path


def make_demo_dir(root, answers):
    from PIL import Image
    os.makedirs(root / "images", exist_ok=True)
    items = []
    for i, (category, answer) in enumerate(answers):
        Image.new("RGB", (40 + 8 * i, 32), (30 * i, 200, 90)).save(root / "images" / f"{i}.png")
        items.append({"id": f"e{i}", "image": f"{i}.png", "question": f"question {i}?", "answer": answer,
                      "category": category})
    (root / "eval.json").write_text(json.dumps(items))
    return str(root)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import shutil
    from clip import CLIPVisionConfig
    from llama import LlamaConfig
    from llava import LLaVA, LLaVAConfig
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llava")
    config = LLaVAConfig(llm=LlamaConfig.from_name("tiny"), vision=CLIPVisionConfig.from_name("tiny"))
    LLaVA(config).save_pretrained(str(path))
    shutil.copy(os.path.join(FIXTURES, "tokenizer.model"), path / "tokenizer.model")
    return str(path)


def test_demo_accuracy_counts(tmp_path, monkeypatch):
    data_dir = make_demo_dir(tmp_path, [("colour", "red"), ("colour", "blue"), ("shape", "circle"),
                                        ("count", "3"), ("count", "2")])
    replies = {"question 0?": "red", "question 1?": "green", "question 2?": "circle", "question 3?": "3",
               "question 4?": "4"}
    seen = []

    def fake_answer(model, tokenizer, question, image_path=None, max_new_tokens=128):
        seen.append(image_path)
        return replies[question]
    monkeypatch.setattr(inference, "answer", fake_answer)
    assert demo.demo_accuracy(None, None, data_dir) == (3, 5)
    assert seen[0] == os.path.join(data_dir, "images", "0.png")
    assert demo.demo_accuracy(None, None, data_dir, limit=2) == (1, 2)
    stats = demo.score_demo(demo.demo_items(data_dir), lambda item: replies[item["text"]])
    assert {k: (s["correct"], s["total"]) for k, s in stats.items()} == {
        "all": (3, 5), "colour": (1, 2), "shape": (1, 1), "count": (1, 2)}


def test_answer_matches_full_forward_greedy(tiny_checkpoint, tmp_path):
    """answer() (KV cache, eos stripped) == greedy decoding by re-running the full forward, with the same prompt."""
    from clip import preprocess
    from images import load_image
    from data import render
    model, tokenizer = inference.load_model(tiny_checkpoint, "cpu", "float32")
    image = make_demo_dir(tmp_path, [("c", "x")]) + "/images/0.png"
    cfg = model.config
    ids, _ = render([{"from": "human", "value": "<image>\nWhat is this?"}], cfg.template, tokenizer,
                    cfg.num_image_tokens, for_generation=True)
    assert ids.count(-200) == cfg.num_image_tokens
    pixel_values = preprocess(load_image(image), cfg.image_size, pad_to_square=cfg.image_aspect_ratio == "pad")
    new = []
    with torch.no_grad():
        for _ in range(8):
            logits, _ = model(torch.tensor([ids + new]), pixel_values)  # (1, T, V)
            new.append(int(logits[0, -1].argmax()))
            if new[-1] == tokenizer.eos_id:
                new.pop()
                break
    assert inference.answer(model, tokenizer, "What is this?", image, max_new_tokens=8) == tokenizer.decode(new).strip()


def test_demo_cli_writes_summary(tiny_checkpoint, tmp_path, capsys):
    data_dir = make_demo_dir(tmp_path / "data", [("colour", "red"), ("shape", "square"), ("shape", "circle")])
    out = tmp_path / "out"
    evaluate.main(["demo", "--model", tiny_checkpoint, "--data", data_dir, "--out", str(out), "--max-new-tokens", "4"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["all"]["total"] == 3 and summary["shape"]["total"] == 2 and summary["colour"]["total"] == 1
    assert f"({summary['all']['correct']}/3" in capsys.readouterr().out


def test_judge_and_mc_cli(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from fileio import read_jsonl
    q, ctx, refs = bench_files(tmp_path)
    monkeypatch.setenv("EVAL_TEST_KEY", "sk-test")
    out = tmp_path / "bench"
    server, calls = judge_server()
    with server:
        with pytest.raises(SystemExit, match=r"error: 1 of 4 reviews failed .*reviews.jsonl"):
            evaluate.main(["judge", "--model", tiny_checkpoint, "--questions", q, "--context", ctx, "--images",
                           str(tmp_path), "--references", refs, "--out", str(out), "--base-url", server.url,
                           "--api-key-env", "EVAL_TEST_KEY", "--max-new-tokens", "4"])
        assert server.requests[0]["body"]["model"] == "gpt-4" and server.requests[0]["body"]["temperature"] == 0.2
    assert "not comparable with published ones" in capsys.readouterr().out  # the built-in rule
    summary = json.loads((out / "summary.json").read_text())  # written all the same, counting the failure
    assert summary["judged_by"] == {"api_model": "gpt-4", "temperature": 0.2, "max_tokens": 1024, "rules": "built-in"}
    assert summary["all"]["relative"] == pytest.approx(100 * 16 / 27) and summary["all"]["failed"] == 1
    assert [r["question_id"] for r in read_jsonl(str(out / "answers.jsonl"))] == [1, 2, 3, 4]

    sqa = write_jsonl(tmp_path / "sqa.jsonl", [
        {"id": "s1", "question": "Which colour?", "choices": ["red", "blue"], "answer": 0, "image": "a.jpg"},
        {"id": "s2", "question": "Which is a fruit?", "choices": ["car", "pear", "rock"], "answer": "B"}])
    args = ["mc", "--model", tiny_checkpoint, "--questions", sqa, "--images", str(tmp_path), "--out",
            str(tmp_path / "sqa"), "--max-new-tokens", "3"]
    evaluate.main(args)
    answers = read_jsonl(str(tmp_path / "sqa" / "answers.jsonl"))
    assert answers[1]["prompt"] == "Which is a fruit?\nA. car\nB. pear\nC. rock\n" + evaluate.MC_INSTRUCTION
    summary = json.loads((tmp_path / "sqa" / "summary.json").read_text())
    items = evaluate.mc_items(sqa, str(tmp_path))
    assert summary == evaluate.score_mc(items, {a["question_id"]: a["text"] for a in answers})
    assert summary["all"]["total"] == 2
    evaluate.main(args)  # resumed: nothing answered again
    assert len(read_jsonl(str(tmp_path / "sqa" / "answers.jsonl"))) == 2


def judge_cli(tiny_checkpoint, tmp_path, server, *flags):
    q, ctx, refs = bench_files(tmp_path)
    evaluate.main(["judge", "--model", tiny_checkpoint, "--questions", q, "--context", ctx, "--images", str(tmp_path),
                   "--references", refs, "--out", str(tmp_path / "bench"), "--base-url", server.url,
                   "--api-key-env", "EVAL_TEST_KEY", "--max-new-tokens", "4", *flags])


def test_judge_cli_with_rules_records_them_and_the_judge(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EVAL_TEST_KEY", "sk-test")
    with FakeOpenAI(reply=lambda messages: "8 7\nBoth fine.") as server:
        judge_cli(tiny_checkpoint, tmp_path, server, "--rules", write_rules(tmp_path), "--judge-model", "gpt-4-0314")
        assert server.requests[0]["body"]["messages"][1]["content"].endswith(
            "[System]\nRate the conversation.\nTwo scores first.\n\n")
    out = capsys.readouterr().out
    assert "judged by gpt-4-0314 with " + str(tmp_path / "rule.json") in out and "note:" not in out
    summary = json.loads((tmp_path / "bench" / "summary.json").read_text())
    used = summary["judged_by"].pop("rules")
    assert summary["judged_by"] == {"api_model": "gpt-4-0314", "temperature": 0.2, "max_tokens": 1024, "rule_texts": {
        k.removeprefix("llava_bench_"): v for k, v in RULES.items() if k.startswith("llava_bench_")}}
    assert used["file"] == str(tmp_path / "rule.json") and len(used["sha256"]) == 64
    assert json.loads((tmp_path / "bench" / "reviews.jsonl.source.json").read_text())["rules"] == used
    with FakeOpenAI() as server:  # reviews by other rules are not continued
        write_rules(tmp_path, {**RULES, "llava_bench_conv": {"role": "Assistant", "prompt": "Other."}})
        with pytest.raises(SystemExit, match=r"reviews.jsonl: .*rules.sha256 '[0-9a-f]{64}' there, '[0-9a-f]{64}' now"):
            judge_cli(tiny_checkpoint, tmp_path, server, "--rules", str(tmp_path / "rule.json"))
        with pytest.raises(SystemExit, match=r"reviews.jsonl: .*rules nothing there, 'built-in' now"):
            judge_cli(tiny_checkpoint, tmp_path, server)
        assert not server.requests


def test_judge_cli_refuses_a_rule_file_without_a_key_before_the_model_loads(tmp_path, monkeypatch):
    q, ctx, refs = bench_files(tmp_path)
    monkeypatch.setenv("EVAL_TEST_KEY", "sk-test")
    monkeypatch.setattr(evaluate, "load_model", lambda *a: pytest.fail("the model was loaded"))
    rules = write_rules(tmp_path, {"llava_bench_conv": RULES["llava_bench_conv"]})
    with pytest.raises(SystemExit, match=r"^error: .*rule.json: no rule 'llava_bench_detail'"):
        evaluate.main(["judge", "--model", str(tmp_path), "--questions", q, "--context", ctx, "--references", refs,
                       "--images", str(tmp_path), "--api-key-env", "EVAL_TEST_KEY", "--rules", rules])


def test_judge_answers_with_up_to_1024_new_tokens_by_default(tiny_checkpoint, tmp_path, monkeypatch):
    q, ctx, refs = bench_files(tmp_path)
    monkeypatch.setenv("EVAL_TEST_KEY", "sk-test")
    monkeypatch.setattr(inference, "generate_batch", lambda *a, **kw: pytest.fail("answered"))
    # the tiny model has 1024 positions: 1024 new tokens do not fit beside any prompt
    with pytest.raises(SystemExit, match=r"max_new_tokens \(1024\) need \d+ positions, more than the model's 1024"):
        evaluate.main(["judge", "--model", tiny_checkpoint, "--questions", q, "--context", ctx, "--references", refs,
                       "--images", str(tmp_path), "--api-key-env", "EVAL_TEST_KEY", "--out", str(tmp_path / "o")])


def test_demo_accuracy_on_the_demo_format(tmp_path, monkeypatch):
    from demo import make_demo_data
    paths = make_demo_data(str(tmp_path), n_train=4, n_eval=2)
    gold = {(item["question"], item["image"]): item["answer"] for item in json.load(open(paths["eval"]))}
    assert len(gold) == 8  # 4 questions per eval image
    monkeypatch.setattr(inference, "answer", lambda m, t, question, image_path, n: (
        "The " + gold[question, os.path.basename(image_path)] + "." if question.startswith("What") else "wrong"))
    expected = sum(question.startswith("What") for question, _ in gold)
    assert 0 < expected < 8
    assert demo.demo_accuracy(None, None, str(tmp_path)) == (expected, 8)


# ---------------------------------------------------------------------------------------------------------------------
# batches, processes and int8 weights: the same answers as one question at a time in one process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """(checkpoint, mc questions, image folder): a tiny LLaVA whose weights are large enough that its answers
    depend on the image and the words, and mc questions of different lengths, half with an image."""
    import shutil
    from dataclasses import replace
    from PIL import Image
    from clip import CLIPVisionConfig
    from llama import LlamaConfig
    from tokenizer import Tokenizer
    from llava import LLaVA, LLaVAConfig
    root = tmp_path_factory.mktemp("varied")
    vocab = Tokenizer(os.path.join(FIXTURES, "tokenizer.model")).vocab_size
    torch.manual_seed(1)
    model = LLaVA(LLaVAConfig(llm=replace(LlamaConfig.from_name("tiny"), vocab_size=vocab),
                              vision=CLIPVisionConfig.from_name("tiny")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("llm.", "projector.")):
                p.normal_(0.0, 0.5 if p.ndim > 1 else 1.0)
    model.save_pretrained(str(root / "model"))
    shutil.copy(os.path.join(FIXTURES, "tokenizer.model"), root / "model" / "tokenizer.model")
    records = []
    for i in range(10):
        Image.new("RGB", (30 + 5 * i, 40), (25 * i, 255 - 20 * i, 60)).save(root / f"{i}.png")
        records.append({"id": f"s{i}", "question": "Which one is it?" + " Look closely." * (i % 4),
                        "choices": ["red", "green", "blue"][:2 + i % 2], "answer": i % 2,
                        **({"image": f"{i}.png"} if i % 2 == 0 else {})})
    return str(root / "model"), write_jsonl(root / "questions.jsonl", records), str(root)


def mc_answers(varied, out, *flags):
    model, questions, images = varied
    evaluate.main(["mc", "--model", model, "--questions", questions, "--images", images, "--out", str(out),
                   "--max-new-tokens", "5", *flags])
    return fileio.read_jsonl(str(out / "answers.jsonl"))


def test_mc_answers_at_batch_8_equal_batch_1(varied, tmp_path):
    one = mc_answers(varied, tmp_path / "b1", "--batch-size", "1")
    eight = mc_answers(varied, tmp_path / "b8", "--batch-size", "8")
    assert len({a["text"] for a in one}) >= 3, "the answers hardly differ: a weak check"
    assert eight == one  # the same records in the same (question) order
    assert (tmp_path / "b8" / "summary.json").read_text() == (tmp_path / "b1" / "summary.json").read_text()


def test_demo_mode_at_batch_8_equals_batch_1(varied, tmp_path, capsys):
    model, _, _ = varied
    data = make_demo_dir(tmp_path / "data", [("colour", "red"), ("shape", "square"), ("shape", "circle"),
                                             ("count", "2")])
    for size in ("1", "8"):
        evaluate.main(["demo", "--model", model, "--data", data, "--out", str(tmp_path / size), "--batch-size", size])
    assert (tmp_path / "1" / "summary.json").read_text() == (tmp_path / "8" / "summary.json").read_text()


def test_mc_into_the_same_out_with_another_model_is_refused(varied, tiny_checkpoint, tmp_path, monkeypatch):
    from checkpoint import fingerprint
    model, questions, images = varied
    mc_answers(varied, tmp_path / "mc")
    monkeypatch.setattr(inference, "generate_batch", lambda *a, **kw: pytest.fail("answered"))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["mc", "--model", tiny_checkpoint, "--questions", questions, "--images", images, "--out",
                       str(tmp_path / "mc"), "--max-new-tokens", "5"])
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert f"fingerprint {fingerprint(model)!r} there, {fingerprint(tiny_checkpoint)!r} now" in message
    assert f"model {os.path.abspath(model)!r} there" in message and "another --out" in message


def test_a_prompt_longer_than_the_context_exits_naming_the_question(varied, tmp_path, monkeypatch):
    model, questions, images = varied
    monkeypatch.setattr(inference, "generate_batch", lambda *a, **kw: pytest.fail("answered"))
    with pytest.raises(SystemExit, match=r"^error: question_id 's\d': its prompt \(\d+ tokens\) and max_new_tokens "
                                         r"\(1000\) need \d+ positions, more than the model's 1024"):
        evaluate.main(["mc", "--model", model, "--questions", questions, "--images", images, "--out",
                       str(tmp_path / "mc"), "--max-new-tokens", "1000"])


def test_int8_weights_answer_through_evaluate(varied, tmp_path):
    model, _, _ = varied
    answers = mc_answers(varied, tmp_path / "int8", "--quantize", "int8")
    quantized, tokenizer = inference.load_model(model, "cpu", "float32", quantize="int8")
    items = evaluate.mc_items(varied[1], varied[2])
    assert [a["text"] for a in answers] == [inference.answer(quantized, tokenizer, item["text"], item["image_path"], 5)
                                            for item in items]
    assert json.loads((tmp_path / "int8" / "summary.json").read_text())["all"]["total"] == 10


@pytest.mark.slow
def test_two_torchrun_processes_answer_as_one_and_resume(varied, tmp_path):
    import subprocess
    import sys
    model, questions, images = varied
    one = mc_answers(varied, tmp_path / "one", "--batch-size", "2")
    out = tmp_path / "two"
    out.mkdir()
    kept = [{**a, "text": "KEPT"} for a in one[:3]]  # an interrupted run's answers: never asked again
    (out / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in kept) + '{"question_id": "s3", "te')
    (out / "answers.jsonl.source.json").write_text((tmp_path / "one" / "answers.jsonl.source.json").read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "evaluate.py", "mc", "--model", model, "--questions", questions, "--images", images,
                          "--out", str(out), "--max-new-tokens", "5", "--batch-size", "2", "--device", "cpu"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert fileio.read_jsonl(str(out / "answers.jsonl")) == kept + one[3:]  # each question once, in order
    assert run.stdout.count("all:") == 1  # only rank 0 scores and prints
