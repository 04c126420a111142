"""Speed and memory of the model files, side by side with the Hugging Face reference when it is installed.

    python bench.py llama --preset smollm-135m          # prefill and decode tokens/s
    python bench.py clip --preset vit-l-14 --batch 8    # tower images/s
    python bench.py generate --threads 1                # batched generation tokens/s by batch size; int8 vs fp32
    python bench.py anyres --hidden 1024 --layers 4     # LLaVA-1.6 time to first token, 672 px image, vs LlavaNext
    python bench.py answer --threads 1                  # evaluate.py's answering: demo questions/s by batch size
    python bench.py quality --model DIR --text FILE     # int8 (and bf16) next-token agreement with fp32 on real text
    python bench.py train --preset tiny                 # training-step tokens/s and peak memory
    python bench.py lora --preset smollm-135m           # LoRA vs full stage 2: trained params, optimizer, memory, time
    python bench.py scale                               # 2 ranks: sharded-load peak RSS, DCP training-state save/resume

Inference speed on random weights is in bench_inference.py, the benches that read a real checkpoint in
bench_eval.py, training in bench_train.py; each subcommand NAME is add_NAME_args(parser) and bench_NAME(args).
Figures go to BENCHMARKS.md with the machine, the command and the date.
"""
import argparse

import torch

import bench_eval
import bench_inference
import bench_train

BENCHES = [  # subcommand, its flags, the bench
    ("llama", bench_inference.add_llama_args, bench_inference.bench_llama),
    ("clip", bench_inference.add_clip_args, bench_inference.bench_clip),
    ("generate", bench_inference.add_generate_args, bench_inference.bench_generate),
    ("anyres", bench_inference.add_anyres_args, bench_inference.bench_anyres),
    ("answer", bench_eval.add_answer_args, bench_eval.bench_answer),
    ("quality", bench_eval.add_quality_args, bench_eval.bench_quality),
    ("train", bench_train.add_train_args, bench_train.bench_train),
    ("lora", bench_train.add_lora_args, bench_train.bench_lora),
    ("scale", bench_train.add_scale_args, bench_train.bench_scale),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, add_args, bench in BENCHES:
        add_args(sub.add_parser(name, help=bench.__doc__.split("\n")[0], description=bench.__doc__))
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):  # every bench but scale has --threads (scale's workers run one each)
        torch.set_num_threads(args.threads)
    dict((name, bench) for name, _, bench in BENCHES)[args.bench](args)


if __name__ == "__main__":
    main()
