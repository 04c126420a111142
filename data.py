"""Conversation data for LLaVA: templates, one renderer for training and chat, LLaVA-JSON datasets, collate, length
grouping. A conversation is LLaVA's JSON list of turns, [{"from": "human" | "gpt", "value": str}, ...]; render()
turns it into (input_ids, labels) exactly as the original LLaVA training code tokenized its prompt string, but builds
the labels piece by piece: the assistant replies and their end token get labels, everything else IGNORE_INDEX.
"""
import itertools
import re
from collections import Counter
from dataclasses import dataclass

import torch

from clip import anyres_grid, preprocess, preprocess_anyres
from fileio import inside, read_json
from images import header_problem, load_image, open_image
from llava import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from tokenizer import Tokenizer

IMAGE_TOKEN = "<image>"  # the placeholder text in LLaVA's JSON (the original's DEFAULT_IMAGE_TOKEN)
# LLaVA v0 (the paper's release, mm_use_im_start_end): tokens added to the tokenizer around an image's features
IM_START_TOKEN, IM_END_TOKEN = "<im_start>", "<im_end>"


def with_image(text: str) -> str:
    """A human turn about an image as LLaVA's data writes it: the placeholder first, on a line of its own."""
    return f"{IMAGE_TOKEN}\n{text}"


# ----------------------------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    style: str  # "plain" (stage 1), "two" (vicuna: USER/ASSISTANT, " " then "</s>"), "llama_2" ([INST] ... [/INST]),
    # "single" (v0: "###" after the system prompt and after every message, roles Human/Assistant), "chatml"
    # (the original's MPT style: <|im_start|>role\n ... <|im_end|>, the system prompt holding its own header)
    system: str = ""
    examples: tuple = ()  # few-shot (human, assistant) messages before the conversation (conv_vicuna_v0's one)
    rounds_bos: bool = True  # llama_2: "<s>" before every round after the first (conv_mistral_instruct's sep is "")
    generation_only: bool = False  # no training samples: the original trained these on another text, or not at all

    # v0 models end a reply with "###", ChatML ones with <|im_end|>, not with </s>: the original stops at that text
    stop = property(lambda self: {"single": "###", "chatml": CHATML_END}.get(self.style, ""))


CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"  # special tokens of the Yi-34B (LLaVA-1.6-34B) tokenizer
LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make "
    "any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't "
    "know the answer to a question, please don't share false information.")
V0_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the human's questions.")
V0_EXAMPLE_QUESTION = "What are the key differences between renewable and non-renewable energy sources?"
V0_EXAMPLE_ANSWER = (
    "Renewable energy sources are those that can be replenished naturally in a relatively short amount of time, such "
    "as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other hand, are finite and "
    "will eventually be depleted, such as coal, oil, and natural gas. Here are some key differences between renewable "
    "and non-renewable energy sources:\n1. Availability: Renewable energy sources are virtually inexhaustible, while "
    "non-renewable energy sources are finite and will eventually run out.\n2. Environmental impact: Renewable energy "
    "sources have a much lower environmental impact than non-renewable sources, which can lead to air and water "
    "pollution, greenhouse gas emissions, and other negative effects.\n3. Cost: Renewable energy sources can be more "
    "expensive to initially set up, but they typically have lower operational costs than non-renewable sources.\n"
    "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote locations than "
    "non-renewable sources.\n5. Flexibility: Renewable energy sources are often more flexible and can be adapted to "
    "different situations and needs, while non-renewable sources are more rigid and inflexible.\n6. Sustainability: "
    "Renewable energy sources are more sustainable over the long term, while non-renewable sources are not, and "
    "their depletion can lead to economic and social instability.\n")
TEMPLATES = {
    # stage 1 of the original: "<image>" + caption + "\n"; the human instruction text is dropped
    "plain": Template("plain"),
    # conv_vicuna_v1: LLaVA-1.5 trained with --version v1, which selects this system prompt ("user")
    "vicuna_v1": Template("two", "A chat between a curious user and an artificial intelligence assistant. "
                                 "The assistant gives helpful, detailed, and polite answers to the user's questions."),
    # conv_llava_v1: the prompt the original's CLI and eval scripts use with llava-v1.5 checkpoints ("human")
    "llava_v1": Template("two", "A chat between a curious human and an artificial intelligence assistant. "
                                "The assistant gives helpful, detailed, and polite answers to the human's questions."),
    # conv_vicuna_v0 and conv_llava_v0: the paper's release (LLaVA-13b-delta-v0); the original's CLI picks llava_v0
    "vicuna_v0": Template("single", V0_SYSTEM, ((V0_EXAMPLE_QUESTION, V0_EXAMPLE_ANSWER),), generation_only=True),
    "llava_v0": Template("single", V0_SYSTEM, generation_only=True),
    "llama_2": Template("llama_2", LLAMA_2_SYSTEM),
    "llava_llama_2": Template("llama_2", "You are a helpful language and vision assistant. You are able to understand "
                                         "the visual content that the user provides, and assist the user with a "
                                         "variety of tasks using natural language."),
    # LLaVA-1.6: conv_mistral_instruct (llava-v1.6-mistral-7b) and conv_chatml_direct (llava-v1.6-34b); their
    # training code was not released, so they render prompts for chat and evaluation only
    "mistral_instruct": Template("llama_2", "", rounds_bos=False, generation_only=True),
    "chatml_direct": Template("chatml", f"{CHATML_START}system\nAnswer the questions.", generation_only=True),
}


def get_template(name) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def move_image_to_front(value: str) -> str:
    # the original's preprocess_multimodal: a turn that mentions <image> becomes "<image>\n" + the rest, stripped;
    # as LLaVA-NeXT's, a turn with several <image> (several images, interleaved with text) keeps them where they are
    return with_image(value.replace(IMAGE_TOKEN, "").strip()).strip() if value.count(IMAGE_TOKEN) == 1 else value


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
# The original builds one prompt string and tokenizes it with the HF (slow) LlamaTokenizer, split only at "<image>"
# (tokenizer_image_token); "</s>" and "<s>" inside the string become the eos / bos ids. In sentencepiece terms every
# chunk between two such boundaries is encoded on its own and gets the dummy-prefix "▁" at its start (so "\n" after
# an image encodes as "▁", "<0x0A>", and "USER" after "</s>" as "▁USER"), except, with `legacy: false` in
# tokenizer_config.json, after "</s>" and "<s>" ("USER" -> "US", "ER"). We build the same token stream from pieces:
# a piece that continues a chunk always starts with a space (the " " before a reply), where sentencepiece begins a
# new word, so encoding it alone - its space played by the dummy prefix - gives exactly the tokens of the
# whole-string encoding. The training ids of a conversation are therefore the generation ids of its prefix followed
# by the reply's pieces: chat can reuse its KV cache, and the ids match the original's.

def _pieces(conversation, template: Template, for_generation):
    """The prompt as (kind, text, labelled) pieces, before tokenization."""
    turns = [t["value"] for t in conversation]
    if template.style == "plain":
        if len(turns) != (1 if for_generation else 2) or IMAGE_TOKEN not in turns[0]:
            raise ValueError("the plain template takes one human turn with <image> and one caption turn")
        pieces = [("bos", "", False), ("text", IMAGE_TOKEN, False)]  # the instruction text is dropped, as the original
        return pieces if for_generation else pieces + [("text", turns[1] + "\n", True)]
    pieces = [("bos", "", False)]
    if template.generation_only and not for_generation:
        raise ValueError("the v0, mistral_instruct and chatml_direct templates render chat prompts only; the "
                         "original trained v0 on another text and released no training code for the others")
    if template.style == "single":  # conv.get_prompt(): one text, every message followed by "###"
        messages = [m for pair in template.examples for m in pair] + [move_image_to_front(t) for t in turns] + [""]
        roles = ("Human", "Assistant")
        text = "".join(f"{roles[k % 2]}: {m}###" if m else "Assistant:" for k, m in enumerate(messages))
        return pieces + [("text", template.system + "###" + text, False)]
    if template.style == "chatml":  # system + sep, then role + message + sep per message, the open role last
        roles = (f"{CHATML_START}user\n", f"{CHATML_START}assistant\n")
        text = template.system + CHATML_END + "".join(
            roles[k % 2] + (move_image_to_front(t) if k % 2 == 0 else t) + CHATML_END for k, t in enumerate(turns))
        return pieces + [("text", text + roles[1], False)]
    for i in range(0, len(turns), 2):
        question = move_image_to_front(turns[i])
        if template.style == "two":
            system = template.system + " " if i == 0 else ""
            pieces.append(("text", f"{system}USER: {question} ASSISTANT:", False))
            answer = " " + turns[i + 1] if i + 1 < len(turns) else None
        elif template.style == "llama_2":
            if i == 0 and template.system:  # an empty system prompt is left out, <<SYS>> and all
                question = f"<<SYS>>\n{template.system}\n<</SYS>>\n\n{question}"
            elif i > 0 and template.rounds_bos:
                pieces.append(("bos", "", False))  # "<s>" between rounds
            pieces.append(("text", f"[INST] {question} [/INST]", False))
            answer = " " + turns[i + 1] + " " if i + 1 < len(turns) else None
        if answer is not None:
            pieces += [("text", answer, True), ("eos", "", True)]
    return pieces


def render(conversation, template, tokenizer: Tokenizer, n_image_tokens, for_generation=False, image_start_end=False):
    """(input_ids, labels) lists. Each <image> becomes n_image_tokens x IMAGE_TOKEN_INDEX (label -100); a list
    gives one count per image, in order (LLaVA-1.6's counts depend on each image's size: LLaVAConfig.image_tokens).
    image_start_end puts them between the <im_start> and <im_end> ids (LLaVA v0's mm_use_im_start_end: the original
    wrote that many <im_patch> tokens there and replaced their embeddings by the features, keeping the start and end
    ones). for_generation: the conversation ends with a human turn and the ids end with the open assistant turn."""
    template = get_template(template) if isinstance(template, str) else template
    check_turns(conversation, for_generation)
    pieces = _pieces(conversation, template, for_generation)
    counts = image_counts(pieces, n_image_tokens)
    start_end = ([tokenizer.token_id(IM_START_TOKEN)], [tokenizer.token_id(IM_END_TOKEN)]) if image_start_end \
        else ([], [])
    specials = (CHATML_START, CHATML_END) if template.style == "chatml" else ()
    splits = "(" + "|".join(map(re.escape, (IMAGE_TOKEN, *specials))) + ")"
    input_ids, labels = [], []
    start, bare = True, False  # at a chunk's start: its dummy prefix, none after a special token if not legacy
    for n, (kind, text, labelled) in enumerate(pieces):
        if kind == "bos" or kind == "eos":
            ids = [tokenizer.bos_id if kind == "bos" else tokenizer.eos_id] if n or tokenizer.add_bos else []
            start, bare = True, n > 0 and not tokenizer.legacy  # the first bos is not in the text
        else:
            ids = []
            for part in re.split(splits, text):
                if part == IMAGE_TOKEN:  # tokenizer_image_token encodes each chunk after an image on its own
                    ids += start_end[0] + [IMAGE_TOKEN_INDEX] * next(counts) + start_end[1]
                    start, bare = True, False
                elif part in (CHATML_START, CHATML_END):  # a special token, as "</s>" above
                    ids += [tokenizer.piece_id(part, f"template {template.style!r}: special token")]
                    start, bare = True, not tokenizer.legacy
                elif part:
                    # a continuation starts with " " (see above): the dummy prefix stands for that space
                    ids += tokenizer.encode_text(part, not bare) if start else tokenizer.sp.encode(part[1:])
                    start = False
        input_ids += ids
        labels += ids if labelled else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def image_counts(pieces, n_image_tokens):
    """An iterator over the placeholder count of each <image> in the rendered pieces; a list of counts must have
    one per image."""
    if not isinstance(n_image_tokens, (list, tuple)):
        return itertools.repeat(n_image_tokens)
    images = sum(text.count(IMAGE_TOKEN) for kind, text, _ in pieces if kind == "text")
    if images != len(n_image_tokens):
        raise ValueError(f"{len(n_image_tokens)} image token counts for {images} images in the conversation")
    return iter(n_image_tokens)


def truncate(input_ids, labels, max_length, n_image_tokens):
    """Cut to at most max_length tokens, never inside an image's placeholder run (the whole image goes).
    n_image_tokens: every image's count, or a list of each image's count, in order."""
    kept = input_ids[:max_length].count(IMAGE_TOKEN_INDEX)
    if isinstance(n_image_tokens, (list, tuple)):  # the placeholders past the last whole image
        partial = kept - max((n for n in itertools.accumulate(n_image_tokens) if n <= kept), default=0)
    else:
        partial = kept % max(n_image_tokens, 1)
    # an image's run cut short by max_length is its tail of input_ids[:max_length]: drop it entirely
    return input_ids[:max_length - partial], labels[:max_length - partial]


# ------------------------------------------------------------------------------------------------------ datasets


class BadRow(ValueError):
    def __init__(self, reason, detail):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class LLaVADataset(torch.utils.data.Dataset):
    """LLaVA's JSON format: a list of {"id", "image"? (a file in image_folder, or a list of them), "conversations":
    [...]}. Every row is checked and rendered once, here: a bad row is an error naming it, or with skip_bad is counted
    in `skipped` by reason, as is a sample left without labels by truncation. A leading "gpt" turn is dropped, as the
    original does, and counted in `dropped_first_turn`. A row's images go, in order, to the <image> placeholders of its
    human turns, one each; one image without a placeholder goes in front of the first human turn. Images must lie
    inside image_folder and have a sane header (images.header_problem); pixels are decoded in __getitem__.
    n_image_tokens: placeholders per image, or with grid_pinpoints (LLaVA-1.6's anyres: an overview and tiles per
    image) LLaVAConfig.image_tokens, a function of an image's (width, height), read from its header. `lengths`: the
    original's "modality lengths" for length grouping, each kept row's whitespace-separated words over all turns,
    negative for a row without image."""

    def __init__(self, json_path, image_folder, tokenizer, template, n_image_tokens, image_size,
                 pad_to_square=True, max_length=2048, skip_bad=False, grid_pinpoints=None):
        if grid_pinpoints is not None and not callable(n_image_tokens):
            raise ValueError("grid_pinpoints (anyres) needs n_image_tokens as a function of an image's size "
                             "(LLaVAConfig.image_tokens)")
        self.json_path, self.image_folder, self.tokenizer = json_path, image_folder, tokenizer
        self.template, self.n_image_tokens, self.image_size = get_template(template), n_image_tokens, image_size
        self.pad_to_square, self.max_length, self.skip_bad = pad_to_square, max_length, skip_bad
        self.grid_pinpoints = grid_pinpoints
        rows = read_json(json_path)  # errors name the file: bad bytes (not UTF-8), bad syntax
        if not isinstance(rows, list):
            raise ValueError(f"{json_path}: expected a JSON list of samples, got {type(rows).__name__}")
        self.rows, self.lengths, self.skipped, self.dropped_first_turn = [], [], Counter(), 0
        for n, row in enumerate(rows):
            try:
                sizes = self._check_images(row)
                input_ids, labels, _ = self._render(row, sizes)
            except BadRow as e:
                if not skip_bad:
                    raise ValueError(f"{json_path}: {self._where(n, row)}: {e}") from None
                self.skipped[e.reason] += 1
                continue
            if all(label == IGNORE_INDEX for label in labels):
                self.skipped["no labels after truncation"] += 1
                continue
            self.rows.append((n, row, sizes))
            words = sum(len(str(turn.get("value", "")).split()) for turn in row["conversations"])
            self.lengths.append(max(words, 1) if "image" in row else -max(words, 1))
            self.dropped_first_turn += row["conversations"][0].get("from") == "gpt"

    @staticmethod
    def _where(n, row):
        return f"row {n} (id {row.get('id')!r})" if isinstance(row, dict) else f"row {n}"

    @staticmethod
    def _image_files(row) -> list:
        """The row's image file names in order: "image" is one name or a list of them."""
        files = row.get("image", [])
        files = [files] if isinstance(files, str) else files
        if not (isinstance(files, list) and ("image" not in row or files) and all(isinstance(f, str) for f in files)):
            raise BadRow("bad image", f"'image' must be a file name or a list of them, got {row['image']!r}")
        return files

    def _image_path(self, name):
        """An image file of the row, inside image_folder (a path that leaves it is an error naming the row)."""
        try:
            return inside(self.image_folder, name, "'image'")
        except ValueError as e:
            raise BadRow("image outside the image folder", str(e)) from None

    def _check_images(self, row):
        """Each image file's header; with anyres the images' (width, height), on which their counts depend."""
        if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
            raise BadRow("missing conversations", "the row needs a 'conversations' list")
        sizes = [] if self.grid_pinpoints is not None else None
        for name in self._image_files(row):
            path = self._image_path(name)
            problem = header_problem(path)  # the header only: cheap enough for every row
            if problem:
                raise BadRow(*problem)
            if sizes is not None:  # anyres: the placeholder count depends on the size, fixed here
                with open_image(path) as image:
                    sizes.append(image.size)
        return sizes

    def _render(self, row, sizes):
        """(input_ids, labels, how many images they hold): truncation drops the images past the cut, the last ones."""
        conversation, files = row["conversations"], self._image_files(row)
        if conversation and isinstance(conversation[0], dict) and conversation[0].get("from") == "gpt":
            conversation = conversation[1:]  # the original's preprocess skips a first turn not from the human
        tags = sum(str(t.get("value", "")).count(IMAGE_TOKEN) for t in conversation
                   if isinstance(t, dict) and t.get("from") == "human")
        first = conversation[0] if conversation else None
        if len(files) == 1 and tags == 0:
            if isinstance(first, dict) and isinstance(first.get("value"), str):  # an image row without the
                # placeholder: the image goes first, as everywhere in LLaVA's data
                conversation = [dict(first, value=with_image(first["value"])), *conversation[1:]]
        elif tags != len(files):
            raise BadRow("image count mismatch" if files else "<image> without an image",
                         f"{tags} {IMAGE_TOKEN} in the human turns, {len(files)} images in 'image'")
        counts = [self.n_image_tokens(size) for size in sizes] if sizes is not None else \
            [self.n_image_tokens] * len(files)
        try:  # a list of counts: render checks there is one per <image> (the plain template keeps only one)
            input_ids, labels = render(conversation, self.template, self.tokenizer, counts)
        except ValueError as e:
            raise BadRow("bad turns", str(e)) from None
        input_ids, labels = truncate(input_ids, labels, self.max_length, counts)
        placeholders = input_ids.count(IMAGE_TOKEN_INDEX)
        return input_ids, labels, sum(1 for n in itertools.accumulate(counts) if n <= placeholders)

    def __len__(self):
        return len(self.rows)

    def _pixels(self, name, size):
        """One image file's (1, 3, S, S), or with anyres its overview and tiles (1 + n, 3, S, S)."""
        image = load_image(self._image_path(name))
        if size is None:
            return preprocess(image, self.image_size, self.pad_to_square)
        if image.size != tuple(size):  # its placeholders were counted from the size at start-up
            raise ValueError(f"image file {name}: {image.size[0]}x{image.size[1]} pixels, {size[0]}x{size[1]} at "
                             "start-up: changed since")
        return preprocess_anyres(image, self.image_size, self.grid_pinpoints)

    def __getitem__(self, i):
        """The sample's tensors: pixel_values of its images in order (only those truncation kept), and with anyres
        image_sizes, their (width, height). With skip_bad, an image that cannot be decoded (corrupt past its header,
        or changed since start-up) is blank and the sample gets no labels: it trains nothing, yet the micro-batch
        keeps its shape and every rank runs the same steps. "skipped": 1 counts it in the batch (collate), which
        carries the count from loader worker processes to the training loop."""
        n, row, sizes = self.rows[i]
        input_ids, labels, n_images = self._render(row, sizes)
        files, sizes = self._image_files(row)[:n_images], sizes[:n_images] if sizes is not None else None
        pixels, skipped, S = [], 0, self.image_size
        for name, size in zip(files, sizes or [None] * n_images):
            try:
                pixels.append(self._pixels(name, size))
            except (OSError, ValueError) as e:  # BadRow is a ValueError too
                if not self.skip_bad:
                    raise ValueError(f"{self.json_path}: {self._where(n, row)}: {e}") from None
                cols, rows = anyres_grid(size, self.grid_pinpoints, S) if size is not None else (0, 0)
                pixels.append(torch.zeros(1 + cols * rows, 3, S, S))
                skipped, labels = 1, [IGNORE_INDEX] * len(labels)
        return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
                "pixel_values": torch.cat(pixels) if pixels else None, "image_sizes": sizes, "skipped": skipped}


def collate(batch, pad_id):
    """Right-pad to the longest sample (labels with IGNORE_INDEX); images of all samples concatenated in batch
    order, and with anyres their image_sizes as one list in the same order (else None); "skipped": how many samples
    had an unreadable image (LLaVADataset with skip_bad)."""
    T = max(len(s["input_ids"]) for s in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, s in enumerate(batch):
        input_ids[b, :len(s["input_ids"])] = s["input_ids"]
        labels[b, :len(s["labels"])] = s["labels"]
    images = [s["pixel_values"] for s in batch if s["pixel_values"] is not None]
    anyres = any(s.get("image_sizes") is not None for s in batch)
    return {"input_ids": input_ids, "labels": labels, "pixel_values": torch.cat(images) if images else None,
            "image_sizes": [size for s in batch for size in s["image_sizes"] or []] if anyres else None,
            "skipped": sum(s["skipped"] for s in batch)}


# -------------------------------------------------------------------------------------------- length grouping


def _split_even(indices, lengths, n_chunks):
    if len(indices) % n_chunks:
        return indices  # a short last megabatch: the ranks simply take turns
    size, chunks, totals = len(indices) // n_chunks, [[] for _ in range(n_chunks)], [0] * n_chunks
    for i in indices:  # longest first, each to the lightest chunk that still has room
        c = totals.index(min(totals))
        chunks[c].append(i)
        totals[c] = float("inf") if len(chunks[c]) == size else totals[c] + lengths[i]
    return [i for chunk in chunks for i in chunk]


def modality_length_grouped_indices(lengths, batch_size, world_size, generator):
    """The original's group_by_modality_length order: a permutation of range(len(lengths)) (negative for text-only
    samples) whose consecutive megabatches of batch_size * world_size samples hold one modality, each sorted by
    length and split into world_size chunks of similar token totals, one per rank."""
    megabatch, megabatches, leftover, sizes = batch_size * world_size, [], [], [abs(x) for x in lengths]
    for sign in (1, -1):
        idx = [i for i, x in enumerate(lengths) if x * sign > 0]
        order = [idx[j] for j in torch.randperm(len(idx), generator=generator).tolist()]
        mine = [_split_even(sorted(order[m:m + megabatch], key=lambda i: sizes[i], reverse=True), sizes, world_size)
                for m in range(0, len(order), megabatch)]
        leftover += mine.pop() if mine else []  # each modality's last megabatch goes to the end, together
        megabatches += mine
    megabatches = [megabatches[i] for i in torch.randperm(len(megabatches), generator=generator).tolist()]
    return [i for mb in megabatches + [sorted(leftover)] for i in mb]
