"""Build the reference fixtures under tests/fixtures/ with Hugging Face transformers.

Run by hand (`pip install transformers protobuf scikit-image`, then `python tests/make_fixtures.py [llama clip llava]`);
the tests read the committed files and never import transformers. Each reference model is tiny, random-init, with
weights perturbed so that norms and biases matter.
"""
import os
import sys

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

# ---- section: llama ----
# ---- end section: llama ----

# ---- section: clip ----
# ---- end section: clip ----

# ---- section: llava ----
# ---- end section: llava ----

# each section adds (name, make(out_dir)) here; llava's fixture uses the llama tokenizer, so order matters
MAKERS = [
    # ---- makers: llama ----
    # ---- makers: clip ----
    # ---- makers: llava ----
]

if __name__ == "__main__":
    wanted = sys.argv[1:] or [name for name, _ in MAKERS]
    for name, make in MAKERS:
        if name in wanted:
            make(FIXTURES)
            print(f"wrote {name} fixtures")
