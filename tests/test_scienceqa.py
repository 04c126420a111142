"""scienceqa.py: conversion (expected strings written out from reading LLaVA's scripts/convert_sqa_to_llava.py and
convert_sqa_to_llava_base_prompt.py), answer parsing (llava/eval/eval_science_qa.py), Table 7 columns (ScienceQA's
tools/evaluate_acc.py), GPT-4 and the ensemble against a fake server, and the offline demo pipeline."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import demo
import scienceqa
from api import ChatClient, FatalAPIError
from tests.fake_openai import FakeOpenAI

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LECTURE = ("Maps have four cardinal directions, or main directions. Those directions are north, south, east, and "
           "west.\nA compass rose is a set of arrows that point to the cardinal directions.")
SOLUTION = "To find the answer, look at the compass rose. West Virginia is farthest north."


def problem(**kw):
    base = dict(question="Which is it?", choices=["x", "y"], answer=0, hint="", image=None, lecture="",
                solution="", subject="natural science", grade="grade3", split="test")
    return {**base, **kw}


MAP = problem(question="Which of these states is farthest north?", answer=0, image="image.png", lecture=LECTURE,
              choices=["West Virginia", "Louisiana", "Arizona", "Oklahoma"], solution=SOLUTION,
              subject="social science", grade="grade2")


def write_release(root, problems, splits):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "problems.json"), "w") as f:
        json.dump(problems, f)
    with open(os.path.join(root, "pid_splits.json"), "w") as f:
        json.dump(splits, f)
    for split, pids in splits.items():
        for pid in pids:
            if problems.get(pid, {}).get("image"):
                os.makedirs(os.path.join(root, "images", split, pid), exist_ok=True)
                Image.new("RGB", (20, 20), (200, 30, 30)).save(os.path.join(root, "images", split, pid, "image.png"))
    return str(root)


def write_answers(path, texts):
    with open(path, "w") as f:
        f.writelines(json.dumps({"question_id": pid, "prompt": "p", "text": t}) + "\n" for pid, t in texts.items())
    return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# convert


def test_convert_image_problem_in_the_papers_format():
    assert scienceqa.convert({"7": MAP}) == [{"id": "7", "image": "7/image.png", "conversations": [
        {"from": "human", "value": "Which of these states is farthest north?\nContext: N/A\n"
                                   "Options: (A) West Virginia (B) Louisiana (C) Arizona (D) Oklahoma\n<image>"},
        {"from": "gpt", "value": "Maps have four cardinal directions, or main directions. Those directions are north, "
                                 "south, east, and west.\nA compass rose is a set of arrows that point to the cardinal "
                                 "directions. To find the answer, look at the compass rose. West Virginia is farthest "
                                 "north. The answer is A."}]}]


def test_convert_text_problem_with_hint_keeps_question_prefix_in_cqm():
    p = problem(question="What do the cows eat?", choices=["grass", "rocks"], hint="Read the text.\nCows eat grass. ")
    assert scienceqa.convert({"12": p}, "CQM-A") == [{"id": "12", "conversations": [
        {"from": "human", "value": "Context: Read the text.\nCows eat grass.\nQuestion: What do the cows eat?\n"
                                   "Options: (A) grass (B) rocks"},
        {"from": "gpt", "value": "The answer is A."}]}]


def test_convert_question_prefix_is_stripped_everywhere_like_the_original_replace():
    p = problem(hint="Question: who wrote it?", solution="Answer: it was Ann.")
    assert scienceqa.convert_problem(p, "QCM-EA") == (
        "Which is it?\nContext: who wrote it?\nOptions: (A) x (B) y", "it was Ann. The answer is A.")


def test_convert_five_choices_and_double_spaces_collapsed_once():
    p = problem(question="Which  number is largest?", choices=["1", "2", "3", "4", "5"], answer=4,
                hint="Look at  the table.   Then answer.")
    assert scienceqa.convert_problem(p, "QCM-A") == (
        "Which number is largest?\nContext: Look at the table.  Then answer.\n"
        "Options: (A) 1 (B) 2 (C) 3 (D) 4 (E) 5", "The answer is E.")


def test_convert_empty_lecture():
    p = problem(answer=1, solution="Sol.")
    assert scienceqa.convert_problem(p, "QCM-LEA")[1] == "Sol. The answer is B."
    # lecture and solution both empty: three spaces collapse to two, and "Answer: " goes, leaving a space (sic)
    assert scienceqa.convert_problem(problem(answer=1), "QCM-LEA")[1] == " The answer is B."


def test_convert_dangling_because_removed():
    assert scienceqa.convert_problem(problem(), "QCML-AL") == (
        "Which is it?\nContext: N/A\nOptions: (A) x (B) y", "The answer is A.")
    assert scienceqa.convert_problem(problem(solution="Sol.", lecture="Lec."), "QCME-AL") == (
        "Which is it?\nContext: N/A\nOptions: (A) x (B) y\nBECAUSE: Sol.", "The answer is A. BECAUSE: Sol.")
    assert scienceqa.convert_problem(problem(lecture="Lec."), "QCLM-AE") == (
        "Which is it?\nContext: N/A\nBECAUSE: Lec.\nOptions: (A) x (B) y", "The answer is A. BECAUSE: Lec.")


def test_convert_lepa_lines_and_newlines():
    p = problem(answer=1, lecture="Line one.\nLine two.", solution="")
    assert scienceqa.convert_problem(p, "QCM-LEPA")[1] == "LECTURE: Line one.\nLine two.\n###\nANSWER: B."
    p = problem(lecture="L.", solution="S.")
    assert scienceqa.convert_problem(p, "CQM-LEPA") == (
        "Context: N/A\nQuestion: Which is it?\nOptions: (A) x (B) y", "LECTURE: L.\nSOLUTION: S.\n###\nANSWER: A.")


def test_convert_knows_every_original_format_and_refuses_others():
    assert len(scienceqa.PROMPT_FORMATS) == 8 * 10 and "QCLEM-ELA" in scienceqa.PROMPT_FORMATS
    with pytest.raises(ValueError, match="QCM-XYZ"):
        scienceqa.convert({"1": problem()}, "QCM-XYZ")


def test_convert_cli_writes_split_in_order(tmp_path):
    root = write_release(tmp_path / "sqa", {"7": MAP, "3": problem(), "9": problem()}, {"test": ["9", "7"]})
    scienceqa.main(["convert", "--root", root, "--split", "test", "--out", str(tmp_path / "out" / "t.json")])
    records = json.loads((tmp_path / "out" / "t.json").read_text())
    assert [r["id"] for r in records] == ["9", "7"] and records[1]["image"] == "7/image.png"


# ---------------------------------------------------------------------------------------------------------------------
# the release's checks


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="problems.json"):
        scienceqa.load_scienceqa(str(tmp_path), "test")


def test_pid_without_problem_names_file_and_pid(tmp_path):
    root = write_release(tmp_path, {"1": problem()}, {"test": ["1", "404"]})
    with pytest.raises(ValueError, match=r"pid_splits.json.*'404'"):
        scienceqa.load_scienceqa(root, "test")


def test_a_pid_listed_twice_in_a_split_is_refused(tmp_path):
    root = write_release(tmp_path, {"7": MAP, "9": problem()}, {"test": ["9", "7", "9"]})
    with pytest.raises(ValueError, match=r"pid_splits.json: split 'test' lists pid '9' twice"):
        scienceqa.load_scienceqa(root, "test")


@pytest.mark.parametrize("bad, message", [(dict(answer=2), "'answer' 2"), (dict(choices=list("abcdef")), "choices"),
                                          (dict(hint=None), "'hint'"), (dict(answer=True), "'answer'")])
def test_malformed_problem_names_pid(tmp_path, bad, message):
    root = write_release(tmp_path, {"5": problem(**bad)}, {"test": ["5"]})
    with pytest.raises(ValueError, match=f"pid 5.*{message}"):
        scienceqa.load_scienceqa(root, "test")


@pytest.mark.parametrize("image", ["../../../../etc/passwd", "/etc/passwd", ""])
def test_image_path_must_stay_inside_root(tmp_path, image):
    root = write_release(tmp_path, {"5": problem(image=image)}, {"test": ["5"]})
    with pytest.raises(ValueError, match="pid 5.*'image'"):
        scienceqa.load_scienceqa(root, "test")


# ---------------------------------------------------------------------------------------------------------------------
# score


@pytest.mark.parametrize("text, n, index", [
    ("B", 2, 1), ("C. Because it is.", 3, 2), ("Lecture.\nSolution. The answer is D.", 4, 3),
    ("The answer is A!", 2, 0), ("...\n The answer is E. ", 5, 4)])
def test_parse_accepts(text, n, index):
    assert scienceqa.parse_answer(text, n) == index


@pytest.mark.parametrize("text, n", [
    ("b", 2), (" B", 2), ("B.", 2), ("(B) y", 2), ("The answer is B", 2), ("The answer is (B).", 2),
    ("The answer is A. No! The answer is B.", 2), ("The answer is D.", 3), ("E", 4), ("the answer is A.", 2),
    ("FAILED", 2), ("", 2)])
def test_parse_refuses(text, n):
    assert scienceqa.parse_answer(text, n) == -1


def test_table_columns_by_hand():
    problems = {  # subject, hint (TXT), image (IMG), grade; results below: p2, p4 wrong
        "p1": problem(subject="natural science", hint="h", image="image.png", grade="grade1", answer=0),
        "p2": problem(subject="natural science", grade="grade7", answer=1),
        "p3": problem(subject="social science", image="image.png", grade="grade3", choices=list("abc"), answer=2),
        "p4": problem(subject="language science", hint="h", grade="grade12", answer=0),
        "p5": problem(subject="language science", grade="grade6", answer=1),
        "p6": problem(subject="social science", hint="h", image="image.png", grade="grade9", choices=list("abcd"),
                      answer=3)}
    row = scienceqa.table(problems, {"p1": 0, "p2": 0, "p3": 2, "p4": -1, "p5": 1, "p6": 3})
    assert row == pytest.approx({"NAT": 50.0, "SOC": 100.0, "LAN": 50.0, "TXT": 200 / 3, "IMG": 100.0, "NO": 50.0,
                                 "G1-6": 100.0, "G7-12": 100 / 3, "Avg": 400 / 6})
    assert scienceqa.table({"p1": problems["p1"]}, {"p1": 0})["SOC"] is None


def test_score_cli_counts_missing_answers_as_wrong(tmp_path, capsys):
    root = write_release(tmp_path / "sqa", {"1": problem(), "2": problem(answer=1), "3": problem()},
                         {"test": ["1", "2", "3"]})
    answers = write_answers(tmp_path / "a.jsonl", {"1": "The answer is A.", "2": "A", "99": "B"})
    with open(answers, "a") as f:
        f.write('{"question_id": "3", "te')  # a torn last line: an interrupted run
    scienceqa.main(["score", "--root", root, "--answers", answers, "--out", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["correct"], result["count"], result["results"], result["missing"]) == (1, 3, {"1": 0, "2": 0,
                                                                                           "3": -1}, ["3"])
    assert result["acc"] == pytest.approx(100 / 3) and result["table"]["Avg"] == pytest.approx(100 / 3)
    out = capsys.readouterr().out
    assert "1 of 3 problems have no answer" in out and "33.33" in out


def test_score_refuses_a_complete_last_line_that_does_not_parse(tmp_path):
    root = write_release(tmp_path / "sqa", {"1": problem(), "2": problem()}, {"test": ["1", "2"]})
    answers = write_answers(tmp_path / "a.jsonl", {"1": "A"})
    with open(answers, "a") as f:
        f.write('{"question_id": "2", "te\n')  # ends in its newline: not a torn append but a damaged file
    with pytest.raises(SystemExit, match=r"error: .*a.jsonl: line 2 is not valid JSON"):
        scienceqa.main(["score", "--root", root, "--answers", answers, "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


def test_conflicting_answers_to_one_question_are_refused_naming_it(tmp_path):
    answers = write_answers(tmp_path / "a.jsonl", {"1": "A", "2": "B"})
    with open(answers, "a") as f:
        f.write(json.dumps({"question_id": "1", "text": "A"}) + "\n")  # the same answer again: harmless
    assert scienceqa.read_answers(answers) == {"1": "A", "2": "B"}
    with open(answers, "a") as f:
        f.write(json.dumps({"question_id": "2", "text": "C"}) + "\n")
    with pytest.raises(ValueError, match=r"a.jsonl: question_id '2' has two different answers"):
        scienceqa.read_answers(answers)


# ---------------------------------------------------------------------------------------------------------------------
# answer


def test_model_items_ask_like_model_vqa_science(tmp_path):
    root = write_release(tmp_path, {"7": MAP, "8": problem()}, {"test": ["7", "8"]})
    items = scienceqa.model_items(root, "test", scienceqa.load_scienceqa(root, "test"), "QCM-LEA")
    question = ("Which of these states is farthest north?\nContext: N/A\n"
                "Options: (A) West Virginia (B) Louisiana (C) Arizona (D) Oklahoma")
    assert items[0] == {"question_id": "7", "text": question, "prompt": "<image>\n" + question,
                        "image_path": os.path.join(root, "images", "test", "7", "image.png")}
    assert items[1]["image_path"] is None and items[1]["prompt"] == items[1]["text"]


def test_single_pred_prompt_follows_the_question_as_model_vqa_science_adds_it(tmp_path):
    root = write_release(tmp_path, {"7": MAP, "8": problem()}, {"test": ["7", "8"]})
    items = scienceqa.model_items(root, "test", scienceqa.load_scienceqa(root, "test"), "CQM-A", True)
    question = ("Context: N/A\nQuestion: Which of these states is farthest north?\n"
                "Options: (A) West Virginia (B) Louisiana (C) Arizona (D) Oklahoma\n"
                "Answer with the option's letter from the given choices directly.")
    assert (items[0]["text"], items[0]["prompt"]) == (question, "<image>\n" + question)
    assert items[1]["text"] == items[1]["prompt"] == ("Context: N/A\nQuestion: Which is it?\nOptions: (A) x (B) y\n"
                                                      "Answer with the option's letter from the given choices "
                                                      "directly.")


def test_answer_asks_with_the_chosen_template_and_temperature_and_records_them(tiny_checkpoint, tmp_path,
                                                                               monkeypatch):
    import inference
    root, answers = str(tmp_path / "sqa"), str(tmp_path / "answers.jsonl")
    scienceqa.main(["demo", "--root", root, "--images", "4"])
    templates, sampling = [], []
    real_ids, real_batch = inference.prompt_ids, inference.generate_batch
    monkeypatch.setattr(inference, "prompt_ids", lambda *a: (templates.append(a[4]), real_ids(*a))[1])
    monkeypatch.setattr(inference, "generate_batch", lambda llm, prompts, **kw: (
        sampling.append((kw["temperature"], kw["generator"].initial_seed())), real_batch(llm, prompts, **kw))[1])
    ask = ["answer", "--model", tiny_checkpoint, "--root", root, "--out", answers, "--max-new-tokens", "2",
           "--limit", "3", "--prompt-format", "CQM-A", "--single-pred-prompt", "--template", "llava_v1"]
    scienceqa.main(ask + ["--temperature", "0.2", "--seed", "7"])
    assert templates == ["llava_v1"] * 3 and sampling == [(0.2, 7)]
    assert all(r["prompt"].endswith("\n" + scienceqa.SINGLE_PRED_PROMPT) for r in map(json.loads, open(answers)))
    recorded = json.load(open(answers + ".source.json"))
    assert {k: recorded[k] for k in ("template", "temperature", "seed", "single_pred_prompt", "prompt_format")} == {
        "template": "llava_v1", "temperature": 0.2, "seed": 7, "single_pred_prompt": True, "prompt_format": "CQM-A"}
    with pytest.raises(SystemExit, match=r"seed 7 there, None now; temperature 0.2 there, 0.0 now"):
        scienceqa.main(ask)  # greedy answers do not continue a sampled file
    with pytest.raises(SystemExit, match=r"single_pred_prompt True there, False now"):
        scienceqa.main(ask[:-3] + ["--template", "llava_v1", "--temperature", "0.2", "--seed", "7"])
    assert len(open(answers).read().splitlines()) == 3


def test_an_unknown_template_is_refused_before_the_model_loads(tiny_checkpoint, tmp_path, monkeypatch):
    import inference
    root = write_release(tmp_path / "sqa", {"1": problem()}, {"test": ["1"]})
    monkeypatch.setattr(inference, "load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match=r"error: unknown template 'llava_v9'; known: .*vicuna_v1"):
        scienceqa.main(["answer", "--model", tiny_checkpoint, "--root", root, "--out", str(tmp_path / "a.jsonl"),
                        "--template", "llava_v9"])


# ---------------------------------------------------------------------------------------------------------------------
# GPT-4 and the ensemble


def test_gpt4_messages_are_text_only_with_worked_shots():
    messages = scienceqa.gpt4_messages(MAP, shots=[problem(lecture="Lec.", solution="Sol.")])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == "Lec. Sol. The answer is A."
    assert messages[3]["content"].startswith("Which of these states") and "<image>" not in messages[3]["content"]


def test_gpt4_answer_file_is_model_vqa_science_format(tmp_path):
    out = tmp_path / "gpt4.jsonl"
    with FakeOpenAI(reply=lambda m: "The answer is A.") as server:
        client = ChatClient(server.url, "sk-test", "gpt-4", max_retries=0)
        scienceqa.gpt4_answers({"1": MAP, "2": problem()}, client, str(out), workers=1)
    assert json.loads((tmp_path / "gpt4.jsonl.source.json").read_text()) == {
        "api_model": "gpt-4", "temperature": 0.7, "max_tokens": 1024, "shots": 0}
    first, second = (json.loads(line) for line in out.read_text().splitlines())
    assert {k: v for k, v in first.items() if k != "answer_id"} == {
        "question_id": "1", "prompt": scienceqa.question_text(MAP), "text": "The answer is A.", "model_id": "gpt-4",
        "metadata": {}}
    assert len(first["answer_id"]) == 32 and first["answer_id"] != second["answer_id"]


def test_gpt4_answers_survive_500_and_rerun_asks_only_failures(tmp_path):
    problems = {str(i): problem(question=f"Question {i}?") for i in (1, 2, 3)}
    replies = {"1": "Lecture. The answer is A.", "2": "The answer is B.", "3": "I am not sure."}
    with FakeOpenAI(reply=lambda m: replies[m[-1]["content"].split("?")[0].split()[-1]]) as server:
        server.on("Question 1?", "500", times=1)  # retried
        server.on("Question 2?", "500", times=2)  # fails for good in this run
        client = ChatClient(server.url, "sk-test", "gpt-4", max_retries=1, backoff=0.01)
        out = str(tmp_path / "gpt4.jsonl")
        assert scienceqa.gpt4_answers(problems, client, out, workers=2) == 1
        assert scienceqa.read_answers(out) == {"1": replies["1"], "3": replies["3"]}  # a reply without answer stays
        n = len(server.requests)
        assert scienceqa.gpt4_answers(problems, client, out) == 0 and len(server.requests) == n + 1
        assert scienceqa.read_answers(out)["2"] == "The answer is B."


def test_gpt4_answers_of_another_model_are_not_continued(tmp_path):
    out = str(tmp_path / "gpt4.jsonl")
    with FakeOpenAI(reply=lambda m: "The answer is A.") as server:
        scienceqa.gpt4_answers({"1": problem()}, ChatClient(server.url, "sk-test", "gpt-4", max_retries=0), out)
        with pytest.raises(ValueError, match="api_model 'gpt-4' there, 'gpt-4o' now"):
            scienceqa.gpt4_answers({"1": problem(), "2": problem()},
                                   ChatClient(server.url, "sk-test", "gpt-4o", max_retries=0), out)
        assert len(server.requests) == 1


def test_gpt4_exits_non_zero_when_requests_failed(tmp_path, monkeypatch, capsys):
    root = write_release(tmp_path / "sqa", {"1": problem(), "2": problem()}, {"train": ["1"], "test": ["1", "2"]})
    monkeypatch.setenv("SQA_TEST_KEY", "sk-test")
    with FakeOpenAI(default="400") as server:  # refused for good at once (a 500 would be retried for a minute)
        with pytest.raises(SystemExit, match=r"error: 2 of 2 requests failed"):
            scienceqa.main(["gpt4", "--root", root, "--base-url", server.url, "--api-key-env", "SQA_TEST_KEY",
                            "--out", str(tmp_path / "g.jsonl"), "--shots", "0"])
    assert "0 new, 2 failed" in capsys.readouterr().out


def test_gpt4_more_shots_than_the_train_split_has_is_refused(tmp_path, monkeypatch):
    root = write_release(tmp_path / "sqa", {"1": problem(), "2": problem()}, {"train": ["1"], "test": ["2"]})
    monkeypatch.setenv("SQA_TEST_KEY", "sk-test")
    with pytest.raises(SystemExit, match=r"error: --shots 100: the train split has 1 problem"):
        scienceqa.main(["gpt4", "--root", root, "--base-url", "http://127.0.0.1:9/v1", "--api-key-env",
                        "SQA_TEST_KEY", "--out", str(tmp_path / "g.jsonl"), "--shots", "100"])


@pytest.mark.parametrize("args", [["gpt4", "--shots", "-1"], ["gpt4", "--workers", "0"], ["answer", "--batch-size",
                                  "0", "--model", "m"], ["answer", "--max-new-tokens", "-3", "--model", "m"],
                                  ["answer", "--temperature", "-0.1", "--model", "m"], ["answer", "--seed", "-1",
                                                                                       "--model", "m"]])
def test_numbers_out_of_range_are_refused_by_the_parser(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as e:
        scienceqa.main([*args, "--root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and f"argument {args[1]}: must be at least" in capsys.readouterr().err


def test_gpt4_refused_key_stops_the_run(tmp_path):
    with FakeOpenAI() as server:
        server.default = "401"
        client = ChatClient(server.url, "sk-secret", "gpt-4", max_retries=0)
        with pytest.raises(FatalAPIError):
            scienceqa.gpt4_answers({"1": problem()}, client, str(tmp_path / "g.jsonl"))


ENSEMBLE = {  # pid: (correct index, ours, GPT-4 (None: no answer in the file), judge reply)
    "1": (0, "The answer is A.", "Both agree. The answer is A.", "The answer is A."),  # agree: not re-asked
    "2": (1, "The answer is B.", "The answer is C.", "Answer 1 is right. The answer is B."),
    "3": (3, "The answer is A.", "The answer is D.", "I cannot decide."),  # no answer: ours stands (wrong)
    "4": (2, "The answer is C.", None, "The answer is C."),  # GPT-4 gave none; the re-ask first gets a 500
    "5": (1, "I think it is B", "The answer is B.", "The answer is B."),  # ours unparseable
    "6": (1, "The answer is B.", "The answer is A.", "The answer is B."),
}


def judge_fake(fault="500"):
    def reply(messages):  # the pid from "Question <pid>?"
        return ENSEMBLE[messages[-1]["content"].split("?")[0].split()[-1]][3]
    server = FakeOpenAI(reply=reply)
    server.on("Question 4?", fault, times=1)
    return server


def ensemble_inputs():
    problems = {pid: problem(question=f"Question {pid}?", choices=list("abcd"), answer=a)
                for pid, (a, *_) in ENSEMBLE.items()}
    return problems, {pid: e[1] for pid, e in ENSEMBLE.items()}, {pid: e[2] for pid, e in ENSEMBLE.items() if e[2]}


def test_ensemble_complement_and_judge_by_hand(tmp_path):
    problems, ours, gpt4 = ensemble_inputs()
    complement, rows, asked, failed = scienceqa.ensemble(problems, ours, gpt4, "complement")
    # ours right on 1, 2, 4, 6; GPT-4 on 1, 3, 5; complement = GPT-4 (1 ok, 2 C, 3 ok, 5 ok, 6 A) + ours on 4 (ok)
    assert asked == failed == 0 and complement == {"1": 0, "2": 2, "3": 3, "4": 2, "5": 1, "6": 0}
    assert [rows[k]["Avg"] for k in rows] == pytest.approx([400 / 6, 300 / 6, 400 / 6])
    log = str(tmp_path / "judge.jsonl")
    with judge_fake() as server:
        client = ChatClient(server.url, "sk-test", "gpt-4", backoff=0.01)
        judge, rows, asked, failed = scienceqa.ensemble(problems, ours, gpt4, "judge", client, log, workers=2)
        # re-asked 2-6; judge: 2 B ok, 3 no answer -> ours A (wrong), 4 C ok, 5 B ok, 6 B ok; 1 agreed (ok): 5/6
        assert asked == 5 and failed == 0 and judge == {"1": 0, "2": 1, "3": 0, "4": 2, "5": 1, "6": 1}
        assert rows["LLaVA+GPT-4 judge"]["Avg"] == pytest.approx(500 / 6)
        assert len(server.requests) == 6  # five questions, one 500 retried
        request = server.requests[1]["body"]["messages"][-1]["content"]
        assert "Answer 1:\n" in request and "Answer 2:\n" in request
        n = len(server.requests)
        assert scienceqa.ensemble(problems, ours, gpt4, "judge", client, log)[0] == judge
        assert len(server.requests) == n  # every reply came from the log
    assert len([json.loads(line) for line in open(log)]) == 5


def test_a_judge_ensemble_whose_requests_failed_says_so_and_exits_non_zero(tmp_path, monkeypatch):
    problems, ours, gpt4 = ensemble_inputs()
    root = write_release(tmp_path / "sqa", problems, {"test": list(ENSEMBLE)})
    answers, gpt4_file = write_answers(tmp_path / "ours.jsonl", ours), write_answers(tmp_path / "gpt4.jsonl", gpt4)
    monkeypatch.setenv("SQA_TEST_KEY", "sk-test")
    out = str(tmp_path / "judge.json")
    with FakeOpenAI(default="400") as server:
        with pytest.raises(SystemExit, match=r"error: 5 of 5 judge requests failed"):
            scienceqa.main(["ensemble", "--root", root, "--base-url", server.url, "--api-key-env", "SQA_TEST_KEY",
                            "--answers", answers, "--gpt4", gpt4_file, "--mode", "judge", "--out", out])
    result = json.loads(open(out).read())
    assert result["reasked"] == 5 and result["failed"] == 5  # the judge row stands for ours there, and says so


def test_gpt4_and_ensemble_cli(tmp_path, monkeypatch, capsys):
    problems, ours, _ = ensemble_inputs()
    problems["9"] = problem(question="Worked example?", lecture="Lec.", solution="Sol.")
    root = write_release(tmp_path / "sqa", problems, {"train": ["9"], "test": list(ENSEMBLE)})
    monkeypatch.setenv("SQA_TEST_KEY", "sk-test")
    gpt4_file, out = str(tmp_path / "gpt4.jsonl"), str(tmp_path / "ensemble.json")
    with judge_fake("400") as server:  # GPT-4's request for 4 refused: no answer for 4
        flags = ["--root", root, "--base-url", server.url, "--api-key-env", "SQA_TEST_KEY"]
        with pytest.raises(SystemExit, match="error: 1 of 6 requests failed"):
            scienceqa.main(["gpt4", *flags, "--out", gpt4_file, "--shots", "1", "--workers", "1"])
        first = server.requests[0]["body"]
        assert first["model"] == "gpt-4" and first["messages"][1]["content"].startswith("Worked example?")
        assert (first["temperature"], first["max_tokens"]) == (0.0, 1024)
        scienceqa.main(["ensemble", *flags, "--answers", write_answers(tmp_path / "ours.jsonl", ours),
                        "--gpt4", gpt4_file, "--mode", "judge", "--out", out])
    result = json.loads(open(out).read())
    # GPT-4 answered with the judge replies (3 without an answer, 4 refused) and ours fails on 5: 3, 4, 5 differ
    assert result["reasked"] == 3 and result["failed"] == 0 and set(result["rows"]) == {
        "LLaVA", "GPT-4 (text-only)", "LLaVA+GPT-4 complement", "LLaVA+GPT-4 judge"}
    printed = capsys.readouterr().out
    assert "LLaVA+GPT-4 judge" in printed and "re-asked" in printed
    assert os.path.isfile(out + ".log.jsonl")


# ---------------------------------------------------------------------------------------------------------------------
# the demo set, end to end on a tiny checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import shutil
    from clip import CLIPVisionConfig
    from llama import LlamaConfig
    from llava import LLaVA, LLaVAConfig
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llava")
    LLaVA(LLaVAConfig(llm=LlamaConfig.from_name("tiny"), vision=CLIPVisionConfig.from_name("tiny"))
          ).save_pretrained(str(path))
    shutil.copy(os.path.join(FIXTURES, "tokenizer.model"), path / "tokenizer.model")
    return str(path)


def test_demo_set_is_scienceqa_shaped(tmp_path):
    problems = demo.make_scienceqa_demo(str(tmp_path), n_images=6)
    for split in ("train", "val", "test", "minival", "minitest"):
        for pid, p in scienceqa.load_scienceqa(str(tmp_path), split).items():
            assert not p["image"] or os.path.isfile(tmp_path / "images" / p["split"] / pid / "image.png")
    assert None not in scienceqa.table(problems, {}).values()  # every Table 7 column has problems


def test_demo_convert_answer_score_offline(tiny_checkpoint, tmp_path, capsys):
    root, out = str(tmp_path / "sqa"), tmp_path / "out"
    scienceqa.main(["demo", "--root", root, "--images", "4"])
    scienceqa.main(["convert", "--root", root, "--split", "train", "--out", str(out / "train.json")])
    assert json.loads((out / "train.json").read_text())[0]["conversations"][1]["value"].endswith(".")
    answers = str(out / "answers.jsonl")
    ask = ["answer", "--model", tiny_checkpoint, "--root", root, "--out", answers, "--max-new-tokens", "3"]
    scienceqa.main(ask + ["--limit", "2"])
    scienceqa.main(ask + ["--limit", "3"])  # resumes: asks only the third
    lines = open(answers).read().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["model_id"] == os.path.basename(tiny_checkpoint)
    with pytest.raises(SystemExit, match=r"error: .*answers.jsonl: its answers \(3\) were made with other settings .*"
                                         r"prompt_format 'QCM-LEA' there, 'CQM-A' now"):
        scienceqa.main(ask + ["--limit", "4", "--prompt-format", "CQM-A"])
    assert len(open(answers).read().splitlines()) == 3
    scienceqa.main(["score", "--root", root, "--answers", answers, "--out", str(out / "result.json")])
    result = json.loads((out / "result.json").read_text())
    n_test = len(json.load(open(os.path.join(root, "pid_splits.json")))["test"])
    assert result["count"] == n_test and len(result["missing"]) == n_test - 3
    assert f"{n_test - 3} of {n_test} problems have no answer" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_reports_bad_input_without_traceback(tmp_path):
    run = subprocess.run([sys.executable, "scienceqa.py", "convert", "--root", str(tmp_path), "--out",
                          str(tmp_path / "x.json")], cwd=ROOT_DIR, capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.startswith("error:") and "problems.json" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.slow
def test_demo_trains_with_the_scienceqa_recipe(tiny_checkpoint, tmp_path):
    """convert -> train.py --recipe scienceqa --stage 2 (one tiny epoch, from a tiny LLaVA) -> answer."""
    if '"scienceqa"' not in open(os.path.join(ROOT_DIR, "train.py")).read():
        pytest.skip("train.py has no scienceqa recipe")
    root, data, run_dir = str(tmp_path / "sqa"), str(tmp_path / "train.json"), str(tmp_path / "run")
    demo.make_scienceqa_demo(root, n_images=4)
    scienceqa.main(["convert", "--root", root, "--split", "train", "--out", data])
    train = subprocess.run(
        [sys.executable, "train.py", "--recipe", "scienceqa", "--stage", "2", "--model", tiny_checkpoint, "--data",
         data, "--image-folder", os.path.join(root, "images", "train"), "--out", run_dir, "--set", "epochs=1",
         "batch_size=4", "loss_group=4", "num_workers=0", "threads=1", "grad_checkpointing=false",
         "projector_type=mlp2x_gelu", "image_size=64"], cwd=ROOT_DIR, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    answers = str(tmp_path / "answers.jsonl")
    scienceqa.main(["answer", "--model", run_dir, "--root", root, "--out", answers, "--max-new-tokens", "3",
                    "--limit", "2"])
    assert len(scienceqa.read_answers(answers)) == 2
