"""Benches of bench.py that read a real checkpoint: evaluate.py's answering on the demo's questions (answer), and the
next-token agreement of int8 and bf16 copies with the fp32 model on real text (quality)."""
import copy
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

import inference
from demo import demo_items
from llama import Llama
from quantize import quantize_int8
from tokenizer import Tokenizer


# ------------------------------------------------------------------------------------------------------- answer

def add_answer_args(parser):
    parser.add_argument("--model", default="runs/demo/stage2", help="checkpoint folder (with tokenizer.model)")
    parser.add_argument("--data", default="runs/demo/data", help="the demo's data folder (eval.json, images/)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="evaluate.py demo's default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)


def bench_answer(args):
    """Questions/s of inference.answer_batches (evaluate.py's answering) by batch size, model load excluded."""
    model, tokenizer = inference.load_model(args.model, "cpu", "float32")
    items = demo_items(args.data, args.limit)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    times, replies = {b: [] for b in sizes}, {}
    for repeat in range(args.repeats + 1):
        for b in sizes[::1 if repeat % 2 else -1]:
            start = time.perf_counter()
            out = [r for batch in inference.answer_batches(model, tokenizer, items if repeat else items[:8],
                                                           args.max_new_tokens, b) for _, r in batch]
            if repeat:
                times[b].append(time.perf_counter() - start)
                replies[b] = sorted(out)
    print(f"answer {args.model}: {len(items)} demo questions, max {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    base = len(items) / statistics.median(times[sizes[0]])
    for b in sizes:
        rate = len(items) / statistics.median(times[b])
        print(f"  batch {b:3d}: {rate:7.1f} questions/s  {rate / base:5.2f}x   same answers as batch {sizes[0]}: "
              f"{replies[b] == replies[sizes[0]]}")


# ------------------------------------------------------------------------------------------------------ quality

def add_quality_args(parser):
    parser.add_argument("--model", required=True, help="a pretrained LLaMA-architecture folder (HF layout)")
    parser.add_argument("--text", nargs="+", required=True, help="plain-text files: ordinary text to predict")
    parser.add_argument("--positions", type=int, default=2048, help="positions per file, in windows of --window")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--decode", action="store_true", help="also one token at a time (the CPU int8 kernel's path)")
    parser.add_argument("--threads", type=int)


def _decode_logits(model, ids):
    """Logits (T, V) of ids (1, T) one position at a time through the KV cache: the path chat and generate take."""
    model.setup_cache(1, ids.shape[1])
    out = [model(ids[:, i:i + 1], input_pos=torch.tensor([i]))[0, -1].float() for i in range(ids.shape[1])]
    model.reset_cache()
    return torch.stack(out)  # (T, V)


@torch.inference_mode()
def bench_quality(args):
    """Next-token predictions of bf16 and int8 copies against the fp32 model on the same text: top-1 agreement (all
    positions, and those where fp32's best token leads its second by > 0.5), the largest logit difference, the
    perplexity. Tokenized with tokenizer.model (sentencepiece) or, for BPE-only folders, transformers if installed."""
    if os.path.exists(os.path.join(args.model, "tokenizer.model")):
        encode = Tokenizer(args.model).encode
    else:
        from transformers import AutoTokenizer
        encode = AutoTokenizer.from_pretrained(args.model).encode
    windows = []
    for file in args.text:
        ids = encode(" ".join(open(file, encoding="utf-8").read().split()))[:args.positions]
        windows += [torch.tensor([ids[i:i + args.window]]) for i in range(0, len(ids), args.window)]
    fp32 = Llama.from_pretrained(args.model).eval()
    variants = {"bf16": lambda: copy.deepcopy(fp32).to(torch.bfloat16),
                "int8 (default: embeddings, blocks, head)": lambda: quantize_int8(copy.deepcopy(fp32)),
                "int8, head and table float": lambda: quantize_int8(copy.deepcopy(fp32),
                                                                    skip=("lm_head", "embed_tokens"))}
    refs = [fp32(w)[0].float() for w in windows]  # (T, V) each
    n = sum(r.shape[0] for r in refs)
    nll = sum(F.cross_entropy(r[:-1], w[0, 1:], reduction="sum") for r, w in zip(refs, windows))
    print(f"quality {args.model}: {n} positions of {', '.join(args.text)}; fp32 perplexity "
          f"{(nll / (n - len(windows))).exp():.2f}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, make in variants.items():
        model = make()
        paths = {"full forward": lambda w: model(w)[0].float(), "decode": lambda w: _decode_logits(model, w)}
        for path, run in list(paths.items())[:2 if args.decode else 1]:
            agree = clear = agree_clear = 0
            diff, nll = 0.0, 0.0
            for w, r in zip(windows, refs):
                logits = run(w)
                same = logits.argmax(-1) == r.argmax(-1)
                top2 = r.topk(2, -1).values
                margin = top2[:, 0] - top2[:, 1] > 0.5
                agree, clear, agree_clear = agree + int(same.sum()), clear + int(margin.sum()), \
                    agree_clear + int(same[margin].sum())
                diff = max(diff, float((logits - r).abs().max()))
                nll += float(F.cross_entropy(logits[:-1], w[0, 1:], reduction="sum"))
            print(f"  {name:42s} {path:12s} top-1 agreement {100 * agree / n:5.1f}% (margin > 0.5: "
                  f"{100 * agree_clear / max(clear, 1):5.1f}% of {clear})  max |logit diff| {diff:5.2f}  "
                  f"perplexity {math.exp(nll / (n - len(windows))):6.2f}")
