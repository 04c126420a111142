"""Evaluate a LLaVA checkpoint the way the paper does. All modes answer through the KV cache with the prompt
data.render gives training for the same human turn (in the checkpoint's template or --template), greedily unless
--temperature is above 0, --batch-size questions at a time (inference.py); under `torchrun --nproc_per_node N
evaluate.py ...` each process answers a share and rank 0 writes the files.

  judge  LLaVA-Bench: a text-only GPT-4 judge scores a reference answer and the model's answer 1-10 from the
         image's captions (and boxes); relative score = mean(model) / mean(reference) x 100. With --rules, LLaVA's
         rule.json and the request exactly as llava/eval/eval_gpt_review_bench.py wraps it.
  mc     ScienceQA-style multiple choice ("A. ..." options, answer with the letter): accuracy.
  demo   the demo's held-out questions (runs/demo/data/eval.json): exact-match accuracy.
"""
import argparse
import hashlib
import json
import os
import re
import sys
from collections import defaultdict

from api import APIError, ask_all, client_from_env, client_source, complete_or_none
from demo import demo_items, score_demo
from distributed import process_group
from fileio import (append_jsonl, check_unique, inside, number, read_json, read_jsonl, read_records, require,
                    require_id, resume_jsonl, write_json)
from data import get_template
from inference import DTYPES, answer_batches, answer_file, answer_source, load_model, tally
from quantize import QUANTIZE

# -----------------------------------------------------------------------------------------------------------------
# answering with the model


def answer_record(model_id):
    """record(item, text) for answers.jsonl and references.jsonl: {question_id, prompt, text, model_id}."""
    return lambda item, text: {"question_id": item["question_id"], "prompt": item["text"], "text": text,
                               "model_id": model_id}


def model_answers(args, items, model, tokenizer):
    """({question_id: reply} on rank 0 ({} on the others), batched, and what produced them); mc and judge keep them
    in the resumable answers.jsonl with that record beside it, the demo mode only in memory (keyed by the item
    itself: its ids need not be unique)."""
    decoding = dict(template=args.template, temperature=args.temperature, seed=args.seed)
    if args.mode == "demo":
        batches = answer_batches(model, tokenizer, items, args.max_new_tokens, args.batch_size, **decoding)
        return {id(item): reply for batch in batches for item, reply in batch}, None
    path = os.path.join(args.out, "answers.jsonl")
    # the mode is the prompt: mc adds the options and MC_INSTRUCTION to the question
    source = answer_source(args.model, model, args.max_new_tokens, **decoding, mode=args.mode, quantize=args.quantize)
    there, new = answer_file(model, tokenizer, items, path, answer_record("llava"), args.max_new_tokens,
                             args.batch_size, source=source, **decoding)
    return ({r["question_id"]: r["text"] for r in read_jsonl(path)} if there + new else {}), source


# -----------------------------------------------------------------------------------------------------------------
# multiple-choice mode (ScienceQA)

LETTERS = "ABCDEFGHIJ"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."  # LLaVA's ScienceQA prompt


def mc_prompt(item):
    context = f"Context: {item['context']}\n" if item.get("context") else ""
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(item["choices"]))
    return f"{context}{item['question']}\n{options}\n{MC_INSTRUCTION}"


def answer_index(answer, n_choices, where):
    """The gold answer as an index: an int or a letter."""
    letter = answer.strip().upper() if isinstance(answer, str) else ""
    index = answer if isinstance(answer, int) else LETTERS.find(letter) if len(letter) == 1 else -1
    if not 0 <= index < n_choices:
        raise ValueError(f"{where}: answer {answer!r} is not an index or letter of its {n_choices} choices")
    return index


def parse_choice(text, choices):
    """The chosen option's index from a model reply, or None. Accepts "B", "B.", "(B) ...", "B) ...",
    "The answer is B.", "Answer: B", or the text of one option exactly."""
    text = text.strip()
    valid = LETTERS[:len(choices)]
    # a lone letter in any case; else an upper-case letter standing as a letter, closed by ").:," or the end (so
    # the article in "A cat." or "Answer: A dog" is no answer)
    patterns = (r"(?i:\(?([A-J])\)?\.?)$", r"\(?([A-J])(?:[).:,]|$)",
                r"(?i:.*\banswer(?: is)?)\s*:?\s*\(?([A-J])(?:[).:,]|$)")
    for pattern in patterns:
        match = re.match(pattern, text)
        if match and match.group(1).upper() in valid:
            return valid.index(match.group(1).upper())
    lowered = [c.strip().lower() for c in choices]
    return lowered.index(text.rstrip(".").lower()) if text.rstrip(".").lower() in lowered else None


def image_file(folder, name, where):
    """folder/name, kept inside folder; it must exist: a missing image is found before the model loads."""
    path = inside(folder, name, where)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: image {path} not found")
    return path


def mc_items(path, image_folder):
    items = []
    for n, record in enumerate(read_records(path)):
        where = f"{path}, item {n}"
        choices, _ = require(record, "choices", where), require(record, "question", where)
        if not isinstance(choices, list) or not 1 <= len(choices) <= len(LETTERS):
            raise ValueError(f"{where}: 'choices' must be a list of 1 to {len(LETTERS)} options (letters A-J), got "
                             f"{choices!r:.200}")
        items.append({"question_id": require_id(record, "id", where), "text": mc_prompt(record), "choices": choices,
                      "gold": answer_index(require(record, "answer", where), len(choices), where),
                      "category": record.get("subject") or record.get("category") or "all",
                      "image_path": image_file(image_folder, record["image"], where) if record.get("image") else None})
    check_unique([item["question_id"] for item in items], path)
    return items


def score_mc(items, predictions):
    """Accuracy overall and per category from {question_id: reply}; an unparseable reply counts as wrong."""
    choices = [parse_choice(predictions[item["question_id"]], item["choices"]) for item in items]
    return tally((item["category"], choice == item["gold"], choice is None) for item, choice in zip(items, choices))


# -----------------------------------------------------------------------------------------------------------------
# judge mode (LLaVA-Bench)

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."  # the original's
BOXES = "object bounding boxes (x1, y1, x2, y2) with coordinates from 0 to 1 (top left, bottom right)"
JUDGE_RULE = (
    "We would like your feedback on the performance of two AI assistants answering the user question above. The user "
    f"asked it while looking at an image you cannot see: the context above describes it by captions and {BOXES} "
    "when given.\nRate the helpfulness, relevance, accuracy and level of detail of each response. Each assistant "
    "receives an overall score from 1 to 10; higher is better.\nFirst output a single line with only the two scores, "
    "for Assistant 1 and Assistant 2 in that order, separated by a space. From the next line on, explain your "
    "evaluation without bias, making sure the order in which the responses came does not affect your judgment.")
REFERENCE_SYSTEM = (
    "You are an AI visual assistant. You cannot see the image the user asks about, but you are given its description:"
    f" captions and {BOXES} when given. Answer the user's question as if you were looking at the image; do not "
    "mention the description.")
BUILT_IN_RULE = {"role": "Assistant", "prompt": JUDGE_RULE}
RULE_PREFIX = "llava_bench_"  # eval_gpt_review_bench.py judges a question by rule.json["llava_bench_" + category]
PUBLISHED_JUDGE = "gpt-4-0314"  # the model eval_gpt_review_bench.py asks


def caption_text(record):
    """The captions (key "caption" or "captions"): a string as it is, a list one per line, as the original joins
    them."""
    captions = record.get("captions", record.get("caption", ""))
    return captions if isinstance(captions, str) else "\n".join(captions)


def context_text(record):
    """The built-in rule's context: the captions and "category: [x1, y1, x2, y2]" box lines."""
    boxes = "\n".join(f"{box['category']}: {box['bbox']}" for box in record.get("instances", []))
    return f"{caption_text(record)}\n\n{boxes}" if boxes else caption_text(record)


def load_rules(path, items):
    """{category: {"role", "prompt"}} for the items' categories, from a file in LLaVA's rule.json format
    ({"llava_bench_conv": {"role": "Assistant", "prompt": "..."}, ...}, keyed as eval_gpt_review_bench.py keys it).
    A category without its key, or a rule without a string role and prompt, is an error naming the file and key."""
    rules = read_json(path)
    if not isinstance(rules, dict):
        raise ValueError(f"{path}: must be a JSON object {{key: {{\"role\", \"prompt\"}}}}, as LLaVA's rule.json")
    chosen = {}
    for item in items:
        key = RULE_PREFIX + str(item["category"])
        if key not in rules:
            raise ValueError(f"{path}: no rule {key!r} (for question_id {item['question_id']!r}, category "
                             f"{item['category']!r}); the file has {', '.join(map(repr, rules)) or 'none'}")
        rule = rules[key]
        for field in ("role", "prompt"):
            if not isinstance(rule, dict) or not isinstance(rule.get(field), str):
                raise ValueError(f"{path}: rule {key!r} has no string {field!r}")
        chosen[item["category"]] = {"role": rule["role"], "prompt": rule["prompt"]}
    return chosen


def judge_prompt(context, question, reference, prediction, rule=BUILT_IN_RULE):
    """The judge's request, wrapped as eval_gpt_review_bench.py wraps it. The reference is answer 1 and the model
    answer 2, as in LLaVA's review files ("tuple": [reference, model])."""
    role = rule["role"]
    return (f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
            f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{prediction}\n\n[End of {role} 2]\n\n[System]\n{rule['prompt']}\n\n")


def parse_scores(reply):
    """The two 1-10 scores on the reply's first non-empty line, or None. Tolerates "8 7", "8, 7", "8/10 7/10",
    "Assistant 1: 8 Assistant 2: 7", "**8 7**". A sign is read with its number, so "-5 8" is out of range, not 5."""
    line = next((l for l in reply.splitlines() if l.strip()), "")
    line = re.sub(r"assistant\s*[12]", " ", line, flags=re.IGNORECASE)
    line = re.sub(r"/\s*10\b", " ", line)
    numbers = [float(x) for x in re.findall(r"[-+]?\d+(?:\.\d+)?", line)]
    return numbers if len(numbers) == 2 and all(1 <= x <= 10 for x in numbers) else None


def judge_items(questions_path, context_path, image_folder):
    """Items with the captions (what a rule.json judge sees) and the context (captions and boxes: the built-in's)."""
    contexts = {require(record, "image", f"{context_path}, line {n + 1}"): record
                for n, record in enumerate(read_records(context_path))}
    items = []
    for n, record in enumerate(read_records(questions_path)):
        where = f"{questions_path}, line {n + 1}"
        name = require(record, "image", where)
        if name not in contexts:
            raise ValueError(f"{where}: image {name!r} has no entry in {context_path}")
        items.append({"question_id": require_id(record, "question_id", where), "text": require(record, "text", where),
                      "category": record.get("category", "all"), "context": context_text(contexts[name]),
                      "captions": caption_text(contexts[name]),
                      "image_path": image_file(image_folder, name, where)})
    check_unique([item["question_id"] for item in items], questions_path)
    return items


def reference_answers(items, path, client=None, out_path=None):
    """Reference answers from a JSONL file ({question_id, text}), or generated by the text-only model (client)
    from each question's context into out_path (resumable; an APIError counts the requests that failed, after the
    others are kept)."""
    if path is not None:
        refs = {require(r, "question_id", f"{path}, line {n + 1}"): require(r, "text", f"{path}, line {n + 1}")
                for n, r in enumerate(read_records(path))}
        missing = [item["question_id"] for item in items if item["question_id"] not in refs]
        if missing:
            raise ValueError(f"{path}: no reference answer for question_id {missing[0]!r} ({len(missing)} missing)")
        return refs

    def ask(item):
        messages = [{"role": "system", "content": REFERENCE_SYSTEM},
                    {"role": "user", "content": f"{item['context']}\n\n{item['text']}"}]
        reply = complete_or_none(client, messages, f"reference for question_id {item['question_id']!r}")
        return None if reply is None else reply.strip()
    _, _, failed = ask_all(items, ask, out_path, answer_record(client.model), client_source(client),
                           cancel=client.cancel)
    if failed:
        raise APIError(f"{out_path}: {failed} of {len(items)} reference answers failed (the warnings above say why); "
                       "the others are kept, and the same command asks the failed ones again")
    refs = {r["question_id"]: r["text"] for r in read_jsonl(out_path)}
    return {item["question_id"]: refs[item["question_id"]] for item in items}


def review_all(items, references, predictions, client, out_path, source, retries=2, rules=None):
    """Asks the judge about every item without a successful review in out_path. A reply without two scores is
    retried `retries` times, then recorded with "tuple": null and "failed": true (retried again on the next run).
    source: what the answers, references and rules came from; with the judge's settings it is what the reviews
    depend on, and reviews of other answers, references, rules or judges are refused (fileio.resume_jsonl).
    rules: load_rules' {category: rule}, judged from the captions alone as eval_gpt_review_bench.py does; None:
    the built-in rule, from captions and boxes."""
    reviewed = {r["question_id"] for r in resume_jsonl(out_path, client_source(client, **source)) if r.get("tuple")}
    for item in (item for item in items if item["question_id"] not in reviewed):
        qid = item["question_id"]
        context, rule = (item["captions"], rules[item["category"]]) if rules else (item["context"], BUILT_IN_RULE)
        content = judge_prompt(context, item["text"], references[qid], predictions[qid], rule)
        for attempt in range(retries + 1):
            try:
                reply = client.complete([{"role": "system", "content": JUDGE_SYSTEM},
                                         {"role": "user", "content": content}])["content"]
            except APIError as e:  # retries used up or a refused request: record it; a refused key stops the run
                if getattr(e, "status", None) in (401, 403):
                    raise
                reply = f"API error: {e}"
            scores = parse_scores(reply)
            if scores is not None:
                break
        append_jsonl(out_path, {"question_id": qid, "category": item["category"], "content": reply, "tuple": scores,
                                "failed": scores is None, "attempts": attempt + 1})
    wanted = {item["question_id"] for item in items}  # the file may hold reviews of questions no longer asked
    return [r for r in read_jsonl(out_path) if r["question_id"] in wanted]


def summarize_reviews(reviews):
    """Per category and "all": mean reference and model scores, relative score = mean(model) / mean(ref) x 100.
    The last record of a question_id wins (a failed review retried later is replaced)."""
    groups = defaultdict(list)
    for r in {r["question_id"]: r for r in reviews}.values():
        for key in {"all", r["category"]}:
            groups[key].append(r["tuple"])
    summary = {}
    for key, tuples in sorted(groups.items()):
        scored = [t for t in tuples if t]
        summary[key] = s = {"n": len(scored), "failed": len(tuples) - len(scored)}
        if scored:
            s["reference"], s["model"] = (sum(t[i] for t in scored) / len(scored) for i in (0, 1))
            s["relative"] = 100.0 * s["model"] / s["reference"]
    return summary


# -----------------------------------------------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true", help="same as the demo subcommand")
    sub = parser.add_subparsers(dest="mode")
    modes = {name: sub.add_parser(name) for name in ("demo", "mc", "judge")}
    for name, p in modes.items():
        p.add_argument("--model", default="runs/demo/stage2", help="checkpoint directory (with tokenizer.model)")
        p.add_argument("--device", default=None)
        p.add_argument("--dtype", default=None, choices=DTYPES, help="default: bf16 on CUDA, fp32 elsewhere")
        # judge: model_vqa.py's 1024, as LLaVA-Bench was answered
        p.add_argument("--max-new-tokens", type=number(), default={"demo": 16, "mc": 16, "judge": 1024}[name])
        p.add_argument("--batch-size", type=number(), default=None, help="questions at a time (default 8 CPU, 32 CUDA)")
        p.add_argument("--quantize", choices=QUANTIZE, help="int8 weights for the LLM and projector (small machines)")
        p.add_argument("--template", default=None, help="conversation template (the original's --conv-mode), e.g. "
                       "vicuna_v1; default: the checkpoint's")
        p.add_argument("--temperature", type=number(float, low=0), default=0.0, help="0 (default): greedy")
        p.add_argument("--seed", type=number(int, low=0), default=0, help="sampling seed (+ rank)")
        p.add_argument("--out", default=f"runs/eval/{name}", help="output folder (answers, reviews, summary)")
    modes["demo"].add_argument("--data", default="runs/demo/data", help="folder with eval.json and images/")
    modes["demo"].add_argument("--limit", type=number(), default=None)
    for name in ("mc", "judge"):
        modes[name].add_argument("--questions", required=True)
        modes[name].add_argument("--images", default=".", help="folder the image paths are relative to")
    judge = modes["judge"]
    judge.add_argument("--context", required=True, help="context JSONL: image, caption(s), instances (boxes)")
    judge.add_argument("--references", default=None, help="reference answers JSONL; default: generate them")
    judge.add_argument("--base-url", default="https://api.openai.com/v1")
    judge.add_argument("--api-key-env", default="OPENAI_API_KEY")
    judge.add_argument("--judge-model", default="gpt-4", help=f"the published scores: {PUBLISHED_JUDGE}")
    judge.add_argument("--rules", default=None, help="LLaVA's llava/eval/table/rule.json (or a file in its format): "
                       "judge as the published scores were; default: this project's rule, not comparable with them")
    judge.add_argument("--reference-model", default=None, help="text-only model for references (default: judge's)")
    judge.add_argument("--judge-max-tokens", type=number(), default=1024)
    judge.add_argument("--retries", type=number(low=0), default=2, help="re-asks for a judge reply without two scores")
    judge.add_argument("--max-wait", type=number(float, low=0), default=120.0,
                       help="longest wait before an HTTP retry; a server asking for more (Retry-After) fails it")
    args = parser.parse_args(argv)
    if args.mode is None:  # no subcommand (with or without --demo): the demo, with its defaults
        args = parser.parse_args(["demo"])
    if not os.path.isdir(args.model):
        sys.exit(f"error: no checkpoint folder {args.model} (the demo's: train it first, run `python train.py`)")
    # read the inputs (and the judge's key) before spending minutes on loading the model
    judge_client = ref_client = rules = None
    try:
        if args.template is not None:
            get_template(args.template)  # an unknown name is refused before the model loads
        if args.mode == "demo":
            items = demo_items(args.data, args.limit)
        elif args.mode == "mc":
            items = mc_items(args.questions, args.images)
        else:
            items = judge_items(args.questions, args.context, args.images)
            rules = load_rules(args.rules, items) if args.rules else None
            # temperature 0.2: LLaVA's review script; low for the references too, so reruns vary little
            settings = dict(temperature=0.2, max_tokens=args.judge_max_tokens, max_wait=args.max_wait)
            judge_client = client_from_env(args.base_url, args.api_key_env, args.judge_model, **settings)
            if not args.references:
                ref_client = client_from_env(args.base_url, args.api_key_env,
                                             args.reference_model or args.judge_model, **settings)
    except (OSError, ValueError) as e:  # the errors name the file and row, or the key's variable (never the key)
        sys.exit(f"error: {e}")
    os.makedirs(args.out, exist_ok=True)
    try:
        # torchrun: one group, each rank on its device, left once answered (the others would wait out the judging)
        with process_group(args.device) as (rank, _, device):
            model, tokenizer = load_model(args.model, device, args.dtype, args.quantize)
            predictions, source = model_answers(args, items, model, tokenizer)
        if rank != 0:  # the others only answered: rank 0 judges, scores and writes
            return
        summary = run(args, items, predictions, source, judge_client, ref_client, rules)
    except KeyboardInterrupt:  # every answer and review so far is on disk (appended as it came)
        print(f"\ninterrupted: what was answered so far is in {args.out}; re-run the same command to continue",
              file=sys.stderr)
        sys.exit(130)
    except (OSError, ValueError, APIError) as e:  # a checkpoint, an answer file or a request; named in the message
        sys.exit(f"error: {e}")
    write_json(os.path.join(args.out, "summary.json"), summary, indent=1)  # never half-written
    failed = summary.get("all", {}).get("failed", 0) if args.mode == "judge" else 0
    if failed:
        sys.exit(f"error: {failed} of {failed + summary['all']['n']} reviews failed (no two scores, or the request "
                 f"failed: {os.path.join(args.out, 'reviews.jsonl')}); the same command asks them again")


def run(args, items, predictions, source, judge_client, ref_client, rules=None):
    """(Judge,) print and return the summary of the model's answers {question_id: reply} (demo: {id(item): reply})
    that `source` produced (model_answers); a judge's summary says who judged, by which rules, in "judged_by"."""
    if args.mode in ("demo", "mc"):
        if args.mode == "demo":
            summary = score_demo(items, lambda item: predictions[id(item)])
        else:
            summary = score_mc(items, predictions)
        for key, s in sorted(summary.items()):
            print(f"{key:>24}: {s['accuracy']:5.1f}% ({s['correct']}/{s['total']}, {s['unparsed']} unparseable)")
    else:
        references = reference_answers(items, args.references, ref_client, os.path.join(args.out, "references.jsonl"))
        # the rules by file and digest: reviews by other rule texts are not continued (the texts go in the summary)
        used = {"file": os.path.abspath(args.rules), "sha256": hashlib.sha256(
            json.dumps(rules, sort_keys=True).encode()).hexdigest()} if rules else "built-in"
        inputs = {"answers": source, "references": os.path.abspath(args.references) if args.references
                  else client_source(ref_client), "rules": used}
        reviews = review_all(items, references, predictions, judge_client, os.path.join(args.out, "reviews.jsonl"),
                             inputs, args.retries, rules)
        summary = summarize_reviews(reviews)
        for key, s in summary.items():
            scores = f"reference {s['reference']:.2f}, model {s['model']:.2f}, relative {s['relative']:.1f}%" \
                if s["n"] else "no scored reviews"
            print(f"{key:>12}: {scores} (n={s['n']}, failed={s['failed']})")
        summary["judged_by"] = {**client_source(judge_client), "rules": used}
        if rules:
            summary["judged_by"]["rule_texts"] = rules
        print(f"judged by {judge_client.model} with {args.rules or 'the built-in rule'}")
        if not rules:
            print("note: the built-in rule is this project's, not LLaVA's rule.json: these relative scores are not "
                  "comparable with published ones (judge with --rules llava/eval/table/rule.json for that)")
        elif judge_client.model != PUBLISHED_JUDGE:
            print(f"note: the published scores were judged by {PUBLISHED_JUDGE}; another judge scores differently")
    return summary


if __name__ == "__main__":
    main()
