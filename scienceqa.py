"""The paper's ScienceQA experiment (Sec. 5.2, Table 7): LLaVA fine-tuned on ScienceQA, scored by subject, context
and grade, alone and in an ensemble with a text-only GPT-4 (92.53 % with GPT-4 as the judge).

  convert   the ScienceQA release (problems.json, pid_splits.json, images/<split>/<pid>/) -> LLaVA JSON, the same
            list as the original converter writes (LLaVA's scripts/convert_sqa_to_llava.py and its base prompt),
            for every prompt format it defines; QCM-LEA (lecture, solution, "The answer is X.") is the paper's
  answer    a checkpoint's answers in LLaVA's answer-file format (JSONL question_id, prompt, text, answer_id,
            model_id), asked as llava/eval/model_vqa_science.py asks (its --single-pred-prompt, --conv-mode and
            --temperature too); resumable, batched, and spread over the processes of a torchrun launch
  score     parses answers as llava/eval/eval_science_qa.py does and writes the Table 7 columns, defined as in
            ScienceQA's tools/evaluate_acc.py (NAT/SOC/LAN by subject, TXT/IMG/NO by context, G1-6/G7-12 by grade)
  gpt4      the text-only GPT-4 baseline (chain of thought ending in "The answer is X."), resumable, same format
  ensemble  complement (GPT-4's answer, ours where it gives none) or judge (where the two differ, GPT-4 sees both
            answers with their reasoning and decides; ours where it does not); every request logged, never re-asked
  demo      a ScienceQA-shaped set from the demo's shape images, so the pipeline runs offline (demo.py scienceqa
            trains on it: Table 7 in miniature)

Files from either implementation can be scored by either: the converted JSON and the answer files are LLaVA's (what
produced an answer file is recorded beside it, in ANSWERS.source.json). gpt4 and ensemble exit 1 when requests failed.
"""
import argparse
import json
import os
import random
import re
import sys
import threading
import uuid

from api import APIError, ask_all, client_from_env, client_source, complete_or_none, run_pool
from fileio import append_jsonl, inside, number, read_json, read_jsonl, require, resume_jsonl, write_json

OPTIONS = ["A", "B", "C", "D", "E"]  # the converter's and the eval script's option letters: at most five choices
# The original converter's templates (scripts/convert_sqa_to_llava_base_prompt.py, create_one_example_chatbot)
INPUT_FORMATS = {
    "CQM": "Context: {context}\nQuestion: {question}\nOptions: {choice}\n",
    "QCM": "Question: {question}\nContext: {context}\nOptions: {choice}\n",
    "QCML": "Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {lecture}\n",  # upper bounds
    "QCME": "Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {solution}\n",
    "QCMLE": "Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {lecture} {solution}\n",
    "QCLM": "Question: {question}\nContext: {context}\nBECAUSE: {lecture}\nOptions: {choice}\n",
    "QCEM": "Question: {question}\nContext: {context}\nBECAUSE: {solution}\nOptions: {choice}\n",
    "QCLEM": "Question: {question}\nContext: {context}\nBECAUSE: {lecture} {solution}\nOptions: {choice}\n",
}
OUTPUT_FORMATS = {
    "A": "Answer: The answer is {answer}.",
    "AL": "Answer: The answer is {answer}. BECAUSE: {solution}",  # sic: the original's AL gives the solution
    "AE": "Answer: The answer is {answer}. BECAUSE: {lecture}",  # and AE the lecture
    "ALE": "Answer: The answer is {answer}. BECAUSE: {lecture} {solution}",
    "AEL": "Answer: The answer is {answer}. BECAUSE: {solution} {lecture}",
    "LA": "Answer: {lecture} The answer is {answer}.",
    "EA": "Answer: {solution} The answer is {answer}.",
    "LEA": "Answer: {lecture} {solution} The answer is {answer}.",
    "ELA": "Answer: {solution} {lecture} The answer is {answer}.",
    "LEPA": None,  # LECTURE: / SOLUTION: / ### / ANSWER: lines, below
}
PROMPT_FORMATS = [f"{i}-{o}" for i in INPUT_FORMATS for o in OUTPUT_FORMATS]
DEFAULT_FORMAT = "QCM-LEA"  # the paper's: reasoning first, then the answer (scripts/finetune_sqa.sh)
# model_vqa_science.py --single-pred-prompt (LLaVA-1.5's scripts/v1_5/eval/sqa.sh): this line after the question
SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
GRADES_1_6 = {f"grade{g}" for g in range(1, 7)}
GRADES_7_12 = {f"grade{g}" for g in range(7, 13)}
# As ScienceQA's tools/evaluate_acc.py: subject; has a hint (TXT) / an image (IMG) / neither (NO); grade band
GROUPS = {"NAT": lambda p: p["subject"] == "natural science", "SOC": lambda p: p["subject"] == "social science",
          "LAN": lambda p: p["subject"] == "language science", "TXT": lambda p: bool(p["hint"]),
          "IMG": lambda p: bool(p["image"]), "NO": lambda p: not p["hint"] and not p["image"],
          "G1-6": lambda p: p["grade"] in GRADES_1_6, "G7-12": lambda p: p["grade"] in GRADES_7_12}
GPT4_SYSTEM = ("You are a helpful assistant. You answer multiple-choice science questions. You cannot see the "
               "image a question may refer to; use the context. Explain your reasoning step by step, then end your "
               "reply with \"The answer is X.\", where X is the letter of the correct option.")
JUDGE_REQUEST = ("Two answers were given to this question, each with its reasoning.\n\nAnswer 1:\n{ours}\n\n"
                 "Answer 2:\n{gpt4}\n\nThe two disagree. Decide which is right, or answer it yourself: reason step "
                 "by step, then end your reply with \"The answer is X.\"")

# -----------------------------------------------------------------------------------------------------------------
# the release: read and check where it enters


def check_problem(problem, pid, where, image_folder):
    if not isinstance(problem, dict):
        raise ValueError(f"{where}: a problem must be a JSON object")
    for key, kind in (("question", str), ("choices", list), ("answer", int), ("hint", str), ("lecture", str),
                      ("solution", str), ("subject", str), ("grade", str)):
        value = require(problem, key, where)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}: {key!r} must be a {kind.__name__}, got {value!r:.80}")
    choices = problem["choices"]
    if not 1 <= len(choices) <= len(OPTIONS) or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: 'choices' must be 1 to {len(OPTIONS)} strings (options A-E), got {choices!r:.200}")
    if not 0 <= problem["answer"] < len(choices):
        raise ValueError(f"{where}: 'answer' {problem['answer']} is not an index of its {len(choices)} choices")
    image = require(problem, "image", where)
    if image is not None:  # the release has null or "image.png"
        relative = os.path.join(pid, image) if isinstance(image, str) and image else image
        inside(image_folder, relative, f"{where}: 'image'")


def load_scienceqa(root, split):
    """{pid: problem} of one split, in pid_splits order, every problem checked (errors name the file and pid)."""
    problems_path, splits_path = os.path.join(root, "problems.json"), os.path.join(root, "pid_splits.json")
    for path in (problems_path, splits_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: not found (download the ScienceQA release: docs/scienceqa.md)")
    problems, splits = read_json(problems_path), read_json(splits_path)
    if not isinstance(problems, dict):
        raise ValueError(f"{problems_path}: must be a JSON object {{pid: problem}}")
    if not isinstance(splits, dict) or not isinstance(splits.get(split), list) or not splits[split]:
        raise ValueError(f"{splits_path}: no split {split!r} (a non-empty list of pids)")
    out = {}
    for pid in splits[split]:
        if not isinstance(pid, str) or pid not in problems:
            raise ValueError(f"{splits_path}: split {split!r} lists pid {pid!r}, which {problems_path} does not have")
        if pid in out:  # the release has none; answers are kept by pid, so a repeat is a damaged file
            raise ValueError(f"{splits_path}: split {split!r} lists pid {pid!r} twice")
        check_problem(problems[pid], pid, f"{problems_path}, pid {pid}", os.path.join(root, "images", split))
        out[pid] = problems[pid]
    return out


# -----------------------------------------------------------------------------------------------------------------
# conversion: the original's strings exactly


def _tidy(text):
    text = text.replace("  ", " ").strip()  # one pass: three spaces become two, as the original's
    return text.replace("BECAUSE:", "").strip() if text.endswith("BECAUSE:") else text  # every BECAUSE:, sic


def convert_problem(problem, prompt_format):
    """(human, gpt) text of one problem, as build_prompt_chatbot + convert_to_llava write it (before <image>)."""
    input_format, output_format = prompt_format.split("-")
    fields = dict(question=problem["question"], context=problem["hint"].strip() or "N/A",  # hint + caption ""
                  choice=" ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(problem["choices"])),
                  answer=OPTIONS[problem["answer"]],
                  # the original escapes newlines and unescapes them again, so a literal \n becomes a newline too
                  lecture=problem["lecture"].replace("\n", "\\n").replace("\\n", "\n"),
                  solution=problem["solution"].replace("\n", "\\n").replace("\\n", "\n"))
    human = _tidy(INPUT_FORMATS[input_format].format(**fields))
    if output_format == "LEPA":
        gpt = "".join(f"{name}: {fields[key]}\n" for name, key in (("LECTURE", "lecture"), ("SOLUTION", "solution"))
                      if fields[key].strip()) + f"###\nANSWER: {fields['answer']}."
    else:
        gpt = OUTPUT_FORMATS[output_format].format(**fields)
    gpt = _tidy(gpt)
    # the original strips these prefixes with replace(): every occurrence goes, not just the first
    human = human.replace("Question: ", "") if human.startswith("Question: ") else human
    gpt = gpt.replace("Answer: ", "") if gpt.startswith("Answer: ") else gpt
    return human, gpt


def convert(problems, prompt_format=DEFAULT_FORMAT):
    """LLaVA JSON records; image paths are relative to <root>/images/<split>, <image> comes after the question."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; known: {', '.join(PROMPT_FORMATS)}")
    records = []
    for pid, problem in problems.items():
        human, gpt = convert_problem(problem, prompt_format)
        image = {} if problem["image"] is None else {"image": os.path.join(pid, problem["image"])}
        records.append({"id": pid, **image, "conversations": [
            {"from": "human", "value": human + ("\n<image>" if image else "")}, {"from": "gpt", "value": gpt}]})
    return records


# -----------------------------------------------------------------------------------------------------------------
# answer files (LLaVA's format), written resumably by the model and by GPT-4


def vqa_answer_record(model_id):
    """record(item, text) as model_vqa_science.py writes it: {question_id, prompt, text, answer_id, model_id,
    metadata}."""
    return lambda item, text: {"question_id": item["question_id"], "prompt": item["prompt"], "text": text,
                               "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}


def model_items(root, split, problems, prompt_format, single_pred_prompt=False):
    """The converted human turn, with <image> removed and put first, as model_vqa_science.py asks it; with
    single_pred_prompt, "\n" + SINGLE_PRED_PROMPT after the question (and after the image's line in "prompt")."""
    items = []
    for record in convert(problems, prompt_format):
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        question += "\n" + SINGLE_PRED_PROMPT if single_pred_prompt else ""
        image = os.path.join(root, "images", split, record["image"]) if "image" in record else None
        if image and not os.path.isfile(image):
            raise FileNotFoundError(f"{image}: image of pid {record['id']} not found")
        items.append({"question_id": record["id"], "text": question, "image_path": image,
                      "prompt": "<image>\n" + question if image else question})
    return items


def read_answers(path):
    """{question_id: text}; one question answered twice alike is one answer, differently an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: answer file not found")
    answers = {}
    for n, r in enumerate(read_jsonl(path), 1):
        where = f"{path}, record {n}"
        pid, text = str(require(r, "question_id", where)), str(require(r, "text", where))
        if answers.setdefault(pid, text) != text:
            raise ValueError(f"{path}: question_id {pid!r} has two different answers (record {n} and an earlier one)")
    return answers


# -----------------------------------------------------------------------------------------------------------------
# scoring


def parse_answer(text, n_choices):
    """The option index, as llava/eval/eval_science_qa.py parses it: a bare letter, "X. ...", or exactly one
    "The answer is X." (any character after the letter); anything else (or a letter past the choices) is -1."""
    if text in OPTIONS:
        letter = text
    elif len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = re.findall(r"The answer is ([A-Z]).", text)
        letter = found[0] if len(found) == 1 else None
    return OPTIONS.index(letter) if letter in OPTIONS[:n_choices] else -1


def table(problems, results):
    """Table 7's columns in percent (None where a column has no problems)."""
    correct = {pid: results.get(pid, -1) == p["answer"] for pid, p in problems.items()}
    row = {}
    for column, member in GROUPS.items():
        chosen = [correct[pid] for pid, p in problems.items() if member(p)]
        row[column] = 100.0 * sum(chosen) / len(chosen) if chosen else None
    row["Avg"] = 100.0 * sum(correct.values()) / len(problems) if problems else None
    return row


def print_table(rows):
    print(f"{'':<24}" + "".join(f"{c:>8}" for c in COLUMNS))
    for name, row in rows.items():
        print(f"{name:<24}" + "".join(f"{'-' if row[c] is None else f'{row[c]:.2f}':>8}" for c in COLUMNS))


def parse_all(problems, answers):
    """{pid: index} for answer texts {pid: text}; a problem without an answer gets -1 (wrong), as "FAILED" does."""
    return {pid: parse_answer(answers.get(pid, "FAILED"), len(p["choices"])) for pid, p in problems.items()}


def summary(problems, results):
    """eval_science_qa.py's result fields {acc (%), correct, count, results {pid: index}} plus the Table 7 row."""
    correct = sum(results[pid] == p["answer"] for pid, p in problems.items())
    return {"acc": 100.0 * correct / len(problems), "correct": correct, "count": len(problems), "results": results,
            "table": table(problems, results)}


def score(problems, answers):
    missing = [pid for pid in problems if pid not in answers]
    return {**summary(problems, parse_all(problems, answers)), "missing": missing,
            "outputs": {pid: answers[pid] for pid in problems if pid in answers}}


# -----------------------------------------------------------------------------------------------------------------
# GPT-4: the text-only baseline and the ensemble


def question_text(problem):
    """What GPT-4 is shown: context, question and options as the QCM human turn (the image is unseen)."""
    return convert_problem(problem, "QCM-A")[0]


def gpt4_messages(problem, shots=()):
    """System prompt, then the shots (QCM question, QCM-LEA reasoning and answer), then the question."""
    messages = [{"role": "system", "content": GPT4_SYSTEM}]
    for shot in shots:
        human, gpt = convert_problem(shot, "QCM-LEA")
        messages += [{"role": "user", "content": human}, {"role": "assistant", "content": gpt}]
    return messages + [{"role": "user", "content": question_text(problem)}]


def gpt4_answers(problems, client, out_path, shots=(), workers=4):
    """GPT-4's answers appended to the answer file out_path; returns how many failed (asked again on a rerun)."""
    items = [{"question_id": pid, "prompt": question_text(p), "messages": gpt4_messages(p, shots)}
             for pid, p in problems.items()]
    there, new, failed = ask_all(items, lambda item: complete_or_none(client, item["messages"], item["question_id"]),
                                 out_path, vqa_answer_record(client.model), client_source(client, shots=len(shots)),
                                 workers, client.cancel)
    print(f"{out_path}: {there} answers were there, {new} new, {failed} failed")
    return failed


def judge_all(problems, pids, ours, gpt4, client, log_path, workers=4):
    """{pid: re-asked index, -1 where the reply has no answer, None where the request failed}; requests and replies
    go to log_path (JSONL), and a request already answered there (same pid, same messages, same judge) is never
    sent again."""
    logged = {(r["question_id"], json.dumps(r["messages"])): r["reply"]
              for r in resume_jsonl(log_path, client_source(client)) if r.get("reply") is not None}
    lock = threading.Lock()

    def one(pid):
        request = JUDGE_REQUEST.format(ours=ours.get(pid, "(no answer)"), gpt4=gpt4.get(pid, "(no answer)"))
        messages = [{"role": "system", "content": GPT4_SYSTEM},
                    {"role": "user", "content": question_text(problems[pid]) + "\n\n" + request}]
        reply = logged.get((pid, json.dumps(messages)))
        if reply is None:
            reply = complete_or_none(client, messages, f"judge {pid}")
            with lock:
                append_jsonl(log_path, {"question_id": pid, "messages": messages, "reply": reply})
        return None if reply is None else parse_answer(reply, len(problems[pid]["choices"]))

    return dict(zip(pids, run_pool(one, pids, workers, "judge", client.cancel)))


def ensemble(problems, ours, gpt4, mode, client=None, log_path=None, workers=4):
    """(results of the chosen scheme, Table 7 rows, how many were re-asked, how many of those requests failed: ours
    stands there) for answer texts {pid: text}."""
    ours_idx, gpt4_idx = parse_all(problems, ours), parse_all(problems, gpt4)
    complement = {pid: gpt4_idx[pid] if gpt4_idx[pid] != -1 else ours_idx[pid] for pid in problems}
    rows = {"LLaVA": table(problems, ours_idx), "GPT-4 (text-only)": table(problems, gpt4_idx),
            "LLaVA+GPT-4 complement": table(problems, complement)}
    if mode == "complement":
        return complement, rows, 0, 0
    differ = [pid for pid in problems if ours_idx[pid] != gpt4_idx[pid]]
    judged = judge_all(problems, differ, ours, gpt4, client, log_path, workers)
    judge = {pid: judged[pid] if judged.get(pid) not in (None, -1) else ours_idx[pid] for pid in problems}
    rows["LLaVA+GPT-4 judge"] = table(problems, judge)
    return judge, rows, len(differ), sum(index is None for index in judged.values())


# -----------------------------------------------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {name: sub.add_parser(name) for name in ("convert", "answer", "score", "gpt4", "ensemble", "demo")}
    for name, p in commands.items():
        p.add_argument("--root", required=True, help="ScienceQA folder: problems.json, pid_splits.json, images/")
        if name != "demo":
            p.add_argument("--split", default="test", help="train, val, test, minival, minitest")
            p.add_argument("--out", required=True)
        if name in ("convert", "answer"):
            p.add_argument("--prompt-format", default=DEFAULT_FORMAT, choices=PROMPT_FORMATS, metavar="FORMAT",
                           help=f"input-output, e.g. QCM-LEA (default) or CQM-A; one of {', '.join(PROMPT_FORMATS)}")
        if name in ("gpt4", "ensemble"):
            p.add_argument("--base-url", default="https://api.openai.com/v1")
            p.add_argument("--model", dest="gpt4_model", default="gpt-4")
            p.add_argument("--api-key-env", default="OPENAI_API_KEY")
            p.add_argument("--max-tokens", type=number(), default=1024)
            p.add_argument("--workers", type=number(), default=4, help="requests in flight")
    commands["answer"].add_argument("--model", required=True, help="checkpoint folder (with tokenizer.model)")
    commands["answer"].add_argument("--device", default=None)
    commands["answer"].add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    commands["answer"].add_argument("--max-new-tokens", type=number(), default=1024)  # model_vqa_science.py's
    commands["answer"].add_argument("--batch-size", type=number(), default=None, help="questions at a time (default 8 "
                                    "CPU, 32 CUDA)")
    commands["answer"].add_argument("--quantize", choices=("int8",), help="int8 weights for the LLM and projector")
    commands["answer"].add_argument("--single-pred-prompt", action="store_true", help=f"ask with {SINGLE_PRED_PROMPT!r}"
                                    " after the question (LLaVA-1.5's protocol)")
    commands["answer"].add_argument("--template", default=None, help="conversation template (model_vqa_science's "
                                    "--conv-mode), e.g. vicuna_v1 or llava_v1; default: the checkpoint's")
    commands["answer"].add_argument("--temperature", type=number(float, low=0), default=0.0,
                                    help="0 (default): greedy; above 0: sampled (the paper's script: 0.2)")
    commands["answer"].add_argument("--seed", type=number(int, low=0), default=0, help="sampling seed (+ rank)")
    for name in ("answer", "gpt4"):
        commands[name].add_argument("--limit", type=number(), default=None, help="only the first N problems")
    commands["score"].add_argument("--answers", required=True, help="answer file (JSONL)")
    commands["gpt4"].add_argument("--shots", type=number(low=0), default=2, help="worked examples from the train split")
    commands["ensemble"].add_argument("--answers", required=True, help="our answer file (JSONL)")
    commands["ensemble"].add_argument("--gpt4", required=True, help="GPT-4's answer file (JSONL)")
    commands["ensemble"].add_argument("--mode", choices=("complement", "judge"), default="judge")
    commands["ensemble"].add_argument("--log", default=None, help="judge requests and replies (default: OUT.log.jsonl)")
    commands["demo"].add_argument("--images", type=number(), default=12,
                                  help="shape images (6 problems each: demo.make_scienceqa_demo)")
    args = parser.parse_args(argv)
    try:
        failed = run(args)
    except (OSError, ValueError, APIError) as e:  # named in the message; APIError: the key was refused
        sys.exit(f"error: {e}")
    if failed:  # what was answered is kept (and counted in the result file); a rerun asks the failed ones again
        sys.exit(f"error: {failed[0]} of {failed[1]} {failed[2]} failed (the warnings above say why)")


def run(args):
    """Runs a command; returns (failed, asked, what) when API requests failed, else None."""
    if args.command == "demo":
        from demo import make_scienceqa_demo  # demo.py brings torch: only this command loads it
        problems = make_scienceqa_demo(args.root, args.images)
        return print(f"{args.root}: {len(problems)} ScienceQA-shaped problems")
    problems = load_scienceqa(args.root, args.split)
    client = None
    if args.command == "gpt4" or args.command == "ensemble" and args.mode == "judge":
        # temperature 0: ScienceQA's GPT-3 baseline; as repeatable as the API allows
        client = client_from_env(args.base_url, args.api_key_env, args.gpt4_model, temperature=0.0,
                                 max_tokens=args.max_tokens)
    if args.out and os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    if args.command == "convert":
        records = convert(problems, args.prompt_format)
        write_json(args.out, records)
        print(f"{args.out}: {len(records)} samples ({args.split}, {args.prompt_format})")
    elif args.command == "answer":
        from distributed import process_group  # torch only where a model runs
        from data import get_template
        from inference import answer_file, answer_source, load_model
        items = model_items(args.root, args.split, problems, args.prompt_format, args.single_pred_prompt)[:args.limit]
        if not os.path.isdir(args.model):
            raise FileNotFoundError(f"{args.model}: no checkpoint folder")
        if args.template is not None:
            get_template(args.template)  # an unknown name is refused before the model loads
        record = vqa_answer_record(os.path.basename(os.path.normpath(args.model)))
        decoding = dict(template=args.template, temperature=args.temperature, seed=args.seed)
        with process_group(args.device) as (rank, world, device):  # under torchrun: each rank a share, rank 0 writes
            model, tokenizer = load_model(args.model, device, args.dtype, args.quantize)
            source = answer_source(args.model, model, args.max_new_tokens, **decoding, prompt_format=args.prompt_format,
                                   single_pred_prompt=args.single_pred_prompt, quantize=args.quantize)
            there, new = answer_file(model, tokenizer, items, args.out, record, args.max_new_tokens, args.batch_size,
                                     source=source, **decoding)
        if rank == 0:
            print(f"{args.out}: {there} answers were there, {new} new ({world} process{'es' * (world > 1)})")
    elif args.command == "score":
        result = score(problems, read_answers(args.answers))
        write_json(args.out, result)
        if result["missing"]:
            print(f"{len(result['missing'])} of {result['count']} problems have no answer in {args.answers} (counted "
                  f"wrong), e.g. {', '.join(result['missing'][:5])}")
        print(f"{result['correct']}/{result['count']} correct: {result['acc']:.2f}%")
        print_table({os.path.basename(args.answers): result["table"]})
    elif args.command == "gpt4":
        shots = []
        if args.shots:
            train = load_scienceqa(args.root, "train")
            if args.shots > len(train):
                raise ValueError(f"--shots {args.shots}: the train split has {len(train)} problem(s)")
            shots = [train[pid] for pid in random.Random(0).sample(list(train), args.shots)]
        asked = dict(list(problems.items())[:args.limit])
        failed = gpt4_answers(asked, client, args.out, shots, args.workers)
        return (failed, len(asked), "requests") if failed else None
    else:
        results, rows, asked, failed = ensemble(problems, read_answers(args.answers), read_answers(args.gpt4),
                                                args.mode, client, args.log or args.out + ".log.jsonl", args.workers)
        write_json(args.out, {**summary(problems, results), "mode": args.mode, "rows": rows, "reasked": asked,
                              "failed": failed})
        print_table(rows)
        if args.mode == "judge":
            print(f"{asked} of {len(problems)} problems re-asked (the two answers differed), {failed} failed")
        return (failed, asked, "judge requests") if failed else None


if __name__ == "__main__":
    main()
