"""Build LLaVA's instruction-following data with a text-only GPT-4, as in the paper (Liu et al. 2023, Sec. 3).

A chat model never sees the image: it reads the image's COCO captions and object boxes (the "symbolic
representation") and writes one of three kinds of data from it: a multi-turn conversation, a detailed description,
or a complex-reasoning question and answer. The prompts (a system message and few-shot examples per task) live
under prompts/, laid out as the original's playground/data/prompts, so --prompts also takes the original's. Every
finished (image, task) pair is appended to a JSONL file at once, so a run that costs money and hours can be killed
at any point and resumed without paying twice; --export turns that file into the LLaVA JSON list that data.py
trains on.

    python generate_data.py --captions captions_train2017.json --instances instances_train2017.json \
        --out runs/gen/instruct.jsonl --images 1000 --export runs/gen/llava_instruct.json

Exit status: 0 when every pair of the run was generated, 1 when pairs failed (their reasons are in the failures
file; --retry-failed asks them again) or the key was refused, 3 when --max-cost stopped it, 130 on Ctrl-C (what was
received is on disk).
"""
import argparse
import hashlib
import json
import os
import queue
import random
import re
import sys
import threading

from tqdm import tqdm

from api import APIError, Cancelled, FatalAPIError, client_from_env
from fileio import append_jsonl, read_json, read_jsonl, repair_jsonl, write_text

PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
TASKS = ("conversation", "detail", "complex")
TASK_FOLDERS = {"conversation": "conversation", "detail": "detail_description", "complex": "complex_reasoning"}


# ---------------------------------------------------------------------------------------------------------------------
# COCO annotations -> the text context GPT-4 sees: captions, then one `name: [x1, y1, x2, y2]` line per object
# ---------------------------------------------------------------------------------------------------------------------
def _field(row, key, path, where):
    if not isinstance(row, dict) or key not in row:
        raise ValueError(f"{path}: {where} has no key {key!r}")
    return row[key]


def load_coco(captions_path, instances_path=None):
    """-> {image_id: {"file_name", "width", "height", "captions": [str], "boxes": [(name, x1, y1, x2, y2)]}}"""
    caps = read_json(captions_path)
    images = {}
    for i, row in enumerate(_field(caps, "images", captions_path, "the top level")):
        where = f"images[{i}]"
        images[_field(row, "id", captions_path, where)] = {
            **{key: _field(row, key, captions_path, where) for key in ("file_name", "width", "height")},
            "captions": [], "boxes": []}
    for i, row in enumerate(_field(caps, "annotations", captions_path, "the top level")):
        image_id, where = _field(row, "image_id", captions_path, f"annotations[{i}]"), f"annotations[{i}]"
        if image_id not in images:
            raise ValueError(f"{captions_path}: {where} refers to image_id {image_id} not in 'images'")
        images[image_id]["captions"].append(" ".join(str(_field(row, "caption", captions_path, where)).split()))
    if instances_path:
        inst = read_json(instances_path)
        names = {c["id"]: c["name"] for c in _field(inst, "categories", instances_path, "the top level")}
        for i, row in enumerate(_field(inst, "annotations", instances_path, "the top level")):
            where = f"annotations[{i}]"
            image = images.get(_field(row, "image_id", instances_path, where))
            if image is None:  # instances may cover more images than the caption file: not ours
                continue
            category = _field(row, "category_id", instances_path, where)
            if category not in names:
                raise ValueError(f"{instances_path}: {where} has category_id {category} not in 'categories'")
            x, y, w, h = _field(row, "bbox", instances_path, where)  # COCO boxes are [x, y, width, height] in pixels
            W, H = image["width"], image["height"]
            box = [min(1.0, max(0.0, v)) for v in (x / W, y / H, (x + w) / W, (y + h) / H)]
            image["boxes"].append((names[category], *box))
    return images


def image_context(image, with_boxes):
    """The query: as the original's few-shot contexts write it, boxes rounded to 3 digits and printed as Python
    prints a float ("person: [0.0, 0.24, 0.214, 1.0]")."""
    text = "\n".join(image["captions"])
    if with_boxes and image["boxes"]:
        text += "\n\n" + "\n".join(f"{name}: [{', '.join(str(round(v, 3)) for v in box)}]"
                                    for name, *box in image["boxes"])
    return text


def select_images(images, n, seed):
    """A seeded shuffle of the captioned images, then the first n: the same seed always picks the same images, and a
    larger n keeps the earlier ones (so raising --images on a resumed run only adds work)."""
    ids = sorted(i for i, image in images.items() if image["captions"])
    random.Random(seed).shuffle(ids)
    return ids if n is None else ids[:n]


# ---------------------------------------------------------------------------------------------------------------------
# Prompts, laid out as the original's playground/data/prompts: <folder>/<task folder>/system_message.txt and
# few-shot pairs NNN_caps.txt (a context) + NNN_conv.txt (its reply); and reply parsing
# ---------------------------------------------------------------------------------------------------------------------
def _read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _example_order(stem):  # NNN order: numeric where the stem is a number (9 before 10), by name otherwise
    return (not stem.isdigit(), int(stem) if stem.isdigit() else 0, stem)


def load_task_prompts(folder, task):
    """One task folder -> {"system", "examples": [(context, reply)] in NNN order}; ValueError naming the file."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such folder (the {task} prompts: system_message.txt and NNN_caps.txt + "
                         "NNN_conv.txt pairs)")
    names = set(os.listdir(folder))
    if not names:
        raise ValueError(f"{folder}: empty folder; expected system_message.txt and NNN_caps.txt + NNN_conv.txt pairs")
    if "system_message.txt" not in names:
        raise ValueError(f"{os.path.join(folder, 'system_message.txt')}: missing (the {task} task's system message)")
    caps, conv = ({n[: -len(suffix)] for n in names if n.endswith(suffix)} for suffix in ("_caps.txt", "_conv.txt"))
    unpaired = sorted([(s, "caps", "conv") for s in caps - conv] + [(s, "conv", "caps") for s in conv - caps])
    if unpaired:
        stem, has, lacks = unpaired[0]
        raise ValueError(f"{os.path.join(folder, f'{stem}_{has}.txt')}: has no {stem}_{lacks}.txt beside it")
    if not caps:
        raise ValueError(f"{folder}: no few-shot example (NNN_caps.txt + NNN_conv.txt)")
    examples = []
    for stem in sorted(caps, key=_example_order):
        conv_path = os.path.join(folder, f"{stem}_conv.txt")
        example = (_read_text(os.path.join(folder, f"{stem}_caps.txt")), _read_text(conv_path))
        try:  # an example in a format the replies are not parsed in would fail every pair of the run
            parse_reply(task, example[1], "")
        except ValueError as e:
            raise ValueError(f"{conv_path}: not a {task} reply that this script can parse: {e}") from None
        examples.append(example)
    return {"system": _read_text(os.path.join(folder, "system_message.txt")), "examples": examples}


def load_prompts(folder=PROMPTS, tasks=TASKS):
    """folder/<TASK_FOLDERS[task]>/ for each task, and folder/detail_instructions.txt (one instruction a line; the
    built-in list when the folder has none, as the original's has not). Each task gets a "fingerprint" of what its
    requests and records depend on, which every record keeps."""
    prompts = {task: load_task_prompts(os.path.join(folder, TASK_FOLDERS[task]), task) for task in tasks}
    instructions = os.path.join(folder, "detail_instructions.txt")
    prompts["detail_instructions_file"] = instructions if os.path.exists(instructions) else \
        os.path.join(PROMPTS, "detail_instructions.txt")
    lines = _read_text(prompts["detail_instructions_file"]).splitlines()
    prompts["detail_instructions"] = [line.strip() for line in lines if line.strip()]
    if not prompts["detail_instructions"]:
        raise ValueError(f"{prompts['detail_instructions_file']}: no instruction in it")
    for task in tasks:
        depends = {**prompts[task], "detail_instructions": prompts["detail_instructions"] if task == "detail" else []}
        prompts[task]["fingerprint"] = hashlib.sha256(json.dumps(depends, sort_keys=True).encode()).hexdigest()[:16]
    return prompts


def build_messages(prompt, context):
    """system, then each few-shot example as a user/assistant pair, then the query."""
    messages = [{"role": "system", "content": prompt["system"]}]
    for example_context, example_reply in prompt["examples"]:
        messages += [{"role": "user", "content": example_context}, {"role": "assistant", "content": example_reply}]
    return messages + [{"role": "user", "content": context}]


# a line starting "Question:" or "Answer:"; markdown emphasis around the word ("**Question:**") is tolerated
QA_MARKER = re.compile(r"^\s*[*_#]*[ \t]*(Question|Answer)[ \t]*:[*_]*[ \t]*", re.IGNORECASE | re.MULTILINE)
SEPARATOR = re.compile(r"^[ \t]*===[ \t]*$", re.MULTILINE)  # the original's few-shot replies put "===" between blocks


def parse_qa(reply):
    """'Question: ...' / 'Answer: ...' blocks (each may span lines) -> [(question, answer), ...]; ValueError if not."""
    reply = SEPARATOR.sub("", reply)
    marks = list(QA_MARKER.finditer(reply))
    if not marks or reply[: marks[0].start()].strip():
        raise ValueError("reply does not start with 'Question:'")
    blocks = [(m.group(1).lower(), reply[m.end(): nxt.start() if nxt else len(reply)].strip())
              for m, nxt in zip(marks, marks[1:] + [None])]
    if [kind for kind, _ in blocks] != ["question", "answer"] * ((len(blocks) + 1) // 2):
        raise ValueError("'Question:' and 'Answer:' blocks do not alternate, or the last answer is missing")
    if not all(text for _, text in blocks):
        raise ValueError("an empty question or answer")
    return [(blocks[i][1], blocks[i + 1][1]) for i in range(0, len(blocks), 2)]


def parse_reply(task, reply, instruction):
    """A reply -> LLaVA conversation turns; the first human turn carries <image>. ValueError(reason) if unusable."""
    if task == "detail":
        if QA_MARKER.match(reply):
            raise ValueError("a description was asked for, the reply is a question/answer")
        pairs = [(instruction, reply.strip())]
    else:
        pairs = parse_qa(reply)
        if task == "complex" and len(pairs) != 1:
            raise ValueError(f"expected one question and answer, got {len(pairs)}")
    turns = []
    for question, answer in pairs:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    turns[0]["value"] = "<image>\n" + turns[0]["value"]
    return turns


# ---------------------------------------------------------------------------------------------------------------------
# One (image, task) pair, and the run over all of them
# ---------------------------------------------------------------------------------------------------------------------
def generate_pair(client, prompts, image_id, image, task, seed, parse_retries):
    """-> ("done" | "failed", record). Unusable replies are asked again up to parse_retries times. A refused key
    (401/403) and Cancelled (Ctrl-C) raise; any other error fails this pair only."""
    messages = build_messages(prompts[task], image_context(image, with_boxes=task != "conversation"))
    # the instruction for a description is drawn per image from a seeded generator: reruns and resumes agree
    instruction = random.Random(f"{seed}-{image_id}").choice(prompts["detail_instructions"])
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    record = {"id": f"{os.path.splitext(image['file_name'])[0]}_{task}", "image_id": image_id,
              "image": image["file_name"], "task": task, "model": client.model,
              "prompts": prompts[task]["fingerprint"]}
    content, reason = "", ""
    try:
        for attempt in range(1, parse_retries + 2):
            try:
                reply = client.complete(messages)
            except FatalAPIError as e:
                if e.status in (401, 403):
                    raise
                reason = str(e)
                break
            except APIError as e:
                reason = str(e)
                break
            for key in usage:
                usage[key] += reply["usage"][key]  # retries are paid too
            content, record["model"] = reply["content"], reply["model"]
            if not content.strip():
                reason = "empty reply"
            elif reply["finish_reason"] == "length":
                reason = "reply cut off at max_tokens (finish_reason: length)"
            else:
                try:
                    conversations = parse_reply(task, content, instruction)
                    return "done", {**record, "conversations": conversations, "raw": content, "usage": usage,
                                    "attempts": attempt}
                except ValueError as e:
                    reason = f"unparseable reply: {e}"
    except (FatalAPIError, Cancelled):
        raise
    except Exception as e:  # a reply nobody foresaw, or a bug: this pair fails, every other pair goes on
        reason = f"unexpected error: {type(e).__name__}: {client.scrub(e)[:300]}"
    return "failed", {**record, "reason": reason, "raw": content, "usage": usage}


def cost_of(tokens, args):
    return (tokens["prompt_tokens"] * args.price_in + tokens["completion_tokens"] * args.price_out) / 1e6


def run_pairs(args, client, prompts, images, pairs, failed_path):
    """Runs the pairs on --workers threads -> (counts, tokens, stop), stop None, "budget", "interrupted" or the
    FatalAPIError of a refused key (then, as for the budget, pairs in flight finish and no new one starts).

    The worker that finished a pair appends it to its file at once, under one lock, and counts it there: a reply
    paid for is on disk before anything else can fail, and the budget is checked before the next pair starts.
    Workers are daemon threads and Ctrl-C never waits for them: it stops new pairs, cancels every wait of the
    client and takes the lock (so no line is half written), and the process can exit whatever is in flight."""
    counts, tokens = {"done": 0, "failed": 0}, {"prompt_tokens": 0, "completion_tokens": 0}
    state = {"stop": None, "error": None}
    todo, finished = queue.Queue(), queue.Queue()
    for pair in pairs:
        todo.put(pair)
    halt, lock = threading.Event(), threading.Lock()  # halt: start no new pair

    def work():
        try:
            while not halt.is_set():
                try:
                    image_id, task = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    kind, record = generate_pair(client, prompts, image_id, images[image_id], task, args.seed,
                                                 args.parse_retries)
                except Cancelled:
                    return
                except FatalAPIError as e:
                    state["stop"] = state["stop"] if isinstance(state["stop"], FatalAPIError) else e
                    halt.set()
                    return
                with lock:
                    append_jsonl(args.out if kind == "done" else failed_path, record)
                    counts[kind] += 1
                    for key in tokens:
                        tokens[key] += record["usage"][key]
                    if state["stop"] is None and args.max_cost is not None and cost_of(tokens, args) >= args.max_cost:
                        state["stop"] = "budget"
                        halt.set()
                finished.put((kind, record))
        except Exception as e:  # the output cannot be written (a full disk): stop the run, report it
            state["error"] = state["error"] or e
            halt.set()

    workers = [threading.Thread(target=work, daemon=True) for _ in range(min(args.workers, len(pairs)))]
    bar = tqdm(total=len(pairs), unit="pair", desc="generating", file=sys.stderr)
    try:
        for worker in workers:
            worker.start()
        while any(worker.is_alive() for worker in workers) or not finished.empty():
            try:
                kind, record = finished.get(timeout=0.1)  # a short timeout: Ctrl-C is seen at once
            except queue.Empty:
                continue
            if kind == "failed":
                bar.write(f"failed: {record['id']}: {record['reason']}")
            bar.update()
    except KeyboardInterrupt:
        halt.set()
        client.cancel()
        lock.acquire(timeout=1.0)  # a line being written is finished; no worker writes after this (never released)
        state["stop"] = "interrupted"
    bar.close()
    if state["error"] is not None:
        raise state["error"]
    return dict(counts), dict(tokens), state["stop"]


def export(out_path, export_path):
    """The finished pairs as the LLaVA JSON list [{"id", "image", "conversations"}], sorted, written atomically."""
    data, seen = [], set()
    for record in sorted(read_jsonl(out_path), key=lambda r: (r["image"], TASKS.index(r["task"]))):
        if record["id"] not in seen:
            seen.add(record["id"])
            data.append({"id": record["id"], "image": record["image"], "conversations": record["conversations"]})
    write_text(export_path, json.dumps(data, ensure_ascii=False, indent=1))
    print(f"exported {len(data)} samples to {export_path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--captions", help="COCO captions file (images + annotations with captions)")
    p.add_argument("--instances", help="COCO instances file (boxes + categories); needed for detail and complex")
    p.add_argument("--out", required=True, help="JSONL of finished pairs; re-running with it resumes")
    p.add_argument("--failed", help="JSONL of failed pairs with reasons (default: OUT with .failed.jsonl)")
    p.add_argument("--retry-failed", action="store_true", help="try the pairs in the failures file again")
    p.add_argument("--export", help="write the finished pairs as a LLaVA JSON list to this file")
    p.add_argument("--images", type=int, help="how many images (default: all captioned images)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    p.add_argument("--seed", type=int, default=0, help="image selection and detail instructions")
    p.add_argument("--prompts", default=PROMPTS,
                   help="folder laid out as the original's playground/data/prompts: conversation/,\n"
                        "detail_description/, complex_reasoning/ (default: the built-in prompts/)")
    p.add_argument("--base-url", default="https://api.openai.com/v1", help="any OpenAI-compatible server")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--model", default="gpt-4o")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds one HTTP attempt may take, from sending the request to the reply's last byte,\n"
                        "checked as the body arrives (a server trickling its reply times out too; while waiting\n"
                        "for the status line and headers, each read is bounded by the same number); a timed-out\n"
                        "attempt is retried, and one request, retries and waits included, gives up after 5 x this")
    p.add_argument("--max-retries", type=int, default=6, help="HTTP retries on 429/5xx/timeouts/dropped connections")
    p.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds, doubled per retry")
    p.add_argument("--max-wait", type=float, default=120.0,
                   help="longest wait before a retry; a server asking for more (Retry-After) fails the pair")
    p.add_argument("--parse-retries", type=int, default=2, help="new requests for empty/cut-off/unparseable replies")
    p.add_argument("--workers", type=int, default=4, help="requests in flight")
    p.add_argument("--rpm", type=float, help="at most this many requests per minute")
    p.add_argument("--price-in", type=float, default=2.5, help="$ per million prompt tokens (set for your model)")
    p.add_argument("--price-out", type=float, default=10.0, help="$ per million completion tokens")
    p.add_argument("--max-cost", type=float, help="stop starting requests once this run has spent this many $")
    p.add_argument("--dry-run", action="store_true", help="print the prompts for the first image; no key, no network")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks or set(tasks) - set(TASKS):
        p.error(f"--tasks must be a comma-separated subset of {','.join(TASKS)}, got {args.tasks!r}")
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    if not re.match(r"https?://", args.base_url):
        p.error(f"--base-url must start with http:// or https://, got {args.base_url!r}")
    if not args.captions:
        if not args.export:
            p.error("--captions is required (or only --out and --export to export)")
        export(args.out, args.export)
        return 0
    if args.instances is None and set(tasks) - {"conversation"}:
        p.error("--instances is required for the detail and complex tasks (they use the object boxes)")
    failed_path = args.failed or re.sub(r"(\.jsonl)?$", ".failed.jsonl", args.out, count=1)
    try:
        images, prompts = load_coco(args.captions, args.instances), load_prompts(args.prompts, tasks)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    selected = select_images(images, args.images, args.seed)
    if args.dry_run:
        if not selected:
            raise SystemExit("error: no image with captions")
        for task in tasks:
            image = images[selected[0]]
            messages = build_messages(prompts[task], image_context(image, with_boxes=task != "conversation"))
            print(f"===== {task}: image {selected[0]} ({image['file_name']}), {len(messages)} messages =====")
            for m in messages:
                print(f"--- {m['role']} ---\n{m['content']}")
        return 0
    try:
        client = client_from_env(args.base_url, args.api_key_env, args.model, temperature=args.temperature,
                                 max_tokens=args.max_tokens, timeout=args.timeout, max_retries=args.max_retries,
                                 rpm=args.rpm, backoff=args.backoff, max_wait=args.max_wait)
    except ValueError as e:  # the message names the variable, never the key
        raise SystemExit(f"error: {e}; set it to your API key") from None
    # resume: cut a torn last line (a crash mid-write), then skip every pair already finished or failed
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    try:
        records = repair_jsonl(args.out)
        done = {(r["image_id"], r["task"]) for r in records}
        failures = repair_jsonl(failed_path)
        failed_before = {(r["image_id"], r["task"]) for r in failures}
        # the data of one file comes from one set of prompts: a run with others would mix them
        other = [r for r in records if r["task"] in tasks and r.get("prompts") != prompts[r["task"]]["fingerprint"]]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    except (KeyError, TypeError):
        raise SystemExit(f"error: {args.out} or {failed_path} holds records that this script did not write") from None
    if other:
        r = other[0]
        raise SystemExit(f"error: {args.out}: holds records made with other prompts than {args.prompts} ({len(other)}; "
                         f"{r['id']}: prompts {r.get('prompts')} there, {prompts[r['task']]['fingerprint']} now); "
                         "generate into another --out, or use the prompts that made them")
    wanted = {(i, t) for i in selected for t in tasks}
    if args.retry_failed and any((r["image_id"], r["task"]) in wanted for r in failures):
        failures = [r for r in failures if (r["image_id"], r["task"]) not in wanted]
        write_text(failed_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in failures))
        failed_before -= wanted
    skip = done | failed_before
    pairs = [(i, t) for i in selected for t in tasks if (i, t) not in skip]
    print(f"prompts: {args.prompts} (detail instructions: {prompts['detail_instructions_file']})")
    print(f"{len(wanted)} pairs requested: {len(wanted & done)} already done, {len(wanted & skip) - len(wanted & done)}"
          f" failed before, {len(pairs)} to generate with {args.model} at {args.base_url}")
    try:
        counts, tokens, stop = run_pairs(args, client, prompts, images, pairs, failed_path)
    except OSError as e:  # the output could not be written
        raise SystemExit(f"error: {e}") from None
    left = len(pairs) - counts["done"] - counts["failed"]
    print(f"this run: {counts['done']} done, {counts['failed']} failed (see {failed_path}), {left} left; tokens "
          f"{tokens['prompt_tokens']} in + {tokens['completion_tokens']} out = ${cost_of(tokens, args):.4f} "
          f"at ${args.price_in}/${args.price_out} per 1M")
    if isinstance(stop, FatalAPIError):
        print(f"error: stopped, the server refused the key: {stop}\nfix the key and re-run the same command to resume",
              file=sys.stderr)
        return 1
    if stop == "interrupted":
        print(f"interrupted: every reply received is in {args.out} or {failed_path}; re-run the same command to "
              "resume", file=sys.stderr)
        return 130
    if stop == "budget":
        print(f"stopped: --max-cost ${args.max_cost} reached; re-run the same command to continue", file=sys.stderr)
    if counts["failed"]:  # as every command that talks to an API: failed requests are an error
        print(f"error: {counts['failed']} of {counts['done'] + counts['failed']} pairs of this run failed; the reasons "
              f"are in {failed_path}; --retry-failed asks them again", file=sys.stderr)
    if args.export:
        export(args.out, args.export)
    return 1 if counts["failed"] else 3 if stop == "budget" else 0


if __name__ == "__main__":
    sys.exit(main())
