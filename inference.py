"""Answering questions with a LLaVA checkpoint: load, render the prompt exactly as training did, generate, decode.

The demo's held-out scoring, evaluate.py and scienceqa.py answer through here, so every mode asks the model the
same way. Generation is greedy through the KV cache.
"""
from collections import defaultdict

import torch

from clip import load_image, preprocess
from data import render
from llama import Tokenizer
from llava import LLaVA


def load_model(path, device=None, dtype=None):
    """(model, tokenizer) from a checkpoint folder; bf16 on CUDA, fp32 elsewhere unless dtype names one."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    model = LLaVA.from_pretrained(path, device=device, dtype=dtype).eval()
    return model, Tokenizer(path)


@torch.no_grad()
def answer(model, tokenizer, question, image_path=None, max_new_tokens=128):
    """Greedy single-turn answer; the prompt is token-for-token what training rendered for the same human turn."""
    cfg = model.config
    text = "<image>\n" + question if image_path is not None else question
    input_ids, _ = render([{"from": "human", "value": text}], cfg.template, tokenizer, cfg.num_image_tokens,
                          for_generation=True)
    device = next(model.parameters()).device
    pixel_values = None if image_path is None else preprocess(  # (1, 3, S, S)
        load_image(image_path), cfg.image_size, pad_to_square=cfg.image_aspect_ratio == "pad"
    ).to(device, next(model.vision_tower.parameters()).dtype)
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)  # (1, T)
    model.llm.setup_cache(1, ids.shape[1] + max_new_tokens, device=device, dtype=next(model.llm.parameters()).dtype)
    out = list(model.generate(ids, pixel_values, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id))
    model.llm.reset_cache()  # a 7B cache is ~0.5 MB per position: do not keep it between questions
    return tokenizer.decode(out[:-1] if out and out[-1] == tokenizer.eos_id else out).strip()


def answer_fn(model, tokenizer, max_new_tokens):
    """item {"text", "image_path"} -> reply: the form evaluate.py's modes take (tests pass their own)."""
    return lambda item: answer(model, tokenizer, item["text"], item.get("image_path"), max_new_tokens)


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
