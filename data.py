"""Conversation data for LLaVA: templates, one renderer for training and chat, LLaVA-JSON datasets, batching with
length grouping, and the built-in "shapes" demo dataset.

A conversation is LLaVA's JSON list of turns, [{"from": "human" | "gpt", "value": str}, ...]. render() turns it
into (input_ids, labels) exactly as the original LLaVA training code tokenized its prompt string (see render), but
builds the labels piece by piece: the assistant replies and their end token get labels, everything else -100.
"""
import io
import json
import os
import random
from collections import Counter
from dataclasses import dataclass

import sentencepiece as spm
import torch
from PIL import Image, ImageDraw

from clip import load_image, preprocess
from llama import Tokenizer

IMAGE_TOKEN = "<image>"  # the placeholder text in LLaVA's JSON (the original's DEFAULT_IMAGE_TOKEN)
IMAGE_TOKEN_INDEX = -200  # same constant as llava.py: ids whose embedding rows receive image features
IGNORE_INDEX = -100  # label of tokens without loss (cross_entropy's default ignore_index)

# ----------------------------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    style: str  # "plain" (stage 1), "two" (vicuna: USER/ASSISTANT, " " then "</s>"), "llama_2" ([INST] ... [/INST])
    system: str = ""


LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make "
    "any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't "
    "know the answer to a question, please don't share false information.")
TEMPLATES = {
    # stage 1 of the original: "<image>" + caption + "\n"; the human instruction text is dropped
    "plain": Template("plain"),
    # conv_vicuna_v1: LLaVA-1.5 trained with --version v1, which selects this system prompt ("user")
    "vicuna_v1": Template("two", "A chat between a curious user and an artificial intelligence assistant. "
                                 "The assistant gives helpful, detailed, and polite answers to the user's questions."),
    # conv_llava_v1: the prompt the original's CLI and eval scripts use with llava-v1.5 checkpoints ("human")
    "llava_v1": Template("two", "A chat between a curious human and an artificial intelligence assistant. "
                                "The assistant gives helpful, detailed, and polite answers to the human's questions."),
    "llama_2": Template("llama_2", LLAMA_2_SYSTEM),
    "llava_llama_2": Template("llama_2", "You are a helpful language and vision assistant. You are able to understand "
                                         "the visual content that the user provides, and assist the user with a "
                                         "variety of tasks using natural language."),
}


def get_template(name) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def move_image_to_front(value: str) -> str:
    # the original's preprocess_multimodal: a turn that mentions <image> becomes "<image>\n" + the rest, stripped
    return (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip() if IMAGE_TOKEN in value else value


def check_turns(conversation, for_generation=False):
    """Raise ValueError unless the turns alternate human, gpt, ... and end as the mode needs."""
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("conversations must be a non-empty list of turns")
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i} is not {{'from': ..., 'value': str}}: {str(turn)[:80]}")
        role, expected = turn.get("from"), ("human", "gpt")[i % 2]
        if role not in ("human", "gpt"):
            raise ValueError(f"turn {i} has unknown role {role!r} (known: 'human', 'gpt')")
        if role != expected:
            raise ValueError(f"turn {i} is from {role!r}, expected {expected!r}: turns alternate, human first")
        if role == "gpt" and (IMAGE_TOKEN in turn["value"] or not turn["value"].strip()):
            raise ValueError(f"turn {i}: an assistant reply must be non-empty text without {IMAGE_TOKEN}")
    if (conversation[-1]["from"] == "human") != for_generation:
        raise ValueError("for_generation needs a conversation that ends with a human turn" if for_generation else
                         "a training conversation must end with an assistant (gpt) turn")


# ------------------------------------------------------------------------------------------------------ renderer
# The original builds one prompt string and tokenizes it with the HF (slow, legacy) LlamaTokenizer, split only at
# "<image>" (tokenizer_image_token); "</s>" and "<s>" inside the string become the eos / bos ids. In sentencepiece
# terms every chunk between two such boundaries is encoded on its own and gets the dummy-prefix "▁" at its start
# (so "\n" after an image encodes as "▁", "<0x0A>", and "USER" after "</s>" as "▁USER"). We build the same token
# stream from pieces: a piece that continues a chunk always starts with a space (the " " before a reply), where
# sentencepiece begins a new word, so encoding it alone - its space played by the dummy prefix - gives exactly the
# tokens of the whole-string encoding. The training ids of a conversation are therefore the generation ids of its
# prefix followed by the reply's pieces: chat can reuse its KV cache, and the ids match the original's.

def _pieces(conversation, template: Template, for_generation):
    """The prompt as (kind, text, labelled) pieces, before tokenization."""
    turns = [t["value"] for t in conversation]
    if template.style == "plain":
        if len(turns) != (1 if for_generation else 2) or IMAGE_TOKEN not in turns[0]:
            raise ValueError("the plain template takes one human turn with <image> and one caption turn")
        pieces = [("bos", "", False), ("text", IMAGE_TOKEN, False)]  # the instruction text is dropped, as the original
        return pieces if for_generation else pieces + [("text", turns[1] + "\n", True)]
    pieces = [("bos", "", False)]
    for i in range(0, len(turns), 2):
        question = move_image_to_front(turns[i])
        if template.style == "two":
            system = template.system + " " if i == 0 else ""
            pieces.append(("text", f"{system}USER: {question} ASSISTANT:", False))
            answer = " " + turns[i + 1] if i + 1 < len(turns) else None
        elif template.style == "llama_2":
            if i == 0:
                question = f"<<SYS>>\n{template.system}\n<</SYS>>\n\n{question}"
            else:
                pieces.append(("bos", "", False))  # "<s>" between rounds
            pieces.append(("text", f"[INST] {question} [/INST]", False))
            answer = " " + turns[i + 1] + " " if i + 1 < len(turns) else None
        if answer is not None:
            pieces += [("text", answer, True), ("eos", "", True)]
    return pieces


def render(conversation, template, tokenizer: Tokenizer, n_image_tokens: int, for_generation=False):
    """(input_ids, labels) lists. Each <image> becomes n_image_tokens x IMAGE_TOKEN_INDEX (label -100).
    for_generation: the conversation ends with a human turn and the ids end with the open assistant turn."""
    template = get_template(template) if isinstance(template, str) else template
    check_turns(conversation, for_generation)
    input_ids, labels = [], []
    chunk_start = True  # at the start of a chunk sentencepiece adds its dummy prefix
    for kind, text, labelled in _pieces(conversation, template, for_generation):
        if kind == "bos" or kind == "eos":
            ids, chunk_start = [tokenizer.bos_id if kind == "bos" else tokenizer.eos_id], True
        else:
            ids = []
            for j, part in enumerate(text.split(IMAGE_TOKEN)):
                if j > 0:
                    ids += [IMAGE_TOKEN_INDEX] * n_image_tokens
                    chunk_start = True
                if part:
                    # a continuation starts with " " (see above): the dummy prefix stands for that space
                    ids += tokenizer.sp.encode(part if chunk_start else part[1:])
                    chunk_start = False
        input_ids += ids
        labels += ids if labelled else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def truncate(input_ids, labels, max_length, n_image_tokens):
    """Cut to at most max_length tokens, never inside an image's placeholder run (the whole image goes)."""
    # a run of placeholders cut short by max_length is dropped entirely (a short sample has only whole runs)
    cut = max_length - input_ids[:max_length].count(IMAGE_TOKEN_INDEX) % max(n_image_tokens, 1)
    return input_ids[:cut], labels[:cut]


# ------------------------------------------------------------------------------------------------------ datasets


class BadRow(ValueError):
    def __init__(self, reason, detail):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class LLaVADataset(torch.utils.data.Dataset):
    """LLaVA's JSON format: a list of {"id", "image"? (a file in image_folder), "conversations": [...]}.

    Every row is checked and rendered once here, so that bad rows fail (or, skip_bad, are counted) before training
    and a sample with no labels left after truncation is never returned: `skipped` counts both by reason. Images
    are checked for existence and a readable header; pixels are decoded in __getitem__. `lengths` holds the token
    length of each kept sample, negative for text-only samples (the original's "modality lengths")."""

    def __init__(self, json_path, image_folder, tokenizer, template, n_image_tokens, image_size,
                 pad_to_square=True, max_length=2048, skip_bad=False):
        self.json_path, self.image_folder, self.tokenizer = json_path, image_folder, tokenizer
        self.template, self.n_image_tokens, self.image_size = get_template(template), n_image_tokens, image_size
        self.pad_to_square, self.max_length = pad_to_square, max_length
        with open(json_path) as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{json_path}: not valid JSON: {e}") from None
        if not isinstance(rows, list):
            raise ValueError(f"{json_path}: expected a JSON list of samples, got {type(rows).__name__}")
        self.rows, self.lengths, self.skipped = [], [], Counter()
        for n, row in enumerate(rows):
            try:
                self._check_image(row)
                input_ids, labels, has_image = self._render(row)
            except BadRow as e:
                if not skip_bad:
                    raise ValueError(f"{json_path}: {self._where(n, row)}: {e}") from None
                self.skipped[e.reason] += 1
                continue
            if all(label == IGNORE_INDEX for label in labels):
                self.skipped["no labels after truncation"] += 1
                continue
            self.rows.append((n, row))
            self.lengths.append(len(input_ids) if has_image else -len(input_ids))

    @staticmethod
    def _where(n, row):
        return f"row {n} (id {row.get('id')!r})" if isinstance(row, dict) else f"row {n}"

    def _check_image(self, row):
        if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
            raise BadRow("missing conversations", "the row needs a 'conversations' list")
        if "image" not in row:
            return
        if not isinstance(row["image"], str):
            raise BadRow("bad image", f"'image' must be one file name, got {row['image']!r}")
        path = os.path.join(self.image_folder, row["image"])
        if not os.path.isfile(path):
            raise BadRow("image not found", f"no image file {path}")
        try:
            Image.open(path).close()  # reads the header only: cheap enough for every row
        except Exception as e:
            raise BadRow("image unreadable", f"cannot read image file {path}: {e}") from None

    def _render(self, row):
        conversation = row["conversations"]
        mentions = sum(isinstance(t, dict) and IMAGE_TOKEN in str(t.get("value", "")) for t in conversation)
        first = conversation[0] if conversation else None
        if "image" in row:
            if mentions == 0 and isinstance(first, dict) and isinstance(first.get("value"), str):  # an image row
                # without the placeholder: the image goes first, as everywhere in LLaVA's data
                conversation = [dict(first, value=IMAGE_TOKEN + "\n" + first["value"]), *conversation[1:]]
            elif mentions > 1:
                raise BadRow("bad turns", f"{mentions} turns mention {IMAGE_TOKEN} but the row has one image")
        elif mentions:
            raise BadRow("<image> without an image", f"{IMAGE_TOKEN} in the text but the row has no 'image'")
        try:
            input_ids, labels = render(conversation, self.template, self.tokenizer, self.n_image_tokens)
        except ValueError as e:
            raise BadRow("bad turns", str(e)) from None
        input_ids, labels = truncate(input_ids, labels, self.max_length, self.n_image_tokens)
        return input_ids, labels, IMAGE_TOKEN_INDEX in input_ids

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        n, row = self.rows[i]
        input_ids, labels, has_image = self._render(row)
        pixel_values = None
        if has_image:
            try:
                image = load_image(os.path.join(self.image_folder, row["image"]))
            except (OSError, ValueError) as e:
                raise ValueError(f"{self.json_path}: {self._where(n, row)}: {e}") from None
            pixel_values = preprocess(image, self.image_size, self.pad_to_square)  # (1, 3, S, S)
        return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels), "pixel_values": pixel_values}


def collate(batch, pad_id):
    """Right-pad to the longest sample (labels with -100); images of all samples concatenated in batch order."""
    T = max(len(s["input_ids"]) for s in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, s in enumerate(batch):
        input_ids[b, :len(s["input_ids"])] = s["input_ids"]
        labels[b, :len(s["labels"])] = s["labels"]
    images = [s["pixel_values"] for s in batch if s["pixel_values"] is not None]
    return {"input_ids": input_ids, "labels": labels, "pixel_values": torch.cat(images) if images else None}


# -------------------------------------------------------------------------------------------- length grouping
# The original's group_by_modality_length (LLaVA's LengthGroupedSampler): image and text-only samples are batched
# apart, and each "megabatch" of world_size * batch_size samples is sorted by length and split so that the ranks
# get similar token totals. The original sorts only within one megabatch; group_batches > 1 sorts within groups of
# that many megabatches (as transformers' own LengthGroupedSampler, 50), so batches also pad less on one GPU.


def _split_even(indices, lengths, n_chunks):
    if len(indices) % n_chunks:
        return indices  # a short last megabatch: the ranks simply take turns
    size, chunks, totals = len(indices) // n_chunks, [[] for _ in range(n_chunks)], [0] * n_chunks
    for i in indices:  # longest first, each to the lightest chunk that still has room
        c = totals.index(min(totals))
        chunks[c].append(i)
        totals[c] = float("inf") if len(chunks[c]) == size else totals[c] + lengths[i]
    return [i for chunk in chunks for i in chunk]


def modality_length_grouped_indices(lengths, batch_size, world_size, generator, group_batches=1):
    """A permutation of range(len(lengths)); lengths are negative for text-only samples."""
    megabatch, megabatches, leftover, sizes = batch_size * world_size, [], [], [abs(x) for x in lengths]
    for sign in (1, -1):
        idx = [i for i, x in enumerate(lengths) if x * sign > 0]
        order = [idx[j] for j in torch.randperm(len(idx), generator=generator).tolist()]
        mine = []
        for g in range(0, len(order), megabatch * group_batches):
            group = sorted(order[g:g + megabatch * group_batches], key=lambda i: sizes[i], reverse=True)
            mine += [_split_even(group[m:m + megabatch], sizes, world_size)
                     for m in range(0, len(group), megabatch)]
        leftover += mine.pop() if mine else []  # each modality's last megabatch goes to the end, together
        megabatches += mine
    megabatches = [megabatches[i] for i in torch.randperm(len(megabatches), generator=generator).tolist()]
    return [i for mb in megabatches + [sorted(leftover)] for i in mb]


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Indices for one rank; deterministic given (seed, epoch). Each rank yields the same number of indices (the
    order is padded by repeating its start), so every rank runs the same number of batches of batch_size."""

    def __init__(self, lengths, batch_size, rank=0, world_size=1, seed=0, group_batches=50):
        self.lengths, self.batch_size, self.rank, self.world_size = list(lengths), batch_size, rank, world_size
        self.seed, self.epoch, self.group_batches = seed, 0, group_batches

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return -(-len(self.lengths) // (self.batch_size * self.world_size)) * self.batch_size  # whole megabatches

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator,
                                                self.group_batches)
        megabatch, total = self.batch_size * self.world_size, len(self) * self.world_size
        order = (order * (total // max(len(order), 1) + 1))[:total]
        for s in range(self.rank * self.batch_size, total, megabatch):
            yield from order[s:s + self.batch_size]


# ----------------------------------------------------------------------------------------------------- demo data
# Synthetic "shapes": 1-3 shapes per image, each of a different kind and colour, in different thirds (left, middle,
# right) of the image, so every demo question has one short exact answer. Stage 2 holds the paper's three kinds of
# instruction data (conversation, detailed description, complex reasoning); the conversations use the eval
# questions' exact phrasing, in LLaVA-1.5's short-answer form, on other images.

DEMO_COLORS = {"red": (220, 20, 20), "green": (20, 160, 40), "blue": (30, 60, 230), "yellow": (240, 200, 0),
               "purple": (140, 30, 170)}
DEMO_SHAPES = ("circle", "square", "triangle")
DEMO_PLACES = ("left", "middle", "right")
DEMO_SIZES = {"small": 0.36, "large": 0.46}  # radius / width of a third: shapes stay recognisable at a tower's 32 px
SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA-1.5's prompt for short answers
CAPTION_PROMPTS = ("Describe the image concisely.", "Provide a brief description of the given image.",
                   "Give a short and clear explanation of the subsequent image.",
                   "Summarize the visual content of the image.")
DETAIL_PROMPTS = ("Describe the following image in detail.", "Provide a detailed description of the given image.",
                  "Give an elaborate explanation of the image you see.",
                  "Explain the various aspects of the image before you.")


def _draw_shapes(shapes, size):
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)  # no anti-aliasing: every shape pixel has exactly its colour
    for s in shapes:
        x, y, r, fill = s["x"], s["y"], s["r"], DEMO_COLORS[s["color"]]
        box = (x - r, y - r, x + r, y + r)
        if s["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif s["shape"] == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return image


def _random_shapes(rng, image_size, max_shapes, sizes):
    k, shapes, third = rng.randint(1, max_shapes), [], image_size / 3
    for place, kind, color in zip(sorted(rng.sample(range(3), k)), rng.sample(DEMO_SHAPES, k),
                                  rng.sample(sorted(DEMO_COLORS), k)):
        size = sizes[(rng.random() < 0.5) % len(sizes)]  # one draw per shape whatever `sizes` holds
        r = round(third * DEMO_SIZES[size])
        x = round(third * (place + 0.5)) + rng.randint(-(round(third / 2) - r - 1), round(third / 2) - r - 1)
        y = rng.randint(r + 2, image_size - r - 3)
        shapes.append(dict(shape=kind, color=color, place=DEMO_PLACES[place], size=size, x=x, y=y, r=r))
    return shapes


def _where(place):
    return "in the middle" if place == "middle" else f"on the {place}"


def _demo_questions(rng, shapes):
    """[(category, question, short answer, sentence answer)] about these shapes, one per category."""
    s, k = rng.choice(shapes), len(shapes)
    absent = rng.choice([(c, t) for c in sorted(DEMO_COLORS) for t in DEMO_SHAPES
                         if not any(x["color"] == c and x["shape"] == t for x in shapes)])
    exists = rng.random() < 0.5
    c, t = (s["color"], s["shape"]) if exists else absent
    return [
        ("color", f"What color is the {s['shape']}?", s["color"], f"The {s['shape']} is {s['color']}."),
        ("shape", f"What shape is the {s['color']} object?", s["shape"], f"The {s['color']} object is a {s['shape']}."),
        ("count", "How many shapes are there?", str(k), f"There {'is 1 shape' if k == 1 else f'are {k} shapes'}."),
        ("position", f"Where is the {s['color']} {s['shape']}?", s["place"],
         f"The {s['color']} {s['shape']} is {_where(s['place'])}."),
        ("existence", f"Is there a {c} {t}?", "yes" if exists else "no",
         f"Yes, there is a {c} {t} {_where(s['place'])}." if exists else f"No, there is no {c} {t}."),
    ]


def _with_image(rng, text):
    return f"{IMAGE_TOKEN}\n{text}" if rng.random() < 0.7 else f"{text}\n{IMAGE_TOKEN}"


def _reasoning(rng, shapes):
    k, s = len(shapes), rng.choice(shapes)
    names = [f"the {x['color']} {x['shape']}" for x in shapes]
    listed = names[0] if k == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    kind = rng.randrange(3)  # which is leftmost / what remains without one / do the colours differ
    if kind == 0:
        first = shapes[0]  # shapes are ordered left to right
        why = "it is the only shape" if k == 1 else f"the other shapes are further right: {listed}"
        return ("Which shape is furthest to the left?",
                f"The {first['color']} {first['shape']} is furthest to the left, because {why}.")
    if kind == 1:
        rest = [n for n, x in zip(names, shapes) if x is not s]
        left = f"{len(rest)} would be left: " + " and ".join(rest) if rest else "none would be left"
        return (f"If the {s['color']} {s['shape']} were removed, how many shapes would be left?",
                f"There {'are' if k > 1 else 'is'} {k} now, so {left}.")
    same = f"Yes, trivially: there is only one shape, {listed}." if k == 1 else \
        f"No. There are {k} shapes, {listed}, each of a different color."
    return "Do all the shapes have the same color?", same


def _detail(shapes):
    k = len(shapes)
    return f"The image shows {'one shape' if k == 1 else f'{k} shapes'} on a white background." + "".join(
        f" {_where(s['place']).capitalize()} there is a {s['size']} {s['color']} {s['shape']}." for s in shapes)


def _write(path, content: bytes):
    with open(path + ".tmp", "wb") as f:  # a temp name then a rename: never a half-written file
        f.write(content)
    os.replace(path + ".tmp", path)


def _turns(values):
    return [{"from": ("human", "gpt")[j % 2], "value": v} for j, v in enumerate(values)]


def make_demo_data(out_dir, seed=0, n_train=2000, n_eval=50, image_size=64, max_shapes=3, vocab_size=512,
                   single_turn=False, extra_share=1.0, sizes=("small", "large")):
    """Write the demo dataset; the same arguments give the same bytes. Returns the paths:
    {"images", "stage1", "stage2", "eval", "tokenizer"}. n_train images give n_train captions (stage 1) and, per
    image, one conversation of 2-4 questions (or with single_turn, each question as its own sample, image first)
    and, for extra_share of the images, a detailed description or a reasoning sample (half each); n_eval held-out
    images give 4 questions each (eval.json). sizes: which of "small", "large" to draw. single_turn and extra_share
    change neither the images nor eval.json."""
    rng = random.Random(seed)
    if not sizes or not set(sizes) <= set(DEMO_SIZES):
        raise ValueError(f"sizes must be a non-empty subset of {tuple(DEMO_SIZES)}, got {sizes!r}")
    paths = {key: os.path.join(out_dir, name) for key, name in (("images", "images"), ("stage1", "stage1.json"),
             ("stage2", "stage2.json"), ("eval", "eval.json"), ("tokenizer", "tokenizer.model"))}
    os.makedirs(paths["images"], exist_ok=True)
    stage1, stage2, evaluation = [], [], []
    for split, n in (("train", n_train), ("eval", n_eval)):
        for i in range(n):
            shapes = _random_shapes(rng, image_size, max_shapes, sizes)
            name = f"{split}_{i:05d}.png"
            _draw_shapes(shapes, image_size).save(os.path.join(paths["images"], name), optimize=False,
                                                  compress_level=6)
            questions = _demo_questions(rng, shapes)
            if split == "eval":
                evaluation += [{"id": f"{split}_{i:05d}_{cat}", "image": name, "category": cat, "answer": short,
                                "question": f"{q}\n{SHORT_ANSWER}"} for cat, q, short, _ in questions[:4]]
                continue
            caption = "; ".join(f"a {s['size']} {s['color']} {s['shape']} {_where(s['place'])}" for s in shapes)
            stage1.append({"id": f"{split}_{i:05d}", "image": name, "conversations": _turns(
                [_with_image(rng, rng.choice(CAPTION_PROMPTS)), caption[0].upper() + caption[1:] + "."])})
            qa = []
            for cat, q, short, sentence in rng.sample(questions, rng.randint(2, 4)):
                short_form = rng.random() < 0.6
                qa += [f"{q}\n{SHORT_ANSWER}" if short_form else q, short if short_form else sentence]
            first = _with_image(rng, qa[0])
            # tiny models learn image questions much faster from single-turn samples with the image first
            convs = [[f"{IMAGE_TOKEN}\n{qa[j]}", qa[j + 1]] for j in range(0, len(qa), 2)] if single_turn else \
                [[first] + qa[1:]]
            stage2 += [{"id": f"{split}_{i:05d}_conversation" + (str(j) if single_turn else ""), "image": name,
                        "conversations": _turns(values)} for j, values in enumerate(convs)]
            extra, (q, a) = ("detail", (rng.choice(DETAIL_PROMPTS), _detail(shapes))) if i % 2 == 0 else \
                ("reasoning", _reasoning(rng, shapes))
            q = _with_image(rng, q)
            # images come in pairs (detail, reasoning); keeping evenly spaced pairs keeps both kinds at any share
            if int((i // 2 + 1) * extra_share) > int(i // 2 * extra_share):
                stage2.append({"id": f"{split}_{i:05d}_{extra}", "image": name, "conversations": _turns([q, a])})
    for key, rows in (("stage1", stage1), ("stage2", stage2), ("eval", evaluation)):
        _write(paths[key], (json.dumps(rows, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode())
    # the tokenizer learns the demo text, with each line as often as it occurs, and the prompts of the default
    # template (system prompt and roles once per turn), so that prompts take few tokens
    lines = [line for t in TEMPLATES.values() for line in t.system.split("\n")] + ["[INST] <<SYS>> <</SYS>> [/INST]"]
    for row in stage1 + stage2:
        lines.append(TEMPLATES["vicuna_v1"].system)
        for turn in row["conversations"]:
            role = "USER: " if turn["from"] == "human" else "ASSISTANT: "
            lines += (role + turn["value"].replace(IMAGE_TOKEN, "")).split("\n")
    model = io.BytesIO()
    # LLaMA's tokenizer settings (BPE, byte fallback, digits split, no normalisation, dummy prefix); one thread and
    # a fixed input order make the model file byte-identical from run to run
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([x for x in lines if x.strip()]), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    _write(paths["tokenizer"], model.getvalue())
    return paths


_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}


def demo_answer_correct(prediction: str, answer: str) -> bool:
    """Exact match after normalising case, punctuation, articles and number words ("Two." == "2")."""
    def norm(text):
        words = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text.lower()).split()
        return " ".join(_NUMBERS.get(w, w) for w in words if w not in ("a", "an", "the"))
    return norm(prediction) == norm(answer) != ""
