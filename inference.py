"""Answering questions with a LLaVA checkpoint: load (optionally with int8 weights), render the prompt exactly as
training did, generate greedily through the KV cache, decode.

The demo's held-out scoring, evaluate.py and scienceqa.py answer through here, so every mode asks the model the
same way: one question at a time (`answer`), or many at once (`answer_batches`: batches of similar prompt lengths,
spread over the processes of a torchrun launch) with `answer_file` keeping a resumable JSONL answer file.

    torchrun --nproc_per_node 4 evaluate.py mc --questions q.jsonl --out runs/eval/mc   # 4 GPUs, rank 0 writes
"""
import json
import os
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist
from tqdm import tqdm

from clip import load_image, preprocess
from data import render
from fileio import append_jsonl, repair_jsonl, write_text
from llama import Tokenizer
from llava import LLaVA

DTYPES = ("float32", "bfloat16", "float16")  # load_model's dtype choices


def default_batch_size(device) -> int:
    return 32 if str(device).startswith("cuda") else 8  # a CPU's matmuls stop gaining from more rows sooner


def load_model(path, device=None, dtype=None, quantize=None):
    """(model, tokenizer) from a checkpoint folder; bf16 on CUDA, fp32 elsewhere unless dtype names one.
    quantize="int8": the LLM (embeddings, decoder blocks, lm_head) and the projector get int8 weights, ~1/4 of
    their fp32 memory; the vision tower and the norms stay as loaded (quantize.py)."""
    if dtype not in (None, *DTYPES):
        raise ValueError(f"dtype={dtype!r} is not supported; known: {', '.join(DTYPES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    model = LLaVA.from_pretrained(path, device=device, dtype=dtype, quantize=quantize).eval()
    return model, Tokenizer(path)


def prompt_ids(model, tokenizer, question, image_path=None) -> list:
    """The single-turn prompt, token-for-token what training rendered for the same human turn."""
    cfg = model.config
    text = "<image>\n" + question if image_path is not None else question
    return render([{"from": "human", "value": text}], cfg.template, tokenizer, cfg.num_image_tokens,
                  for_generation=True)[0]


def pixel_values(model, image_path):
    """(1, 3, S, S) on the tower's device and dtype, or None without an image."""
    if image_path is None:
        return None
    cfg, weight = model.config, next(model.vision_tower.parameters())
    return preprocess(load_image(image_path), cfg.image_size, pad_to_square=cfg.image_aspect_ratio == "pad").to(
        weight.device, weight.dtype)


def reply_text(tokenizer, tokens) -> str:
    return tokenizer.decode(tokens[:-1] if tokens and tokens[-1] == tokenizer.eos_id else tokens).strip()


@torch.no_grad()
def answer(model, tokenizer, question, image_path=None, max_new_tokens=128):
    """Greedy single-turn answer (batch 1)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(model, tokenizer, question, image_path)], dtype=torch.long, device=device)  # (1, T)
    model.llm.setup_cache(1, ids.shape[1] + max_new_tokens, device=device, dtype=model.llm.norm.weight.dtype)
    out = list(model.generate(ids, pixel_values(model, image_path), max_new_tokens=max_new_tokens,
                              eos_id=tokenizer.eos_id))
    model.llm.reset_cache()  # a 7B cache is ~0.5 MB per position: do not keep it between questions
    return reply_text(tokenizer, out)


def answer_fn(model, tokenizer, max_new_tokens):
    """item {"text", "image_path"} -> reply: the form evaluate.py's modes take (tests pass their own)."""
    return lambda item: answer(model, tokenizer, item["text"], item.get("image_path"), max_new_tokens)


# -------------------------------------------------------------------------------------- many questions, many ranks

@contextmanager
def distributed(device=None):
    """(rank, world size, device) for the block. Under torchrun (RANK set) this process joins the process group,
    nccl on CUDA (each rank on GPU LOCAL_RANK) and gloo on CPU, and leaves it at the end; else a single process."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        yield 0, 1, device
        return
    cuda = str(device).startswith("cuda")
    if cuda:
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), device
    finally:
        dist.destroy_process_group()


@torch.no_grad()
def answer_batches(model, tokenizer, items, max_new_tokens=128, batch_size=None):
    """Yields [(item, reply), ...] a batch at a time; replies equal answer()'s (greedy, the same prompts).

    Items are sorted by prompt length, longest first, so that a batch wastes little padding and the first batch
    sets up the largest KV cache, which the others reuse (llama.generate_batch). Under torchrun each rank answers
    every world-th item of that order and the answers are gathered to rank 0 after each batch: rank 0 yields all
    ranks' answers, the other ranks empty lists (every rank runs the same number of rounds)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    batch_size = batch_size or default_batch_size(next(model.parameters()).device)
    device = model.llm.norm.weight.device
    prompts = [prompt_ids(model, tokenizer, item["text"], item.get("image_path")) for item in items]
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))  # stable: ties keep the items' order
    mine = order[rank::world]
    rounds = -(-len(order[::world]) // batch_size)  # rank 0 has the most items
    try:
        for start in range(0, rounds * batch_size, batch_size):
            batch = mine[start:start + batch_size]
            out = model.generate_batch([(torch.tensor(prompts[i], device=device),
                                         pixel_values(model, items[i].get("image_path"))) for i in batch],
                                       max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id) if batch else []
            answered = [(i, reply_text(tokenizer, tokens)) for i, tokens in zip(batch, out)]
            if world > 1:
                gathered = [None] * world if rank == 0 else None
                dist.gather_object(answered, gathered, dst=0)
                answered = [pair for part in gathered for pair in part] if rank == 0 else []
            yield [(items[i], reply) for i, reply in answered]
    finally:
        model.llm.reset_cache()


def answer_file(model, tokenizer, items, out_path, record, max_new_tokens=128, batch_size=None):
    """Answer every item whose question_id is not yet in the JSONL file out_path and append record(item, reply)
    for each, a batch at a time, so that an interrupted run asks nothing twice (a torn last line is cut first).
    At the end the file is rewritten in the items' order, so it reads as a batch-1 run wrote it. Under torchrun
    only rank 0 reads and writes the file, and tells the others what is left to do. Returns (answers that were
    there, new answers) on rank 0, (0, 0) elsewhere."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    done = [{r.get("question_id") for r in repair_jsonl(out_path)}] if rank == 0 else [None]
    if dist.is_initialized():
        dist.broadcast_object_list(done, src=0)
    todo = [item for item in items if item["question_id"] not in done[0]]
    new, bar = 0, tqdm(total=len(todo), desc=os.path.basename(out_path), disable=rank != 0 or not todo)
    for batch in answer_batches(model, tokenizer, todo, max_new_tokens, batch_size):
        for item, reply in batch:
            append_jsonl(out_path, record(item, reply))
        new += len(batch)
        bar.update(len(batch))
    bar.close()
    if rank == 0 and new:
        records = repair_jsonl(out_path)
        place = {item["question_id"]: n for n, item in enumerate(items)}
        records.sort(key=lambda r: place.get(r.get("question_id"), len(items)))  # stable: others keep their order
        write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return (len(done[0]), new) if rank == 0 else (0, 0)


def tally(rows):
    """(category, correct, unparsed) rows -> {"all" | category: {"correct", "total", "unparsed", "accuracy" (%)}}."""
    stats = defaultdict(lambda: {"correct": 0, "total": 0, "unparsed": 0})
    for category, correct, unparsed in rows:
        for key in {"all", category}:
            stats[key]["total"] += 1
            stats[key]["correct"] += bool(correct)
            stats[key]["unparsed"] += bool(unparsed)
    for s in stats.values():
        s["accuracy"] = 100.0 * s["correct"] / s["total"]
    return dict(stats)
