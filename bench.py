"""Speed and memory of the model files, side by side with the Hugging Face reference when it is installed.

    python bench.py llama --preset smollm-135m          # prefill and decode tokens/s
    python bench.py clip --preset vit-l-14 --batch 8    # tower images/s
    python bench.py train --preset tiny                 # training-step tokens/s and peak memory

Figures go to BENCHMARKS.md with the machine, the command and the date.
"""
import argparse

# ---- section: llama ----
# ---- end section: llama ----

# ---- section: clip ----
# ---- end section: clip ----

# ---- section: train ----
# ---- end section: train ----


# each section adds (name, add_args(parser), run(args)) here
BENCHES = [
    # ---- benches: llama ----
    # ---- benches: clip ----
    # ---- benches: train ----
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name, add_args, run in BENCHES:
        add_args(sub.add_parser(name))
    args = parser.parse_args()
    dict((name, run) for name, _, run in BENCHES)[args.what](args)


if __name__ == "__main__":
    main()
