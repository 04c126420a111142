"""Terminal chat with a LLaVA checkpoint: streamed answers, many turns, and a KV cache kept between turns.

    python chat.py                                  # the demo: runs/demo/stage2 and the first demo eval image
    python chat.py --model DIR --image photo.jpg    # own layout, llava-hf, original release (+ --vision-tower)
    python chat.py --model DIR --image a.jpg --prompt "What is this?"     # answer once and exit
    printf 'What is this?\\nWhat colour?\\n' | python chat.py --model DIR --image a.jpg  # one message a line

Each turn renders the whole conversation with data.render (as in training), compares the ids with those already
in the cache, and feeds only what follows their common prefix (start_pos = its length). The cache grows with the
conversation, CACHE_CHUNK positions at a time, instead of holding the longest context from the start. /add PATH puts
another image before the next message; each image keeps its features, so the tower reads it once.
"""
import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

from data import IMAGE_TOKEN, TEMPLATES, get_template, render, with_image
from demo import DEMO_QUESTIONS
from distributed import default_dtype
from fileio import inside, number, read_json, write_json
from inference import DTYPES, generate_llava, image_input, image_tokens, load_model
from llava import IMAGE_TOKEN_INDEX
from quantize import QUANTIZE

CACHE_CHUNK = 256  # KV-cache positions added at a time: a re-allocation (a copy of the cache) every few turns
DEMO_MODEL, DEMO_DATA = os.path.join("runs", "demo", "stage2"), os.path.join("runs", "demo", "data")
HELP = """commands:
  /image PATH   talk about another image (starts a new conversation)
  /add PATH     add an image to the conversation: it goes before your next message; earlier images stay
  /reset        forget the conversation and the added images, keep the /image one
  /save FILE    write the transcript as LLaVA conversation JSON (a list with one {id, image, conversations};
                "image" is a list with several images); an existing FILE is kept: /save! FILE overwrites it
  /help         this text
  /quit         leave (Ctrl-D too); Ctrl-C during an answer stops that answer"""


def note(message):
    """Everything that is not an answer goes to stderr, so stdout holds only the answers (scripts, pipes)."""
    print(message, file=sys.stderr, flush=True)


@dataclass(eq=False)  # compared by identity: the placeholders of two images are never the same tokens
class ChatImage:
    path: str  # absolute
    tokens: int  # its placeholders in the prompt (anyres: depends on its size)
    pixel_values: torch.Tensor | None  # (1, 3, S, S), anyres (1 + tiles, 3, S, S); None once encoded
    image_sizes: list | None  # anyres: [(w, h)]
    features: torch.Tensor | None = None  # (tokens, D): encoded on its first prefill, kept for a later one


def image_keys(ids, images):
    """ids with each placeholder replaced by its image (images in prompt order), so that comparing the cached ids
    with a new prompt tells two images apart although both are runs of IMAGE_TOKEN_INDEX."""
    owners = (image for image in images for _ in range(image.tokens))
    return [next(owners) if token == IMAGE_TOKEN_INDEX else token for token in ids]


class ChatSession:
    """One conversation, its images (each at the start of the human message it came with), and the token ids whose
    keys/values are in the KV cache."""

    def __init__(self, model, tokenizer, template, max_new_tokens=None, temperature=0.0, top_p=1.0, seed=0,
                 max_context=None, stats=False, cache_chunk=CACHE_CHUNK):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.temperature, self.top_p, self.stats = temperature, top_p, stats
        weight = model.llm.norm.weight  # the compute dtype and device (never quantized)
        self.device, self.dtype = weight.device, weight.dtype
        self.max_context = max_context or model.config.llm.context_len
        if (max_new_tokens or 0) > self.max_context // 2:  # leave room for the prompt in a short context
            note(f"--max-new-tokens {max_new_tokens} lowered to {self.max_context // 2} (context {self.max_context})")
        self.max_new_tokens = min(max_new_tokens or 512, self.max_context // 2)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        # one cache for the whole session: positions are overwritten in place; it grows (keeping its entries) when a
        # turn needs more, in steps of cache_chunk up to max_context (a 7B cache is ~0.5 MB per position)
        self.cache_chunk = cache_chunk
        model.llm.setup_cache(1, min(cache_chunk, self.max_context), device=self.device, dtype=self.dtype)
        self.image = None  # the /image (or --image) one, which opens the conversation again after /reset
        self.cached_ids = []  # ids at cache positions 0..len-1; later positions hold stale entries, never attended
        self.cached_images = []  # the images of the placeholders in cached_ids, in order (and perhaps more)
        self.reset()

    def reset(self):
        """Forget the turns and the added images. The cache stays: the next prompt reuses its system prompt and the
        /image image's features."""
        self.turns = []  # [{"from": "human"|"gpt", "value": str, "image"?: ChatImage}, ...] without "<image>" tags
        self.pending = self.image  # the image that goes before the next message
        self.prompt_len = 0  # the last prompt, when it must be a prefix of the next one (its turn was kept)

    def load_image(self, path) -> ChatImage:
        """Read and preprocess an image; on a bad path it raises and the conversation stays as it was."""
        pixel_values, image_sizes = image_input(self.model, path)  # (1, 3, S, S); anyres: (1 + tiles, 3, S, S)
        return ChatImage(os.path.abspath(path), image_tokens(self.model.config, path), pixel_values, image_sizes)

    def set_image(self, path):
        """A new conversation about the image at path."""
        self.image = self.load_image(path)
        self.reset()

    def add_image(self, path):
        """The image at path joins the conversation before the next message (the original's one <image> per turn)."""
        if self.pending is not None:
            raise ValueError(f"{self.pending.path} already goes before your next message (one image per message): "
                             "send a message first")
        self.pending = self.load_image(path)

    def conversation(self, message=None, turns=None):
        """The turns in LLaVA's format: an image tag in front of the human message it came with, as in training."""
        turns = (self.turns if turns is None else turns) + ([self.next_turn(message)] if message else [])
        return [{"from": t["from"], "value": with_image(t["value"]) if "image" in t else t["value"]} for t in turns]

    def images(self, turns=None):
        return [t["image"] for t in (self.turns if turns is None else turns) if "image" in t]

    def next_turn(self, message):
        return {"from": "human", "value": message, **({"image": self.pending} if self.pending else {})}

    def prompt_ids(self, message):
        """(ids, images) of the conversation plus the new message; the oldest turns, with their images, are dropped
        while it does not fit the context."""
        turns, last = self.turns, self.next_turn(message)
        while True:
            images = self.images(turns + [last])
            ids, _ = render(self.conversation(None, turns + [last]), self.template, self.tokenizer,
                            [image.tokens for image in images], for_generation=True,
                            image_start_end=self.model.config.mm_use_im_start_end)
            if len(ids) + self.max_new_tokens <= self.max_context:
                break
            if not turns:  # the history stays as it was: the user can write a shorter message
                raise ValueError(f"message too long: {len(ids)} prompt tokens + {self.max_new_tokens} new tokens "
                                 f"do not fit the context of {self.max_context}; write a shorter message")
            turns = turns[2:]  # a question and its answer; an image goes with the question it came with
        if len(turns) < len(self.turns):
            dropped = len(self.images()) - len(self.images(turns))
            note(f"(the conversation no longer fits the context of {self.max_context} tokens: dropped the oldest "
                 f"{(len(self.turns) - len(turns)) // 2} turn(s){f' and {dropped} image(s)' if dropped else ''}; "
                 "/reset starts afresh)")
            self.turns, self.prompt_len = turns, 0
        return ids, images

    def features(self, image):
        """(tokens, D): an image is read by the tower once per session, however often its turn is prefilled."""
        if image.features is None:
            image.features = self.model.encode_images(image.pixel_values, image.image_sizes)[0]
            image.pixel_values = None
        return image.features

    @torch.no_grad()
    def reply(self, message, out=None):
        """Stream the answer to `out` (stdout), add the turn to the history and return the answer text."""
        out, message = out or sys.stdout, message.replace(IMAGE_TOKEN, "").strip()  # typed "<image>" is text
        ids, images = self.prompt_ids(message)
        keys, cached = image_keys(ids, images), image_keys(self.cached_ids, self.cached_images)
        reuse = 0  # length of the common prefix of the cached ids and the new rendering, images told apart
        while reuse < min(len(keys), len(cached)) and keys[reuse] == cached[reuse]:
            reuse += 1
        # Generated tokens need not be the ones re-encoding their text gives, so the prefix can end inside an
        # earlier answer; what follows is fed again. Feed >= 1 token to get logits; never split an image.
        reuse = min(reuse, len(ids) - 1)
        while reuse > 0 and ids[reuse] == IMAGE_TOKEN_INDEX and keys[reuse - 1] is keys[reuse]:
            reuse -= 1
        assert reuse >= self.prompt_len, "data.render: the new prompt does not start with the previous prompt"
        new_ids = ids[reuse:]
        # rolled back now, so an interrupt during the prefill leaves it consistent
        self.cached_ids, self.cached_images = ids[:reuse], images
        fed = list(dict.fromkeys(k for k in keys[reuse:] if isinstance(k, ChatImage)))  # the images in new_ids
        if len(ids) + self.max_new_tokens > self.model.llm.cache_len:  # prompt_ids made sure it fits max_context
            chunks = -(-(len(ids) + self.max_new_tokens) // self.cache_chunk)
            self.model.llm.grow_cache(min(chunks * self.cache_chunk, self.max_context))
        eos, stream, generated = self.tokenizer.eos_id, self.tokenizer.stream(), []
        stop, text, shown = get_template(self.template).stop, "", 0  # v0 models end a reply with "###", not </s>
        stop_id = self.tokenizer.single_id(stop) if stop else None  # ChatML's <|im_end|>: one token, no text
        start, first, interrupted = time.perf_counter(), None, False
        try:
            features = [self.features(image) for image in fed]  # [(tokens, D)], in prompt order
            for token in generate_llava(self.model, torch.tensor([new_ids], device=self.device),
                                        image_features=features, max_new_tokens=self.max_new_tokens,
                                        temperature=self.temperature, top_p=self.top_p, eos_id=eos, start_pos=reuse,
                                        generator=self.generator):
                first = first or time.perf_counter()
                at = 0 if token == stop_id else -1
                if token != eos and at < 0:
                    text += stream.push(token)
                    at = text.find(stop) if stop else -1
                    # hold back a tail that may be the start of the stop text ("#", "##")
                    held = next((k for k in range(len(stop) - 1, 0, -1) if text.endswith(stop[:k])), 0)
                    upto = at if at >= 0 else len(text) - held
                    new, shown = text[shown:upto], max(shown, upto)  # counted as shown even if Ctrl-C cuts the write
                    out.write(new)
                    out.flush()
                generated.append(token)  # after printing: a stopped answer keeps exactly what was shown
                if at >= 0:
                    break
        except KeyboardInterrupt:
            interrupted = True
        end = time.perf_counter()
        text += stream.flush()  # bytes of a character the answer stopped inside
        out.write((text[shown:] if not stop or stop not in text else "") + "\n")
        out.flush()
        if generated:  # generate had fed every yielded token but the last one
            self.cached_ids = ids + generated[:-1]
        answer = self.tokenizer.decode([t for t in generated if t != eos])
        answer = (answer.split(stop)[0] if stop else answer).replace(IMAGE_TOKEN, "").strip()
        if interrupted:
            note("(answer stopped; the partial answer stays in the conversation)" if answer else
                 "(answer stopped before any text; the message was dropped)")
        elif not answer:  # a conversation cannot hold an empty reply (data.render refuses it)
            note("(the model gave an empty answer; the message was dropped)")
        self.prompt_len = len(ids) if answer else 0
        if answer:  # a stopped answer is kept as the model's turn: the history matches what the user saw
            self.turns += [self.next_turn(message), {"from": "gpt", "value": answer}]
            self.pending = None  # a dropped message leaves its image waiting for the next one
        if self.stats and first is not None:
            rate = (len(generated) - 1) / (end - first) if len(generated) > 1 else float("nan")
            note(f"[{len(new_ids)} prompt tokens prefilled, {reuse} reused from the cache; "
                 f"first token {first - start:.3f} s; {len(generated)} tokens, {rate:.1f} tokens/s]")
        return answer

    def save(self, path, overwrite=False):
        """The transcript in LLaVA's conversation JSON, written atomically (fileio: a fresh temporary file, never a
        fixed NAME.tmp a planted link could redirect). An existing file is kept unless overwrite."""
        if not self.turns:
            raise ValueError("nothing to save yet: the conversation is empty")
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; /save! {path} overwrites it")
        record, paths = {"id": "chat-" + time.strftime("%Y%m%d-%H%M%S")}, [i.path for i in self.images()]
        if paths:  # absolute: data.LLaVADataset takes one with an image_folder that contains it; several, in order,
            record["image"] = paths[0] if len(paths) == 1 else paths  # as LLaVA-NeXT's interleaved data lists them
        record["conversations"] = self.conversation()
        write_json(path, [record], indent=2)


def command(session, line):
    """Run one /command; return False to quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip().strip("'\"")
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        note(HELP)
    elif name == "/reset":
        session.reset()
        note("(conversation cleared)")
    elif name in ("/image", "/add", "/save", "/save!") and not arg:
        note(f"usage: {name} PATH")
    elif name in ("/image", "/add", "/save", "/save!"):
        try:  # a missing file or one that is not an image: say so, and the conversation goes on
            if name == "/image":
                session.set_image(arg)
                note(f"(new conversation about {arg})")
            elif name == "/add":
                session.add_image(arg)
                note(f"(added {arg}: it goes before your next message)")
            else:
                session.save(arg, overwrite=name == "/save!")
                note(f"(saved {len(session.turns) // 2} turns to {arg})")
        except (OSError, ValueError) as e:
            note(f"error: {name} {arg}: {e}")
    else:
        note(f"unknown command {name}; /help lists the commands")
    return True


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help=f"checkpoint directory (default: the demo's {DEMO_MODEL})")
    p.add_argument("--image", help="image to talk about (default with the demo model: the first demo eval image)")
    p.add_argument("--vision-tower", help="CLIP directory, for original LLaVA releases that do not include it")
    p.add_argument("--template", choices=sorted(TEMPLATES), help="conversation template (default: the checkpoint's)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on cuda, float16 on mps, float32 on cpu")
    p.add_argument("--temperature", type=number(float, low=0), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=1.0, help="in (0, 1]")
    p.add_argument("--max-new-tokens", type=number(), help="default 512, at most half the context")
    p.add_argument("--seed", type=number(low=0), default=0)
    p.add_argument("--quantize", choices=QUANTIZE, help="int8 weights for the LLM and projector (quantize.py)")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--stats", action="store_true", help="print time to first token and tokens/s after each answer")
    return p.parse_args(argv)


def load(args):
    """Model, tokenizer, template and image path; exits with a clear message when something is missing."""
    model_dir, image, eval_json = args.model or DEMO_MODEL, args.image, os.path.join(DEMO_DATA, "eval.json")
    if args.model is None and not (os.path.isdir(model_dir) and (image or os.path.isfile(eval_json))):
        sys.exit(f"no demo checkpoint and data in {DEMO_MODEL} and {DEMO_DATA}: run the demo first "
                 "(python train.py --stage 1 && python train.py --stage 2), or pass --model DIR --image PATH")
    if args.model is None and image is None:
        try:
            image = inside(os.path.join(DEMO_DATA, "images"), read_json(eval_json)[0]["image"], f"{eval_json}, row 0")
        except (OSError, ValueError, LookupError, TypeError) as e:
            sys.exit(f"error: the demo's {eval_json}: {e}")
    if image and not os.path.isfile(image):  # before a possibly long model load
        sys.exit(f"error: image file not found: {image}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.split(":")[0]):
        sys.exit(f"--device {device} is not available on this machine (cpu, cuda, cuda:N, mps)")
    dtype = args.dtype or str(default_dtype(device)).removeprefix("torch.")
    try:  # the loaders' errors name the file and key: show them without a traceback
        note(f"loading {model_dir} on {device} ({dtype}{', int8 weights' if args.quantize else ''})")
        model, tokenizer = load_model(model_dir, device, dtype, args.quantize, args.vision_tower)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: cannot load {model_dir}: {e}")
    return model, tokenizer, args.template or model.config.template, image


def read_lines(interactive):
    """The user's messages: typed after a prompt on a terminal, else one per line of stdin. Bytes that are not
    UTF-8 (a pasted Latin-1 line) become U+FFFD: a bad line must not end the session."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # input() decodes with sys.stdin's errors, on a terminal too
    while True:
        try:
            yield input("USER: " if interactive else "")
        except UnicodeDecodeError:  # a stdin that cannot be reconfigured
            note("(a line that is not UTF-8 text was skipped)")
        except EOFError:  # Ctrl-D, or the end of piped input
            if interactive:
                print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as in a shell
            print()


def main(argv=None):
    args = parse_args(argv)
    model, tokenizer, template, image = load(args)
    session = ChatSession(model, tokenizer, template, args.max_new_tokens, args.temperature, args.top_p,
                          args.seed, stats=args.stats)
    try:
        if image:
            session.set_image(image)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    interactive = args.prompt is None and sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  line editing and history for input(), where the platform has it
        except ImportError:
            pass
        note(f"template {template}; image {image or 'none (text only; /image or /add PATH adds one)'}; "
             "/help for commands")
        if args.model is None:  # a newcomer's first chat: the demo model knows a few phrasings, nothing else
            note("the demo model answers the questions it was trained on, such as: " + "; ".join(DEMO_QUESTIONS))
    for line in [args.prompt] if args.prompt is not None else read_lines(interactive):
        line = line.strip()
        if line.startswith("/") and args.prompt is None:
            if not command(session, line):
                break
        elif line:
            if interactive:
                print("ASSISTANT: ", end="", flush=True)
            try:
                session.reply(line)
            except ValueError as e:  # a message too long for the context
                note(f"error: {e}")
                if args.prompt is not None:
                    sys.exit(1)


if __name__ == "__main__":
    main()
