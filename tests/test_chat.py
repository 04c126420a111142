"""chat.py against llava.generate: a tiny random LLaVA saved with save_pretrained, chat.py driven over stdin as a
subprocess (one session covers most checks, since each start-up imports torch), the rest in-process."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import chat
import formats
import inference
from clip import CLIPVisionConfig, preprocess
from data import LLaVADataset, render, with_image
from images import load_image
from llama import LlamaConfig
from llava import IMAGE_TOKEN_INDEX, LLaVA, LLaVAConfig
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW = 6
TEMPLATE = "vicuna_v1"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random checkpoint (own layout + tokenizer.model), two images and a file that is not an image."""
    tmp = tmp_path_factory.mktemp("chat")
    tokenizer = Tokenizer(str(ROOT / "tests" / "fixtures" / "tokenizer.model"))
    config = LLaVAConfig(llm=replace(LlamaConfig.from_name("tiny"), vocab_size=tokenizer.vocab_size),
                         vision=CLIPVisionConfig.from_name("tiny"), template=TEMPLATE)
    torch.manual_seed(0)
    model = LLaVA(config)
    with torch.no_grad():  # larger random weights than the init, so answers depend on the image and the words
        for name, p in model.named_parameters():
            if name.startswith("llm.") or name.startswith("projector."):
                p.normal_(0.0, 0.5 if p.ndim > 1 else 1.0)
    model.save_pretrained(str(tmp / "model"))
    shutil.copy(ROOT / "tests" / "fixtures" / "tokenizer.model", tmp / "model" / "tokenizer.model")
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 30)), ("b.png", (24, 36))):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp / name)
    (tmp / "notimage.jpg").write_text("this is text, not a JPEG")
    model = LLaVA.from_pretrained(str(tmp / "model")).eval()  # for the references; sessions load their own copy
    return tmp, model, tokenizer


def pixels(model, path):
    return preprocess(load_image(path), model.config.image_size, pad_to_square=model.config.image_aspect_ratio == "pad")


def prompt_ids(model, tokenizer, conversation):
    return render(conversation, TEMPLATE, tokenizer, model.config.num_image_tokens, for_generation=True)[0]


def reference(model, tokenizer, conversation, pixel_values, max_new=MAX_NEW, **kw):
    """The answer text chat.py must print: generation on the whole conversation rendered from scratch."""
    ids = prompt_ids(model, tokenizer, conversation)
    model.llm.setup_cache(1, len(ids) + max_new)
    out = list(inference.generate_llava(model, torch.tensor([ids]), pixel_values, max_new_tokens=max_new,
                                        eos_id=tokenizer.eos_id, **kw))
    return tokenizer.decode([t for t in out if t != tokenizer.eos_id])


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text.strip()}


@pytest.mark.slow
def test_session_over_stdin(tiny):
    tmp, model, tokenizer = tiny
    q1, q2, q3 = "What shape is in the picture?", "And what colour is it?", "How many are there?"
    lines = [q1, q2, f"/image {tmp / 'missing.png'}", f"/image {tmp / 'notimage.jpg'}", q3, "/frobnicate",
             f"/save {tmp / 'transcript.json'}", f"/image {tmp / 'b.png'}", q1, "/reset", q1]
    result = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--model", str(tmp / "model"),
                             "--image", str(tmp / "a.png"), "--max-new-tokens", str(MAX_NEW), "--stats"],
                            input="\n".join(lines) + "\n", capture_output=True, text=True, cwd=tmp, timeout=120)
    assert result.returncode == 0, result.stderr

    pa, pb = pixels(model, tmp / "a.png"), pixels(model, tmp / "b.png")
    conv = [human("<image>\n" + q1)]
    a1 = reference(model, tokenizer, conv, pa)
    conv += [gpt(a1), human(q2)]
    a2 = reference(model, tokenizer, conv, pa)  # turn 2 rendered from scratch: what the cached chat must match
    conv += [gpt(a2), human(q3)]  # the failed /image commands left the conversation as it was
    a3 = reference(model, tokenizer, conv, pa)
    a4 = reference(model, tokenizer, [human("<image>\n" + q1)], pb)  # /image b.png: a new conversation
    assert a1.strip() and a2.strip() and a3.strip(), "the tiny model answers nothing: the checks below are void"
    assert a4 != a1, "answers do not depend on the image: the checks below are weak"
    assert result.stdout == a1 + "\n" + a2 + "\n" + a3 + "\n" + a4 + "\n" + a4 + "\n"  # stdout: answers only

    # the cache was reused: turn 2 fed only what follows the common prefix, which covers the whole turn-1 prompt
    stats = [tuple(map(int, m)) for m in re.findall(r"\[(\d+) prompt tokens prefilled, (\d+) reused", result.stderr)]
    assert len(stats) == 5
    p1, p2 = prompt_ids(model, tokenizer, conv[:1]), prompt_ids(model, tokenizer, conv[:3])
    assert stats[0] == (len(p1), 0)
    assert stats[1][1] >= len(p1) and sum(stats[1]) == len(p2)
    k = p1.index(IMAGE_TOKEN_INDEX)  # a new image: only the text before it is still valid (same question)
    assert stats[3] == (len(p1) - k, k)
    assert stats[4] == (1, len(p1) - 1)  # /reset, same question: the whole prompt but its last token is cached
    assert "tokens/s" in result.stderr and "first token" in result.stderr

    assert "missing.png" in result.stderr and "not found" in result.stderr
    assert "notimage.jpg" in result.stderr and "cannot read image" in result.stderr
    assert "unknown command /frobnicate" in result.stderr

    saved = json.loads((tmp / "transcript.json").read_text())
    assert len(saved) == 1 and saved[0]["conversations"] == conv + [gpt(a3)]
    assert Path(saved[0]["image"]) == tmp / "a.png"
    dataset = LLaVADataset(str(tmp / "transcript.json"), str(tmp), tokenizer, TEMPLATE,
                           model.config.num_image_tokens, model.config.image_size)
    item = dataset[0]
    full_ids, full_labels = render(saved[0]["conversations"], TEMPLATE, tokenizer, model.config.num_image_tokens)
    assert item["input_ids"].tolist() == full_ids and item["labels"].tolist() == full_labels
    torch.testing.assert_close(item["pixel_values"], pa)


def demo_checkpoint(tmp, folder):
    """The tiny model and an image where chat.py looks for the demo's (runs/demo under `folder`)."""
    shutil.copytree(tmp / "model", folder / "runs" / "demo" / "stage2")
    (folder / "runs" / "demo" / "data" / "images").mkdir(parents=True)
    shutil.copy(tmp / "b.png", folder / "runs" / "demo" / "data" / "images" / "b.png")
    eval_rows = [{"id": "0", "image": "b.png", "question": "q", "answer": "a", "category": "shape"}]
    (folder / "runs" / "demo" / "data" / "eval.json").write_text(json.dumps(eval_rows))


def test_prompt_with_demo_defaults(tiny, tmp_path, monkeypatch, capsys):
    """No --model/--image: the demo checkpoint and the first demo eval image; --prompt answers once."""
    tmp, model, tokenizer = tiny
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="run the demo first"):
        chat.main(["--prompt", "hi"])
    demo_checkpoint(tmp, tmp_path)
    question = "Which shape?"
    chat.main(["--prompt", question, "--temperature", "0.9", "--seed", "3", "--max-new-tokens", str(MAX_NEW)])
    conv, pb = [human("<image>\n" + question)], pixels(model, tmp / "b.png")
    expected = reference(model, tokenizer, conv, pb, temperature=0.9, generator=torch.Generator().manual_seed(3))
    assert capsys.readouterr().out == expected + "\n"
    assert expected != reference(model, tokenizer, conv, pb), "sampling gives the greedy answer: a weak check"


class StopAfter:
    """An output stream that raises KeyboardInterrupt (Ctrl-C) on its n-th write, like a user stopping an answer."""

    def __init__(self, n):
        self.n, self.text = n, ""

    def write(self, text):
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt
        self.text += text

    def flush(self):
        pass


def assert_cache_holds(session, reference_model, pixel_values):
    """Cache rows 0..len(cached_ids)-1 of the session hold the keys/values of exactly its cached_ids."""
    ids = torch.tensor([session.cached_ids])  # (1, L)
    reference_model.llm.setup_cache(1, ids.shape[1])
    with torch.no_grad():
        embeds = reference_model.embed(ids, pixel_values)  # (1, L, D)
        reference_model.llm(inputs_embeds=embeds, input_pos=torch.arange(ids.shape[1]))
    for mine, ref in zip(session.model.llm.layers, reference_model.llm.layers):
        for cache in ("k_cache", "v_cache"):
            torch.testing.assert_close(getattr(mine.self_attn, cache)[:, :, :ids.shape[1]],
                                       getattr(ref.self_attn, cache), atol=1e-4, rtol=1e-4)


def test_ctrl_c_keeps_a_consistent_cache(tiny, capsys):
    tmp, model, tokenizer = tiny
    session = chat.ChatSession(LLaVA.from_pretrained(str(tmp / "model")), tokenizer, TEMPLATE,
                               max_new_tokens=MAX_NEW, max_context=256)
    session.set_image(str(tmp / "a.png"))
    pa = pixels(model, tmp / "a.png")
    full = reference(model, tokenizer, [human("<image>\nDescribe the picture.")], pa)
    assert len(tokenizer.encode(full, bos=False)) >= 3, "too short an answer to stop in the middle"
    out = StopAfter(3)
    partial = session.reply("Describe the picture.", out=out)
    assert partial == out.text.strip() and len(partial) < len(full.strip())  # stopped after two printed tokens
    assert "answer stopped" in capsys.readouterr().err
    assert_cache_holds(session, model, pa)
    # the cache holds stale entries past the rollback point; the next turn must not see them
    answer = session.reply("Go on.", out=StopAfter(-1))
    conv = [human("<image>\nDescribe the picture."), gpt(partial), human("Go on.")]
    assert answer == reference(model, tokenizer, conv, pa).strip()
    assert_cache_holds(session, model, pa)  # after an answer that ran to --max-new-tokens (or eos)
    # stopped at the very first token: the message is dropped, the prefill it overwrote is not counted as cached
    assert session.reply("Once more.", out=StopAfter(1)) == ""
    assert "stopped before any text" in capsys.readouterr().err
    assert session.conversation() == conv + [gpt(answer)]
    assert_cache_holds(session, model, pa)


def test_context_overflow_drops_the_oldest_turn(tiny, capsys):
    tmp, model, tokenizer = tiny
    first = prompt_ids(model, tokenizer, [human("<image>\nWhat is it?")])
    session = chat.ChatSession(LLaVA.from_pretrained(str(tmp / "model")), tokenizer, TEMPLATE,
                               max_new_tokens=MAX_NEW, max_context=len(first) + MAX_NEW + 4)  # one short turn fits
    session.set_image(str(tmp / "a.png"))
    session.reply("What is it?", out=StopAfter(-1))
    answer = session.reply("Why?", out=StopAfter(-1))
    assert "dropped the oldest 1 turn(s) and 1 image(s)" in capsys.readouterr().err
    assert session.conversation() == [human("Why?"), gpt(answer)]  # the image went with the question it came with
    assert answer == reference(model, tokenizer, [human("Why?")], None).strip()
    with pytest.raises(ValueError, match="message too long"):
        session.reply("much too long " * 50, out=StopAfter(-1))
    assert session.conversation() == [human("Why?"), gpt(answer)]  # the session goes on unchanged


def test_the_cache_grows_past_its_first_size_without_changing_the_answers(tiny):
    tmp, model, tokenizer = tiny
    pa = pixels(model, tmp / "a.png")
    session = chat.ChatSession(LLaVA.from_pretrained(str(tmp / "model")), tokenizer, TEMPLATE,
                               max_new_tokens=MAX_NEW, max_context=1024, cache_chunk=16)
    assert session.model.llm.cache_len == 16  # not max_context up front
    session.set_image(str(tmp / "a.png"))
    conv, sizes = [], []
    for question in ("What is it?", "And the colour?", "Where is it in the picture?"):
        conv.append(human(("" if conv else "<image>\n") + question))
        answer = session.reply(question, out=StopAfter(-1))
        assert answer and answer == reference(model, tokenizer, conv, pa).strip()
        conv.append(gpt(answer))
        sizes.append(session.model.llm.cache_len)
    first = prompt_ids(model, tokenizer, conv[:1])
    assert sizes[0] == -(-(len(first) + MAX_NEW) // 16) * 16 and 16 < sizes[0] < sizes[-1] < 1024, sizes
    assert_cache_holds(session, model, pa)  # the entries survived every re-allocation


def test_int8_weights_answer_through_chat(tiny, capsys):
    from quantize import Int8Linear, quantize_int8
    tmp, model, tokenizer = tiny
    question = "What shape is in the picture?"
    args = ["--model", str(tmp / "model"), "--image", str(tmp / "a.png"), "--max-new-tokens", str(MAX_NEW),
            "--quantize", "int8"]
    loaded, *_ = chat.load(chat.parse_args(args))
    linears = [m for part in (loaded.llm.layers, loaded.projector) for m in part.modules()
               if isinstance(m, (torch.nn.Linear, Int8Linear))]
    assert len(linears) == 7 * len(loaded.llm.layers) + 2 and all(isinstance(m, Int8Linear) for m in linears)
    chat.main(args + ["--prompt", question])
    quantized = quantize_int8(LLaVA.from_pretrained(str(tmp / "model")))
    expected = reference(quantized, tokenizer, [human("<image>\n" + question)], pixels(model, tmp / "a.png"))
    assert expected.strip() and capsys.readouterr().out == expected + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# several images: /add


def test_add_puts_a_second_image_before_the_next_message(tiny, capsys):
    tmp, model, tokenizer = tiny
    session = chat.ChatSession(LLaVA.from_pretrained(str(tmp / "model")), tokenizer, TEMPLATE,
                               max_new_tokens=MAX_NEW, max_context=256)
    session.set_image(str(tmp / "a.png"))
    first = session.reply("What is it?", out=StopAfter(-1))
    assert chat.command(session, f"/add {tmp / 'b.png'}") and "before your next message" in capsys.readouterr().err
    encoded = []  # images read by the tower from here on
    session.model.encode_images = lambda *args: encoded.append(args) or LLaVA.encode_images(session.model, *args)
    second = session.reply("And this one?", out=StopAfter(-1))
    conv = [human("<image>\nWhat is it?"), gpt(first), human("<image>\nAnd this one?")]
    pa, pb = pixels(model, tmp / "a.png"), pixels(model, tmp / "b.png")
    assert second == reference(model, tokenizer, conv, torch.cat([pa, pb])).strip()  # from scratch, no cache
    assert second != reference(model, tokenizer, conv, torch.cat([pa, pa])).strip(), "b.png changes nothing: weak"
    assert len(encoded) == 1  # b.png only: a.png's rows were in the cache
    assert session.conversation() == conv + [gpt(second)]
    assert_cache_holds(session, model, torch.cat([pa, pb]))


def test_add_renders_each_anyres_image_with_its_own_count_in_order():
    model, tokenizer = formats.load_llava(ROOT / "tests" / "fixtures" / "llava_next_hf"), Tokenizer(
        str(ROOT / "tests" / "fixtures" / "tokenizer.model"))
    images = [str(ROOT / "tests" / "fixtures" / "llava_next_ref" / "images" / n) for n in ("tall.png", "wide.png")]
    counts = [inference.image_tokens(model.config, path) for path in images]
    assert counts[0] != counts[1], "equal counts: the order check below is void"
    session = chat.ChatSession(model, tokenizer, "vicuna_v1", max_new_tokens=MAX_NEW)
    session.set_image(images[0])
    first = session.reply("What is it?", out=io.StringIO())
    session.add_image(images[1])
    second = session.reply("And this?", out=io.StringIO())
    conv = [human(with_image("What is it?")), gpt(first), human(with_image("And this?"))]
    ids, _ = render(conv, "vicuna_v1", tokenizer, counts, for_generation=True)
    runs = [len(run) for run in "".join("x" if t == IMAGE_TOKEN_INDEX else " " for t in ids).split()]
    assert runs == counts and session.cached_ids[:len(ids)] == ids
    inputs = [inference.image_input(model, path) for path in images]  # pixel values in order, image_sizes too
    pixel_values, sizes = torch.cat([p for p, _ in inputs]), [s for _, size in inputs for s in size]
    model.llm.setup_cache(1, len(ids) + MAX_NEW)  # the whole conversation afresh
    tokens = list(inference.generate_llava(model, torch.tensor([ids]), pixel_values, sizes, max_new_tokens=MAX_NEW,
                                           eos_id=tokenizer.eos_id))
    assert second == inference.reply_text(tokenizer, tokens)


def test_overflow_drops_the_oldest_image_with_its_turn(tiny, capsys):
    tmp, model, tokenizer = tiny
    one = prompt_ids(model, tokenizer, [human("<image>\nWhat is it?")])
    session = chat.ChatSession(LLaVA.from_pretrained(str(tmp / "model")), tokenizer, TEMPLATE,
                               max_new_tokens=MAX_NEW, max_context=len(one) + MAX_NEW + 4)  # one image turn fits
    session.set_image(str(tmp / "a.png"))
    session.reply("What is it?", out=StopAfter(-1))
    session.add_image(str(tmp / "b.png"))
    answer = session.reply("What is it?", out=StopAfter(-1))
    assert "dropped the oldest 1 turn(s) and 1 image(s)" in capsys.readouterr().err
    assert session.conversation() == [human("<image>\nWhat is it?"), gpt(answer)]
    assert [image.path for image in session.images()] == [str(tmp / "b.png")]
    # same length and placeholders as turn 1's prompt: only the image tells the cached rows apart from b.png's
    assert answer == reference(model, tokenizer, [human("<image>\nWhat is it?")], pixels(model, tmp / "b.png"))
    assert_cache_holds(session, model, pixels(model, tmp / "b.png"))


@pytest.mark.parametrize("name, message", [("missing.png", "not found"), ("notimage.jpg", "cannot read image")])
def test_a_bad_add_path_is_an_error_and_loses_nothing(tiny, capsys, name, message):
    tmp, model, tokenizer = tiny
    session = chat.ChatSession(LLaVA.from_pretrained(str(tmp / "model")), tokenizer, TEMPLATE,
                               max_new_tokens=MAX_NEW, max_context=256)
    session.set_image(str(tmp / "a.png"))
    first = session.reply("What is it?", out=StopAfter(-1))
    assert chat.command(session, f"/add {tmp / name}")
    err = capsys.readouterr().err
    assert f"error: /add {tmp / name}" in err and message in err
    assert session.pending is None and session.conversation() == [human("<image>\nWhat is it?"), gpt(first)]
    chat.command(session, f"/add {tmp / 'b.png'}")  # the session goes on: a good path is taken
    second = session.reply("And this one?", out=StopAfter(-1))
    conv = [human("<image>\nWhat is it?"), gpt(first), human("<image>\nAnd this one?"), gpt(second)]
    assert session.conversation() == conv


def test_a_second_add_before_a_message_is_refused(tiny, capsys):
    tmp, model, tokenizer = tiny
    session = chat.ChatSession(LLaVA.from_pretrained(str(tmp / "model")), tokenizer, TEMPLATE, max_context=256)
    session.set_image(str(tmp / "a.png"))
    chat.command(session, f"/add {tmp / 'b.png'}")
    assert "a.png already goes before your next message" in capsys.readouterr().err
    assert session.pending is session.image


def two_image_chat(tiny, path):
    """A session about a.png, then b.png added, one answer each, saved to path: (session, first, second)."""
    tmp, model, tokenizer = tiny
    session = chat.ChatSession(LLaVA.from_pretrained(str(tmp / "model")), tokenizer, TEMPLATE,
                               max_new_tokens=MAX_NEW, max_context=256)
    session.set_image(str(tmp / "a.png"))
    first = session.reply("What is it?", out=StopAfter(-1))
    session.add_image(str(tmp / "b.png"))
    second = session.reply("And this one?", out=StopAfter(-1))
    session.save(str(path))
    return session, first, second


def test_save_lists_every_image_and_reset_keeps_only_the_first(tiny, tmp_path):
    tmp = tiny[0]
    session, first, second = two_image_chat(tiny, tmp_path / "t.json")
    saved = json.loads((tmp_path / "t.json").read_text())[0]
    assert saved["image"] == [str(tmp / "a.png"), str(tmp / "b.png")]
    assert saved["conversations"] == [human("<image>\nWhat is it?"), gpt(first), human("<image>\nAnd this one?"),
                                      gpt(second)]
    session.reset()
    answer = session.reply("What is it?", out=StopAfter(-1))
    assert session.conversation() == [human("<image>\nWhat is it?"), gpt(answer)] and answer == first


def test_a_saved_two_image_chat_reads_back_as_a_training_row(tiny, tmp_path):
    tmp, model, tokenizer = tiny
    two_image_chat(tiny, tmp_path / "t.json")
    conversations = json.loads((tmp_path / "t.json").read_text())[0]["conversations"]
    n = model.config.num_image_tokens
    item = LLaVADataset(str(tmp_path / "t.json"), str(tmp), tokenizer, TEMPLATE, n, model.config.image_size)[0]
    assert item["input_ids"].tolist() == render(conversations, TEMPLATE, tokenizer, [n, n])[0]
    assert len(item["pixel_values"]) == 2


# ---------------------------------------------------------------------------------------------------------------------
# faults at the boundary: the prompt, /save, a broken tokenizer


def transcript_session():
    """A ChatSession with one finished turn and no model: enough for /save."""
    session = object.__new__(chat.ChatSession)
    session.turns = [human("What is it?"), gpt("A cat.")]
    return session


def test_save_refuses_to_overwrite_unless_told(tmp_path, capsys):
    path = tmp_path / "transcript.json"
    path.write_text("my notes")
    session = transcript_session()
    assert chat.command(session, f"/save {path}")
    assert path.read_text() == "my notes" and "/save! " in capsys.readouterr().err
    assert chat.command(session, f"/save! {path}")
    assert json.loads(path.read_text())[0]["conversations"] == [human("What is it?"), gpt("A cat.")]
    assert "saved 1 turns" in capsys.readouterr().err


def test_save_does_not_follow_a_planted_tmp_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "transcript.json.tmp")  # the fixed temporary name an old writer used
    transcript_session().save(str(tmp_path / "transcript.json"))
    assert victim.read_text() == "precious" and json.loads((tmp_path / "transcript.json").read_text())
    assert sorted(os.listdir(tmp_path)) == ["transcript.json", "transcript.json.tmp", "victim.txt"]


def test_a_line_that_is_not_utf8_does_not_end_the_session(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait?\nsecond line\n"), "utf-8"))
    assert list(chat.read_lines(interactive=False)) == ["caf\ufffd au lait?", "second line"]


def test_a_broken_tokenizer_is_found_before_the_model_loads(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    monkeypatch.setattr(inference.formats, "load_llava", lambda *a, **kw: pytest.fail("the model was loaded first"))
    with pytest.raises(SystemExit, match="tokenizer.model: not a sentencepiece model"):
        chat.load(chat.parse_args(["--model", str(tmp_path), "--device", "cpu"]))


def test_the_demo_model_says_which_questions_it_was_trained_on(tiny, tmp_path, monkeypatch, capsys):
    tmp, _, _ = tiny
    monkeypatch.chdir(tmp_path)
    demo_checkpoint(tmp, tmp_path)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)  # a terminal, where the user types
    monkeypatch.setattr("builtins.input", lambda prompt="": (_ for _ in ()).throw(EOFError))  # then Ctrl-D
    chat.main([])
    assert "trained on, such as: What color is the circle?; What shape is the red object?" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [("--temperature", "nan", "must be at least 0, got nan"),
                                                  ("--max-new-tokens", "-5", "must be at least 1, got -5"),
                                                  ("--top-p", "0", "must be in (0, 1], got 0")])
def test_a_setting_out_of_range_is_refused_by_the_command_line(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit:
        chat.main([flag, value, "--prompt", "hi"])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_a_v0_reply_ends_at_its_stop_text(tiny, monkeypatch):
    """v0 models end a reply with "###" (the template's separator), not </s>: generation stops there, and neither
    the "#"s nor what follows them are shown or kept."""
    tmp, model, tokenizer = tiny
    session = chat.ChatSession(LLaVA.from_pretrained(str(tmp / "model")), tokenizer, "llava_v0", max_new_tokens=30,
                               max_context=256)
    tokens, fed = tokenizer.encode("Red.\n###Human: and more", bos=False), []

    def generate(*args, **kwargs):
        for token in tokens:
            fed.append(token)
            yield token
    monkeypatch.setattr(chat, "generate_llava", generate)
    out = io.StringIO()
    assert session.reply("What colour?", out=out) == "Red."
    assert out.getvalue() == "Red.\n\n" and len(fed) < len(tokens)
    assert session.conversation()[-1] == gpt("Red.")
