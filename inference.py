"""The inference engine: load a checkpoint, render prompts exactly as training did, generate through the KV cache,
decode. One prompt at a time (`generate_llava`, streamed; chat keeps its cache between turns), or many at once
(`generate_batch`: left padding, per-row positions, grouped prefill), and many questions spread over the processes of
a torchrun launch with a resumable answer file (`answer_file`). The demo's scoring, evaluate.py and scienceqa.py ask
through here, so every mode asks the model the same way.

    torchrun --nproc_per_node 4 evaluate.py mc --questions q.jsonl --out runs/eval/mc   # 4 GPUs, rank 0 writes
"""
import json
import os
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist
from tqdm import tqdm

import formats
from checkpoint import fingerprint
from clip import preprocess, preprocess_anyres
from data import get_template, render, with_image
from distributed import default_device, default_dtype
from fileio import append_jsonl, check_unique, repair_jsonl, resume_jsonl, write_text
from images import load_image, open_image
from llama import generate, sample
from quantize import QUANTIZE, quantize_int8
from tokenizer import Tokenizer

DTYPES = ("float32", "bfloat16", "float16")  # load_model's dtype choices


def load_model(path, device=None, dtype=None, quantize=None, vision_tower=None):
    """(model, tokenizer) from a checkpoint folder in any layout (formats.load_llava), in `dtype` (default: the
    device's, distributed.default_dtype). quantize="int8": the LLM (embeddings, decoder blocks, lm_head) and the
    projector get int8 weights, ~1/4 of their fp32 memory; the tower and the norms stay as loaded (quantize.py)."""
    for name, value, known in (("dtype", dtype, DTYPES), ("quantize", quantize, QUANTIZE)):
        if value not in (None, *known):
            raise ValueError(f"{name}={value!r} is not supported; known: {', '.join(known)}")
    device = torch.device(device or default_device())
    tokenizer = Tokenizer(path)  # first: a missing or broken tokenizer is found before a long model load
    model = formats.load_llava(path, vision_tower, device, getattr(torch, dtype) if dtype else default_dtype(device))
    return (quantize_int8(model) if quantize else model).eval(), tokenizer


def default_batch_size(device) -> int:
    return 32 if torch.device(device).type == "cuda" else 8  # a CPU's matmuls stop gaining from more rows sooner


def prompt_ids(model, tokenizer, question, image_path=None, template=None) -> list:
    """The single-turn prompt, token-for-token what training rendered for the same human turn; in `template` (a
    data.TEMPLATES name) where given, else the checkpoint's (the original's eval scripts pick theirs by --conv-mode)."""
    cfg = model.config
    turn = {"from": "human", "value": with_image(question) if image_path is not None else question}
    return render([turn], template or cfg.template, tokenizer, image_tokens(cfg, image_path), for_generation=True,
                  image_start_end=cfg.mm_use_im_start_end)[0]


def image_tokens(config, image_path=None) -> int:
    """How many placeholders the image at image_path gets (0 without one): fixed, or with anyres computed from the
    size in the file's header (LLaVAConfig.image_tokens), so the prompt is final before any pixel is decoded."""
    if image_path is None:
        return 0
    if config.image_aspect_ratio != "anyres":
        return config.num_image_tokens
    with open_image(image_path) as image:
        return config.image_tokens(image.size)


def pixel_values(model, image_path):
    """(1, 3, S, S) on the tower's device and dtype, or None without an image; anyres: (1 + tiles, 3, S, S)."""
    return image_input(model, image_path)[0]


def image_input(model, image_path):
    """(pixel_values, image_sizes) for model.embed: (None, None) without an image, ((1, 3, S, S), None), or with
    anyres the overview and tiles (1 + n, 3, S, S) and [(w, h)]."""
    if image_path is None:
        return None, None
    cfg, weight, image = model.config, next(model.vision_tower.parameters()), load_image(image_path)
    if cfg.image_aspect_ratio == "anyres":
        pixels, sizes = preprocess_anyres(image, cfg.image_size, cfg.image_grid_pinpoints), [image.size]
    else:
        pixels, sizes = preprocess(image, cfg.image_size, cfg.image_aspect_ratio == "pad"), None
    return pixels.to(weight.device, weight.dtype), sizes


def reply_text(tokenizer, tokens, stop="") -> str:
    """The reply, cut at the template's stop text (v0's "###", ChatML's <|im_end|>: its models end a reply there,
    not with </s>); a stop text that is one token is found by its id, since added tokens decode to nothing."""
    tokens = list(tokens[:-1] if tokens and tokens[-1] == tokenizer.eos_id else tokens)
    if stop and (stop_id := tokenizer.single_id(stop)) in tokens:
        tokens = tokens[:tokens.index(stop_id)]
    text = tokenizer.decode(tokens)
    return (text.split(stop)[0] if stop else text).strip()


def generate_llava(model, input_ids, pixel_values=None, image_sizes=None, image_features=None, **kwargs):
    """llama.generate for a LLaVA prompt (1, T): the images are encoded once, written into the embeddings, prefilled.
    image_sizes: anyres images' [(w, h), ...] (image_input). image_features: images encoded before (chat keeps
    them), instead of pixel_values. The caller runs model.llm.setup_cache first."""
    with torch.inference_mode():
        embeds = model.embed(input_ids, pixel_values, image_sizes, image_features)  # (1, T, D)
    return generate(model.llm, inputs_embeds=embeds, **kwargs)


@torch.no_grad()
def answer(model, tokenizer, question, image_path=None, max_new_tokens=128, template=None):
    """Greedy single-turn answer (batch 1)."""
    device = model.llm.norm.weight.device
    ids = torch.tensor([prompt_ids(model, tokenizer, question, image_path, template)], device=device)  # (1, T)
    model.llm.setup_cache(1, ids.shape[1] + max_new_tokens)
    out = list(generate_llava(model, ids, *image_input(model, image_path), max_new_tokens=max_new_tokens,
                              eos_id=tokenizer.eos_id))
    model.llm.reset_cache()  # a 7B cache is ~0.5 MB per position: do not keep it between questions
    return reply_text(tokenizer, out, get_template(model.config.template).stop)


def answer_fn(model, tokenizer, max_new_tokens):
    """item {"text", "image_path"} -> reply: the form evaluate.py's modes take (tests pass their own)."""
    return lambda item: answer(model, tokenizer, item["text"], item.get("image_path"), max_new_tokens)


# ------------------------------------------------------------------------------------------ batched generation

@contextmanager
def cache_rows(llm, start, end):
    """The model's KV cache narrowed to rows start:end (views: what the block writes lands in the full cache)."""
    full = [(layer.self_attn.k_cache, layer.self_attn.v_cache) for layer in llm.layers]
    for layer, (k, v) in zip(llm.layers, full):
        layer.self_attn.k_cache, layer.self_attn.v_cache = k[start:end], v[start:end]
    try:
        yield
    finally:
        for layer, (k, v) in zip(llm.layers, full):
            layer.self_attn.k_cache, layer.self_attn.v_cache = k, v


def left_pad_mask(input_pos, left_pad):
    """(mask (B, 1, T, L), RoPE positions (B, T)) for rows whose first real token is in slot left_pad[b]: token i sees
    slots left_pad[b]..input_pos[i] and sits at position input_pos[i] - left_pad[b]. A padding token sees itself
    only: a query without keys gives NaN, and a NaN key spoils every query (NaN x 0 weight = NaN)."""
    slots = torch.arange(int(input_pos[-1]) + 1, device=input_pos.device)  # (L,)
    mask = (slots <= input_pos[:, None]) & (slots >= left_pad[:, None, None]) | (slots == input_pos[:, None])
    return mask[:, None], (input_pos - left_pad[:, None]).clamp(min=0)


@torch.inference_mode()
def generate_batch(llm, prompts, *, max_new_tokens: int, temperature=0.0, top_p=1.0, eos_id=None,
                   generator=None) -> list:
    """New token ids for each prompt, a list per prompt; an EOS ends its row and is included, as generate yields it.
    prompts: token-id lists (or 1-D tensors) of any lengths, or embeddings (T_i, C) (LLaVA's: model.embed).

    Left padding: the prompts are right-aligned (T = the longest), so every row's next token goes into the same
    cache slot T + i and one forward decodes all rows. The padding slots are masked out and each row's RoPE
    positions start at 0 at its first real token (left_pad_mask), so a row computes what it computes alone: greedy
    output equals llama.generate's for the prompt alone (fp32; batched matmuls round differently in the last bits).
    Padding would cost prefill compute (a third of it for lengths drawn from 16..64), so the rows are sorted longest
    first and prefilled in groups whose lengths are within 3/4 of the group's first, each group from its own
    longest prompt's first slot. Finished rows are dropped from the batch, their cache rows compacted, once they are
    a quarter of it. The KV cache is set up here (B rows, T + max_new_tokens slots) unless the model's is large
    enough, and kept for the next call (reset_cache frees it); slots before a group's first are only masked."""
    if not prompts:
        return []
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty: generation needs at least one token")
    device = llm.norm.weight.device
    B, T = len(prompts), max(lengths)
    rows = sorted(range(B), key=lambda b: -lengths[b])  # rows[j]: the prompt batch row j decodes, None once done
    embeds = torch.is_tensor(prompts[0]) and prompts[0].is_floating_point()
    x = (prompts[0].new_zeros(B, T, prompts[0].shape[-1]) if embeds  # (B, T, C): padding is never attended
         else torch.full((B, T), llm.config.pad_token_id, dtype=torch.long, device=device))  # (B, T)
    for j, b in enumerate(rows):
        x[j, T - lengths[b]:] = torch.as_tensor(prompts[b], device=device)  # right-aligned
    left_pad = torch.tensor([T - lengths[b] for b in rows], device=device)  # (B,)
    cache = llm.layers[0].self_attn.k_cache
    if cache is None or cache.shape[0] < B or llm.cache_len < T + max_new_tokens:
        llm.setup_cache(B, T + max_new_tokens)
    slots = torch.arange(T + max_new_tokens, device=device)
    logits, start = [], 0
    while start < B:  # prefill, a group of rows of similar lengths at a time
        end, first = start + 1, T - lengths[rows[start]]  # first: the slot of the group's first real token
        while end < B and 4 * lengths[rows[end]] >= 3 * lengths[rows[start]]:
            end += 1
        mask, positions = left_pad_mask(slots[first:T], left_pad[start:end])
        with cache_rows(llm, start, end):
            logits.append(llm(**{"inputs_embeds" if embeds else "input_ids": x[start:end, first:]},
                              input_pos=slots[first:T], mask=mask, positions=positions, last_only=True)[:, -1])
        start = end
    logits, out = torch.cat(logits), [[] for _ in prompts]  # (B, V)
    for i in range(max_new_tokens):
        tokens = sample(logits.float(), temperature, top_p, generator)  # (B',)
        for row, token in zip(rows, tokens.tolist()):
            if row is not None:
                out[row].append(token)
        rows = [None if row is None or out[row][-1] == eos_id else row for row in rows]
        live = [j for j, row in enumerate(rows) if row is not None]
        if not live or i == max_new_tokens - 1:
            break
        if len(live) <= 3 * len(rows) // 4:  # a quarter has finished: move the live rows up, decode only those
            index = torch.tensor(live, device=device)
            for layer in llm.layers:
                for cache in (layer.self_attn.k_cache, layer.self_attn.v_cache):  # (B, n_kv, L, hd)
                    cache[:len(live), :, :T + i] = cache[index, :, :T + i]  # slots filled so far
            rows, tokens, left_pad = [rows[j] for j in live], tokens[index], left_pad[index]
        mask, positions = left_pad_mask(slots[T + i:T + i + 1], left_pad)
        with cache_rows(llm, 0, len(rows)):
            logits = llm(tokens[:, None], input_pos=slots[T + i:T + i + 1], mask=mask, positions=positions,
                         last_only=True)[:, -1]
    return out


# -------------------------------------------------------------------------------------- many questions, many ranks

@torch.no_grad()
def answer_batches(model, tokenizer, items, max_new_tokens=128, batch_size=None, *, template=None, temperature=0.0,
                   seed=0):
    """Yields [(item, reply), ...] a batch at a time; replies equal answer()'s (greedy, the same prompts).
    template: as prompt_ids. temperature > 0 samples instead, from a generator seeded with seed + rank: a run
    repeats with the same seed, batch size and number of processes (a row's draws depend on the rows beside it).

    Items are sorted by prompt length, longest first, so that a batch wastes little padding and the first batch
    sets up the largest KV cache, which the others reuse (generate_batch). Under torchrun each rank answers every
    world-th item of that order and the answers are gathered to rank 0 after each batch: rank 0 yields all ranks'
    answers, the other ranks empty lists (every rank runs the same number of rounds)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = model.llm.norm.weight.device
    batch_size = batch_size or default_batch_size(device)
    prompts = [prompt_ids(model, tokenizer, item["text"], item.get("image_path"), template) for item in items]
    generator = torch.Generator(device).manual_seed(seed + rank) if temperature > 0 else None
    stop = get_template(template or model.config.template).stop
    context = model.config.llm.context_len
    for item, prompt in zip(items, prompts):  # all checked before any is answered: none dies mid-run
        if len(prompt) + max_new_tokens > context:
            raise ValueError(f"question_id {item.get('question_id')!r}: its prompt ({len(prompt)} tokens) and "
                             f"max_new_tokens ({max_new_tokens}) need {len(prompt) + max_new_tokens} positions, more "
                             f"than the model's {context} (max_position_embeddings, or a shorter sliding_window)")
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))  # stable: ties keep the items' order
    mine = order[rank::world]
    rounds = -(-len(order[::world]) // batch_size)  # rank 0 has the most items
    try:
        for start in range(0, rounds * batch_size, batch_size):
            batch = mine[start:start + batch_size]
            embeds = [model.embed(torch.tensor([prompts[i]], device=device),
                                  *image_input(model, items[i].get("image_path")))[0] for i in batch]  # (T_i, D)
            out = generate_batch(model.llm, embeds, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                                 temperature=temperature, generator=generator)
            answered = [(i, reply_text(tokenizer, tokens, stop)) for i, tokens in zip(batch, out)]
            if world > 1:
                gathered = [None] * world if rank == 0 else None
                dist.gather_object(answered, gathered, dst=0)
                answered = [pair for part in gathered for pair in part] if rank == 0 else []
            yield [(items[i], reply) for i, reply in answered]
    finally:
        model.llm.reset_cache()


def answer_source(model_path, model, max_new_tokens, template=None, temperature=0.0, seed=0, **prompt) -> dict:
    """What a checkpoint's answers depend on, for the record beside an answer file (answer_file's source): the
    folder and a fingerprint of its weights, the template and dtype it answers with, max_new_tokens, the temperature
    (and the seed when it samples; greedy answers do not depend on it) and the caller's prompt settings (prompt
    format, quantize, ...). Not the batch size: greedy batches answer as batch 1 does."""
    return {"model": os.path.abspath(model_path), "fingerprint": fingerprint(model_path),
            "template": template or model.config.template,
            "dtype": str(model.llm.norm.weight.dtype).removeprefix("torch."), "max_new_tokens": max_new_tokens,
            "temperature": float(temperature), "seed": seed if temperature > 0 else None, **prompt}


def answer_file(model, tokenizer, items, out_path, record, max_new_tokens=128, batch_size=None, *, source,
                **decoding):
    """Answer every item whose question_id is not yet in the JSONL file out_path and append record(item, reply)
    for each, a batch at a time, so that an interrupted run asks nothing twice. The file is opened with
    fileio.resume_jsonl: a torn last line is cut, and answers that another `source` (answer_source: checkpoint,
    settings) produced are refused. At the end the file is rewritten in the items' order, so it reads as a batch-1
    run wrote it. Under torchrun only rank 0 reads and writes the file, and tells the others what is left to do (or
    its error). decoding: answer_batches' template, temperature and seed, the ones `source` records. Returns
    (answers that were there, new answers) on rank 0, (0, 0) elsewhere."""
    check_unique([item["question_id"] for item in items], out_path)  # the file is keyed by id
    rank = dist.get_rank() if dist.is_initialized() else 0
    done = [None]
    if rank == 0:
        try:
            done[0] = {r["question_id"] for r in resume_jsonl(out_path, source)}
        except (OSError, ValueError) as e:
            done[0] = e  # raised on every rank below, so that none waits for the others
    if dist.is_initialized():
        dist.broadcast_object_list(done, src=0)
    if isinstance(done[0], Exception):
        raise done[0]
    todo = [item for item in items if item["question_id"] not in done[0]]
    if rank == 0 and todo:  # the template may come from the checkpoint's name (formats.name_template): say which
        print(f"{out_path}: {len(todo)} to answer, template {decoding.get('template') or model.config.template}")
    new, bar = 0, tqdm(total=len(todo), desc=os.path.basename(out_path), disable=rank != 0 or not todo)
    for batch in answer_batches(model, tokenizer, todo, max_new_tokens, batch_size, **decoding):
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
