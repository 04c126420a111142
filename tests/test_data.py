import functools
import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data
from clip import CLIPVisionConfig, anyres_grid, preprocess_anyres
from demo import DEMO_COLORS, DEMO_PLACES, demo_answer_correct, make_demo_data
from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX, render
from llama import LlamaConfig
from llava import LLaVAConfig
from tokenizer import Tokenizer

N_IMG = 5  # image placeholders per image in these tests


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(str(tmp_path_factory.mktemp("demo")), seed=0, n_train=240, n_eval=12)


@pytest.fixture(scope="module")
def tok(demo):
    return Tokenizer(demo["tokenizer"])


def reference_ids(tok, prompt, n_image_tokens=N_IMG):
    """The original pipeline on a prompt string: tokenizer_image_token splits at <image>, the HF (legacy)
    LlamaTokenizer turns "<s>" / "</s>" into bos / eos and sentencepiece-encodes each text chunk between them
    (each with its dummy prefix); bos first. n_image_tokens: every image's count, or a list of each image's."""
    ids = [tok.bos_id]
    for j, chunk in enumerate(prompt.split("<image>")):
        if j:
            ids += [IMAGE_TOKEN_INDEX] * (n_image_tokens[j - 1] if isinstance(n_image_tokens, list) else n_image_tokens)
        for part in re.split(r"(</?s>)", chunk):
            ids += [tok.bos_id] if part == "<s>" else [tok.eos_id] if part == "</s>" else tok.sp.encode(part)
    return ids


def turns(*values):
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


CONV = turns("What is in the picture?\n<image>", "A red circle on the left.", "How many shapes are there?",
             "There is 1 shape.", "  Odd  spacing,\nnewline ünï 😀 42?", "\nIt starts with a newline.")
VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


@pytest.mark.parametrize("which", ["demo", "llama fixture"])
def test_vicuna_v1_matches_the_original_prompt_string(tok, which):
    if which == "llama fixture":  # a second LLaMA-style tokenizer, trained on other text
        tok = Tokenizer(os.path.join(os.path.dirname(__file__), "fixtures", "tokenizer.model"))
    prompt = (VICUNA + " USER: <image>\nWhat is in the picture? ASSISTANT: A red circle on the left.</s>"
              "USER: How many shapes are there? ASSISTANT: There is 1 shape.</s>"
              "USER:   Odd  spacing,\nnewline ünï 😀 42? ASSISTANT: \nIt starts with a newline.</s>")
    ids, labels = render(CONV, "vicuna_v1", tok, N_IMG)
    assert ids == reference_ids(tok, prompt)
    assert ids.count(IMAGE_TOKEN_INDEX) == N_IMG and len(labels) == len(ids)
    gen, _ = render(CONV[:3], "vicuna_v1", tok, N_IMG, for_generation=True)
    first_round = prompt.split("</s>")[0] + "</s>"
    assert gen == reference_ids(tok, first_round + "USER: How many shapes are there? ASSISTANT:")
    # the original's CLI prompt for v1 checkpoints ("human") is a separate template
    ids, _ = render(CONV[:2], "llava_v1", tok, N_IMG)
    assert ids == reference_ids(tok, VICUNA.replace("user", "human") + " USER: <image>\nWhat is in the picture? "
                                "ASSISTANT: A red circle on the left.</s>")


def test_text_only_conversation_has_no_image_tokens(tok):
    conv = turns("Hello there.", "Hi.")
    ids, labels = render(conv, "vicuna_v1", tok, N_IMG)
    assert ids == reference_ids(tok, VICUNA + " USER: Hello there. ASSISTANT: Hi.</s>")
    assert IMAGE_TOKEN_INDEX not in ids


def test_labels_are_exactly_the_replies_and_their_end_token(tok):
    for name, after in (("vicuna_v1", ""), ("llama_2", " ")):  # llama_2 replies are " " + reply + " " + "</s>"
        ids, labels = render(CONV, name, tok, N_IMG)
        assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(labels, ids))
        runs, run = [], []
        for i, lab in zip(ids, labels):  # maximal runs of labelled tokens
            if lab != IGNORE_INDEX:
                run.append(i)
            elif run:
                runs, run = runs + [run], []
        runs += [run] if run else []
        replies = [t["value"] for t in CONV[1::2]]
        assert len(runs) == len(replies)
        for run, reply in zip(runs, replies):
            assert run[-1] == tok.eos_id and tok.eos_id not in run[:-1]
            assert tok.decode(run[:-1]) == reply + after  # (decode drops the space before the first word)


def test_training_ids_start_with_the_generation_ids_of_each_prefix(tok):
    for name in ("vicuna_v1", "llava_v1", "llama_2", "llava_llama_2"):
        ids, labels = render(CONV, name, tok, N_IMG)
        reply_starts = []
        for k in range(0, len(CONV), 2):
            gen, gen_labels = render(CONV[:k + 1], name, tok, N_IMG, for_generation=True)
            assert ids[:len(gen)] == gen, (name, k)
            assert gen_labels == labels[:len(gen)]
            assert labels[len(gen)] != IGNORE_INDEX and labels[len(gen) - 1] == IGNORE_INDEX  # the reply starts here
            reply_starts.append(len(gen))
        assert reply_starts == sorted(reply_starts)


def test_llama_2_matches_the_original_prompt_string(tok):
    system = data.TEMPLATES["llava_llama_2"].system
    prompt = (f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n<image>\nWhat is in the picture? [/INST] A red circle on the "
              "left. </s><s>[INST] How many shapes are there? [/INST] There is 1 shape. </s>")
    assert render(CONV[:4], "llava_llama_2", tok, N_IMG)[0] == reference_ids(tok, prompt)


def test_plain_is_image_caption_newline_with_loss_on_caption_and_newline(tok):
    conv = turns("Describe the image concisely.\n<image>", "A small red circle on the left.")
    ids, labels = render(conv, "plain", tok, N_IMG)
    caption = tok.sp.encode("A small red circle on the left.\n")
    assert ids == [tok.bos_id] + [IMAGE_TOKEN_INDEX] * N_IMG + caption  # the instruction text is dropped
    assert ids == reference_ids(tok, "<image>A small red circle on the left.\n")
    assert labels == [IGNORE_INDEX] * (1 + N_IMG) + caption
    assert tok.sp.id_to_piece(labels[-1]) == "<0x0A>"
    assert render(conv[:1], "plain", tok, N_IMG, for_generation=True)[0] == ids[:1 + N_IMG]


def test_image_placeholder_is_moved_to_the_front_of_its_turn(tok):
    a = render(turns("Where is it?\n<image>", "Left."), "vicuna_v1", tok, N_IMG)
    b = render(turns("<image>\nWhere is it?", "Left."), "vicuna_v1", tok, N_IMG)
    c = render(turns("Where <image> is it?", "Left."), "vicuna_v1", tok, N_IMG)
    assert a == b and c[0] == reference_ids(tok, VICUNA + " USER: <image>\nWhere  is it? ASSISTANT: Left.</s>")


@pytest.mark.parametrize("conv, for_generation, message", [
    (turns("hi", "hello"), True, "ends with a human turn"),
    (turns("hi"), False, "must end with an assistant"),
    ([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}], True, "expected 'human'"),
    ([{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}], False, "unknown role 'bot'"),
    (turns("hi", "see <image>"), False, "without <image>"),
    ([], False, "non-empty list"),
])
def test_render_rejects_malformed_conversations(tok, conv, for_generation, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        render(conv, "vicuna_v1", tok, N_IMG, for_generation=for_generation)
    with pytest.raises(ValueError, match="unknown template 'nope'"):
        render(turns("hi", "x"), "nope", tok, N_IMG)
    with pytest.raises(ValueError, match="plain template"):
        render(turns("no image", "x"), "plain", tok, N_IMG)


def test_truncation_never_splits_an_image_run():
    ids = [1, 7, 8] + [IMAGE_TOKEN_INDEX] * 4 + [9, 10]
    labels = [IGNORE_INDEX] * 7 + [9, 10]
    for max_length in range(4, 7):  # every cut inside the run drops the whole image
        assert data.truncate(ids, labels, max_length, 4) == (ids[:3], labels[:3])
    assert data.truncate(ids, labels, 8, 4) == (ids[:8], labels[:8])
    assert data.truncate(ids, labels, 99, 4) == (ids, labels)


def write_rows(path, rows):
    with open(path, "w") as f:
        json.dump(rows, f)
    return str(path)


def test_dataset_items_and_collate(tmp_path, demo, tok):
    image = "train_00000.png"
    rows = [{"id": "a", "image": image, "conversations": turns("What color?\n<image>", "Red.", "And now?", "Blue.")},
            {"id": "b", "conversations": turns("Just text.", "Fine.")},
            {"id": "c", "image": image, "conversations": turns("No placeholder here.", "Ok.")}]
    ds = data.LLaVADataset(write_rows(tmp_path / "d.json", rows), demo["images"], tok, "vicuna_v1", N_IMG, 32)
    assert len(ds) == 3 and not ds.skipped
    a, b, c = ds[0], ds[1], ds[2]
    assert a["input_ids"].tolist() == render(ds.rows[0][1]["conversations"], "vicuna_v1", tok, N_IMG)[0]
    assert a["pixel_values"].shape == (1, 3, 32, 32) and b["pixel_values"] is None
    # an image row without <image>: the image goes in front of the first human turn
    assert c["input_ids"].tolist() == render(turns("<image>\nNo placeholder here.", "Ok."), "vicuna_v1", tok, N_IMG)[0]
    assert ds.lengths == [7, -3, 4]  # the original's modality lengths: words of all turns, negative without image
    batch = data.collate([b, a, c], pad_id=tok.pad_id)
    T = max(len(a["input_ids"]), len(b["input_ids"]), len(c["input_ids"]))
    assert batch["input_ids"].shape == batch["labels"].shape == (3, T)
    n = len(b["input_ids"])
    assert batch["input_ids"][0, :n].tolist() == b["input_ids"].tolist()
    assert (batch["input_ids"][0, n:] == tok.pad_id).all() and (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert torch.equal(batch["pixel_values"], torch.cat([a["pixel_values"], c["pixel_values"]]))
    assert data.collate([b], pad_id=0)["pixel_values"] is None
    assert batch["image_sizes"] is None  # fixed-size images: the model needs no sizes


def test_dataset_truncation_skips_samples_left_without_labels(tmp_path, demo, tok):
    long_question = "word " * 60
    rows = [{"id": "short", "image": "train_00000.png", "conversations": turns("<image>\nHi?", "Red.")},
            {"id": "long", "image": "train_00000.png", "conversations": turns("<image>\n" + long_question, "Red.")},
            {"id": "cut", "conversations": turns("Hi?", "Red " * 80)}]
    ds = data.LLaVADataset(write_rows(tmp_path / "d.json", rows), demo["images"], tok, "vicuna_v1", N_IMG, 32,
                           max_length=60)
    assert [row["id"] for _, row, _ in ds.rows] == ["short", "cut"]
    assert ds.skipped == {"no labels after truncation": 1}
    for i in range(len(ds)):
        item = ds[i]
        assert len(item["input_ids"]) <= 60 and (item["labels"] != IGNORE_INDEX).any()


BAD_ROWS = [
    ({"id": "r1", "conversation": []}, "missing conversations"),
    ({"id": "r2", "conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}, "bad turns"),
    ({"id": "r3", "conversations": turns("a", "b", "c")}, "bad turns"),
    ({"id": "r4", "image": "missing.png", "conversations": turns("<image>\na", "b")}, "image not found"),
    ({"id": "r5", "image": "garbage.png", "conversations": turns("<image>\na", "b")}, "image unreadable"),
    ({"id": "r6", "conversations": turns("<image>\na", "b")}, "<image> without an image"),
    ({"id": "r7", "image": ["ok.png", 7], "conversations": turns("<image>\na", "b")}, "bad image"),
    ({"id": "r8", "image": "ok.png", "conversations": turns("<image>\na", "b", "<image>\nc", "d")},
     "image count mismatch: 2 <image> in the human turns, 1 images in 'image'"),
    ({"id": "r9", "image": ["ok.png", "ok.png"], "conversations": turns("<image>\na", "b")},
     "image count mismatch: 1 <image> in the human turns, 2 images in 'image'"),
    ({"id": "r10", "image": ["ok.png", "missing.png"], "conversations": turns("<image> <image>\na", "b")},
     "image not found"),  # each image of a list is checked
]


@pytest.mark.parametrize("row, reason", BAD_ROWS)
def test_bad_rows_raise_an_error_naming_row_and_file(tmp_path, demo, tok, row, reason):
    (tmp_path / "garbage.png").write_bytes(b"this is not a png")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    good = {"id": "ok", "conversations": turns("a", "b")}
    path = write_rows(tmp_path / "rows.json", [good, row])
    with pytest.raises(ValueError, match=re.escape(f"{path}: row 1 (id {row['id']!r}): {reason}")):
        data.LLaVADataset(path, str(tmp_path), tok, "vicuna_v1", N_IMG, 32)


def test_skip_bad_counts_bad_rows_by_reason(tmp_path, tok):
    (tmp_path / "garbage.png").write_bytes(b"this is not a png")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    rows = [{"id": "ok", "conversations": turns("a", "b")}] + [row for row, _ in BAD_ROWS]
    ds = data.LLaVADataset(write_rows(tmp_path / "rows.json", rows), str(tmp_path), tok, "vicuna_v1", N_IMG, 32,
                           skip_bad=True)
    assert len(ds) == 1 and ds.skipped == {"missing conversations": 1, "bad turns": 2, "image not found": 2,
                                           "image unreadable": 1, "<image> without an image": 1, "bad image": 1,
                                           "image count mismatch": 2}


def test_truncated_image_file_fails_in_getitem_naming_row_and_file(tmp_path, demo, tok):
    png = open(os.path.join(demo["images"], "train_00001.png"), "rb").read()
    (tmp_path / "cut.png").write_bytes(png[:len(png) // 2])  # valid header, pixel data cut off
    path = write_rows(tmp_path / "rows.json", [{"id": "x", "image": "cut.png", "conversations": turns("<image>", "b")}])
    ds = data.LLaVADataset(path, str(tmp_path), tok, "vicuna_v1", N_IMG, 32)
    with pytest.raises(ValueError, match=re.escape(f"{path}: row 0 (id 'x')") + ".*cut.png"):
        ds[0]
    (tmp_path / "broken.json").write_text('[{"id": 1,}]')
    with pytest.raises(ValueError, match="broken.json: invalid JSON"):
        data.LLaVADataset(str(tmp_path / "broken.json"), str(tmp_path), tok, "vicuna_v1", N_IMG, 32)


def cut_png(demo, tmp_path):
    png = open(os.path.join(demo["images"], "train_00001.png"), "rb").read()
    (tmp_path / "cut.png").write_bytes(png[:len(png) // 2])  # valid header, pixel data cut off
    shutil.copy(os.path.join(demo["images"], "train_00001.png"), tmp_path / "ok.png")
    rows = [{"id": "x", "image": "cut.png", "conversations": turns("<image>", "b")},
            {"id": "y", "image": "ok.png", "conversations": turns("<image>", "c")}]
    return write_rows(tmp_path / "rows.json", rows)


def test_skip_bad_turns_an_image_corrupt_past_its_header_into_a_sample_that_trains_nothing(tmp_path, demo, tok):
    ds = data.LLaVADataset(cut_png(demo, tmp_path), str(tmp_path), tok, "vicuna_v1", N_IMG, 32, skip_bad=True)
    assert len(ds) == 2 and not ds.skipped  # the header is fine: nothing to see at start-up
    bad, good = ds[0], ds[1]
    assert bad["skipped"] == 1 and (bad["labels"] == IGNORE_INDEX).all()  # no labels: no loss, no gradient
    assert torch.equal(bad["pixel_values"], torch.zeros(1, 3, 32, 32))  # the placeholders still get an image
    assert good["skipped"] == 0 and (good["labels"] != IGNORE_INDEX).any()


def test_collate_counts_the_skipped_samples(tmp_path, demo, tok):
    ds = data.LLaVADataset(cut_png(demo, tmp_path), str(tmp_path), tok, "vicuna_v1", N_IMG, 32, skip_bad=True)
    batch = data.collate([ds[0], ds[1], ds[0]], pad_id=tok.pad_id)
    assert batch["skipped"] == 2 and batch["pixel_values"].shape == (3, 3, 32, 32)
    assert data.collate([ds[1]], pad_id=tok.pad_id)["skipped"] == 0


@pytest.mark.slow
def test_skipped_samples_reach_the_loop_from_dataloader_workers(tmp_path, demo, tok):
    ds = data.LLaVADataset(cut_png(demo, tmp_path), str(tmp_path), tok, "vicuna_v1", N_IMG, 32, skip_bad=True)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=[[0, 1], [1], [0]], num_workers=1,
                                         collate_fn=functools.partial(data.collate, pad_id=tok.pad_id))
    assert [batch["skipped"] for batch in loader] == [1, 0, 1]


@pytest.mark.parametrize("image", ["../../etc/passwd", "/etc/passwd", "sub/../../x.png"])
def test_image_paths_stay_inside_the_image_folder(tmp_path, tok, image):
    (tmp_path / "images").mkdir()
    path = write_rows(tmp_path / "rows.json", [{"id": "ok", "conversations": turns("a", "b")},
                                                {"id": "evil", "image": image, "conversations": turns("<image>", "b")}])
    with pytest.raises(ValueError, match=re.escape(f"{path}: row 1 (id 'evil'): image outside the image folder: ")
                       + ".*leaves the folder"):
        data.LLaVADataset(path, str(tmp_path / "images"), tok, "vicuna_v1", N_IMG, 32)
    ds = data.LLaVADataset(path, str(tmp_path / "images"), tok, "vicuna_v1", N_IMG, 32, skip_bad=True)
    assert len(ds) == 1 and ds.skipped == {"image outside the image folder": 1}


def test_an_absolute_image_path_inside_the_image_folder_is_accepted(tmp_path, demo, tok):
    image = os.path.join(demo["images"], "train_00000.png")  # as chat.py's /save writes it
    path = write_rows(tmp_path / "rows.json", [{"id": "abs", "image": image, "conversations": turns("<image>", "b")}])
    assert len(data.LLaVADataset(path, demo["images"], tok, "vicuna_v1", N_IMG, 32)) == 1


def test_a_json_file_that_is_not_utf8_is_named(tmp_path, tok):
    (tmp_path / "latin1.json").write_bytes(json.dumps([{"id": "caf\u00e9", "conversations": turns("a", "b")}],
                                                      ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.json: not UTF-8"):
        data.LLaVADataset(str(tmp_path / "latin1.json"), str(tmp_path), tok, "vicuna_v1", N_IMG, 32)


def test_an_extreme_aspect_ratio_is_refused_at_start_up_naming_the_row(tmp_path, tok):
    Image.new("RGB", (1, 25)).save(tmp_path / "strip.png")
    rows = [{"id": "s", "image": "strip.png", "conversations": turns("<image>", "b")}]
    path = write_rows(tmp_path / "rows.json", rows)
    with pytest.raises(ValueError, match=r"rows.json: row 0 \(id 's'\): image aspect ratio: .*strip.png"):
        data.LLaVADataset(path, str(tmp_path), tok, "vicuna_v1", N_IMG, 32)


def test_modality_length_grouping_splits_ranks_groups_modalities_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    lengths = [int(x) * (1 if i % 3 else -1) for i, x in enumerate(torch.randint(10, 500, (203,), generator=g))]
    bs, ws = 4, 2
    order = data.modality_length_grouped_indices(lengths, bs, ws, torch.Generator().manual_seed(1))
    assert sorted(order) == list(range(203))
    assert order == data.modality_length_grouped_indices(lengths, bs, ws, torch.Generator().manual_seed(1))
    assert order != data.modality_length_grouped_indices(lengths, bs, ws, torch.Generator().manual_seed(2))
    megabatches = [order[i:i + bs * ws] for i in range(0, len(order), bs * ws)][:-2]  # the last mix the leftovers
    assert all(len({lengths[i] > 0 for i in mb}) == 1 for mb in megabatches)  # one modality per global batch
    # the two ranks' halves of one global batch carry similar token totals (longest first to the lighter rank)
    gaps = [abs(sum(abs(lengths[i]) for i in mb[:bs]) - sum(abs(lengths[i]) for i in mb[bs:])) for mb in megabatches]
    assert max(gaps) <= 500
    # each rank's chunk is its share of one sorted megabatch: longest first
    assert all(sorted(chunk, key=lambda i: -abs(lengths[i])) == chunk for mb in megabatches
               for chunk in (mb[:bs], mb[bs:]))


def file_hashes(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_demo_data_is_byte_identical_for_a_seed(tmp_path, demo):
    again = make_demo_data(str(tmp_path / "again"), seed=0, n_train=240, n_eval=12)
    other = make_demo_data(str(tmp_path / "other"), seed=1, n_train=240, n_eval=12)
    ref = file_hashes(os.path.dirname(demo["stage1"]))
    assert len(ref) == 240 + 12 + 4 and ref == file_hashes(os.path.dirname(again["stage1"]))
    assert ref["stage2.json"] != file_hashes(os.path.dirname(other["stage1"]))["stage2.json"]


def test_demo_single_turn_knob_splits_conversations_and_keeps_images(tmp_path, demo):
    single = make_demo_data(str(tmp_path / "single"), seed=0, n_train=240, n_eval=12, single_turn=True,
                                 extra_share=0)
    ref, new = file_hashes(os.path.dirname(demo["stage1"])), file_hashes(os.path.dirname(single["stage1"]))
    assert {k: v for k, v in ref.items() if k.startswith("images") or k == "eval.json"} == \
        {k: v for k, v in new.items() if k.startswith("images") or k == "eval.json"}

    def qa_pairs(rows):
        return sorted((r["image"], t["value"].replace("<image>", "").strip(), a["value"])
                      for r in rows if "_conversation" in r["id"]
                      for t, a in zip(r["conversations"][::2], r["conversations"][1::2]))
    rows = json.load(open(single["stage2"]))
    assert len(rows) == sum(len(r["conversations"]) // 2 for r in json.load(open(demo["stage2"]))
                            if "_conversation" in r["id"])  # no detail or reasoning rows
    assert all(len(r["conversations"]) == 2 and r["conversations"][0]["value"].startswith("<image>\n") for r in rows)
    assert qa_pairs(rows) == qa_pairs(json.load(open(demo["stage2"])))  # the same questions, one per sample


def test_demo_extra_share_keeps_a_share_of_detail_and_reasoning_rows(tmp_path, demo):
    quarter = make_demo_data(str(tmp_path / "quarter"), seed=0, n_train=240, n_eval=12, extra_share=0.25)
    rows, full = json.load(open(quarter["stage2"])), json.load(open(demo["stage2"]))
    extras = [r for r in rows if "_conversation" not in r["id"]]
    assert sum("_detail" in r["id"] for r in extras) == sum("_reasoning" in r["id"] for r in extras) == 30
    assert all(r in full for r in rows) and len(full) - len(rows) == 180  # the same rows, fewer extras


def test_demo_sizes_knob(tmp_path):
    large = make_demo_data(str(tmp_path / "large"), seed=0, n_train=30, n_eval=4, sizes=("large",))
    captions = " ".join(r["conversations"][1]["value"] for r in json.load(open(large["stage1"])))
    assert "large" in captions and "small" not in captions
    with pytest.raises(ValueError, match="sizes must be"):
        make_demo_data(str(tmp_path / "bad"), sizes=("huge",))


def test_demo_data_content(demo, tok):
    stage1, stage2, evaluation = (json.load(open(demo[k])) for k in ("stage1", "stage2", "eval"))
    assert len(stage1) == 240 and len(stage2) == 480 and len(evaluation) == 48
    assert {r["id"].rsplit("_", 1)[1] for r in stage2} == {"conversation", "detail", "reasoning"}
    train_images = {r["image"] for r in stage1 + stage2}
    assert not train_images & {e["image"] for e in evaluation}  # held out
    # every eval question is asked, in the same words, in the training conversations (about other images)
    asked = {t["value"].replace("<image>", "").strip() for r in stage2 for t in r["conversations"][::2]}
    assert {e["question"] for e in evaluation} <= asked
    assert {e["category"] for e in evaluation} == {"color", "shape", "count", "position"}
    for e in evaluation:  # answers agree with the pixels
        pixels = np.asarray(Image.open(os.path.join(demo["images"], e["image"])))
        colors = [c for c, rgb in DEMO_COLORS.items() if (pixels == rgb).all(-1).any()]
        assert len(e["answer"].split()) == 1
        if e["category"] == "count":
            assert e["answer"] == str(len(colors))
        if e["category"] == "color":
            assert e["answer"] in colors
        if e["category"] == "position":
            color = e["question"].split()[3]
            x = np.nonzero((pixels == DEMO_COLORS[color]).all(-1))[1].mean() / pixels.shape[1]
            assert e["answer"] == DEMO_PLACES[int(x * 3)]
    # both stages load without a skipped row, and a demo prompt is short with this tokenizer
    s1 = data.LLaVADataset(demo["stage1"], demo["images"], tok, "plain", N_IMG, 32)
    s2 = data.LLaVADataset(demo["stage2"], demo["images"], tok, "vicuna_v1", N_IMG, 32)
    assert (len(s1), len(s2)) == (240, 480) and not s1.skipped and not s2.skipped
    assert max(s2.lengths) < 200 + N_IMG


def test_demo_answer_correct():
    assert demo_answer_correct("Red.", "red")
    assert demo_answer_correct(" two", "2") and demo_answer_correct("the circle", "circle")
    assert not demo_answer_correct("red circle", "red")
    assert not demo_answer_correct("", "")
    assert not demo_answer_correct("blue", "red")


REFERENCE = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "render_reference.json")))


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda c: f"{c['template']}-legacy={c['legacy']}-"
                                                                     f"{'image' if '<image>' in c['turns'][0] else 'text'}")
def test_render_equals_the_original_preprocess_under_transformers_4_37(case, tmp_path):
    """ids and labels of multi-turn conversations as the original's tokenizer_image_token + preprocess_v1 /
    preprocess_llama_2 / preprocess_plain give them, with `legacy` true and false in tokenizer_config.json."""
    shutil.copy(os.path.join(os.path.dirname(__file__), "fixtures", "tokenizer_user.model"),
                tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": case["legacy"]}))
    ids, labels = render(turns(*case["turns"]), case["template"], Tokenizer(str(tmp_path)), 1)
    assert (ids, labels) == (case["input_ids"], case["labels"])


def test_legacy_false_changes_the_ids_at_every_turn_boundary():
    legacy, bare = ([c for c in REFERENCE["cases"] if c["template"] == "vicuna_v1" and c["legacy"] == flag
                     and "<image>" in c["turns"][0]][0]["input_ids"] for flag in (True, False))
    assert len(legacy) - len(bare) == 2  # "</s>" "▁" "USER" becomes "</s>" "USER" after each of the 2 later rounds


def test_add_bos_token_false_starts_without_bos(tmp_path):
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizer.model")
    shutil.copy(fixture, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    ids, _ = render(CONV[:2], "vicuna_v1", Tokenizer(str(tmp_path)), N_IMG)
    with_bos, _ = render(CONV[:2], "vicuna_v1", Tokenizer(fixture), N_IMG)
    assert with_bos[0] == 1 and ids == with_bos[1:]


def test_a_leading_gpt_turn_is_dropped_and_counted(tmp_path, demo, tok):
    rows = [{"id": "a", "conversations": [{"from": "gpt", "value": "Hello, how can I help?"},
                                          *turns("What is red?", "A colour.")]},
            {"id": "b", "conversations": turns("What is red?", "A colour.")}]
    ds = data.LLaVADataset(write_rows(tmp_path / "d.json", rows), demo["images"], tok, "vicuna_v1", N_IMG, 32)
    assert ds.dropped_first_turn == 1 and not ds.skipped
    assert ds[0]["input_ids"].tolist() == ds[1]["input_ids"].tolist()
    assert ds.lengths == [-10, -5]  # the original counts the words of every turn, the dropped one too


# ------------------------------------------------------------------------------------------- v0 templates
# conv_llava_v0 / conv_vicuna_v0 of the original's llava/conversation.py (SeparatorStyle.SINGLE), written out as
# its get_prompt() returns them: system + "###", then "Role: message###" per message, the open turn "Assistant:"
V0 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
      "detailed, and polite answers to the human's questions.")
V0_SHOT = (
    "###Human: What are the key differences between renewable and non-renewable energy sources?###Assistant: "
    "Renewable energy sources are those that can be replenished naturally in a relatively short amount of time, "
    "such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other hand, are finite "
    "and will eventually be depleted, such as coal, oil, and natural gas. Here are some key differences between "
    "renewable and non-renewable energy sources:\n1. Availability: Renewable energy sources are virtually "
    "inexhaustible, while non-renewable energy sources are finite and will eventually run out.\n2. Environmental "
    "impact: Renewable energy sources have a much lower environmental impact than non-renewable sources, which can "
    "lead to air and water pollution, greenhouse gas emissions, and other negative effects.\n3. Cost: Renewable "
    "energy sources can be more expensive to initially set up, but they typically have lower operational costs than "
    "non-renewable sources.\n4. Reliability: Renewable energy sources are often more reliable and can be used in "
    "more remote locations than non-renewable sources.\n5. Flexibility: Renewable energy sources are often more "
    "flexible and can be adapted to different situations and needs, while non-renewable sources are more rigid and "
    "inflexible.\n6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
    "non-renewable sources are not, and their depletion can lead to economic and social instability.\n###")
V0_TURNS = ("Human: <image>\nWhat is in the picture?###Assistant: A red circle on the left.###Human: How many?"
            "###Assistant:")


@pytest.mark.parametrize("name, prompt", [("llava_v0", V0 + "###" + V0_TURNS), ("vicuna_v0", V0 + V0_SHOT + V0_TURNS)])
def test_v0_templates_render_the_original_prompt_string(tok, name, prompt):
    conversation = turns("What is in the picture?\n<image>", "A red circle on the left.", "How many?")
    ids, labels = render(conversation, name, tok, N_IMG, for_generation=True)
    assert ids == reference_ids(tok, prompt) and set(labels) == {IGNORE_INDEX}


def test_v0_templates_stop_at_their_separator():
    assert data.TEMPLATES["llava_v0"].stop == "###" and data.TEMPLATES["vicuna_v1"].stop == ""


def test_v0_templates_refuse_training_samples(tok):  # the original trained them on another text
    with pytest.raises(ValueError, match="chat prompts only"):
        render(turns("<image>\nWhat?", "A circle."), "llava_v0", tok, N_IMG)


def test_image_start_end_equals_transformers_4_37_on_the_originals_prompt(tmp_path):
    """LLaVA v0 (mm_use_im_start_end): "<im_start><image><im_end>\\n" + question through the original's
    tokenizer_image_token and the slow LlamaTokenizer of transformers 4.37 with added_tokens.json, ids recorded."""
    shutil.copy(os.path.join(os.path.dirname(__file__), "fixtures", "tokenizer.model"), tmp_path / "tokenizer.model")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<im_patch>": 512, "<im_start>": 513, "<im_end>": 514}))
    ids, _ = render(turns("<image>\nWhat is it?"), data.Template("single", "A chat between."), Tokenizer(tmp_path), 3,
                    for_generation=True, image_start_end=True)
    assert ids == [1, 277, 266, 300, 397, 451, 467, 450, 400, 468, 38, 38, 38, 492, 471, 472, 269, 469, 449, 513,
                   -200, -200, -200, 514, 449, 13, 483, 300, 268, 443, 481, 38, 38, 38, 470, 338, 455, 458, 451, 269,
                   451, 469]


def test_image_start_end_needs_the_added_tokens(tok):
    with pytest.raises(KeyError, match="<im_start>"):
        render(turns("<image>\nWhat?"), "llava_v0", tok, N_IMG, for_generation=True, image_start_end=True)


# ------------------------------------------------------------------------------------------- LLaVA-1.6 templates
RENDER_1_6 = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "render_1_6.json")))["cases"]


@pytest.mark.parametrize("case", RENDER_1_6, ids=lambda c: f"{c['template']}-legacy={c['legacy']}")
def test_llava_1_6_templates_equal_the_originals_prompt_under_transformers_4_37(case, tmp_path):
    """conv_mistral_instruct / conv_chatml_direct's get_prompt() string through tokenizer_image_token: ids equal."""
    shutil.copy(os.path.join(os.path.dirname(__file__), "fixtures", "tokenizer.model"), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(case["settings"]))
    if case["template"] == "chatml_direct":
        (tmp_path / "added_tokens.json").write_text(json.dumps({"<|im_start|>": 512, "<|im_end|>": 513}))
    conversation = turns("What is in the picture?\n<image>", "A red circle on the left.", "How many?")
    ids, _ = render(conversation, case["template"], Tokenizer(str(tmp_path)), 1, for_generation=True)
    assert ids == case["input_ids"]


@pytest.mark.parametrize("name", ["mistral_instruct", "chatml_direct"])
def test_llava_1_6_templates_refuse_training_samples(tok, name):  # the original released no training code for them
    with pytest.raises(ValueError, match="chat prompts only"):
        render(turns("<image>\nWhat?", "A circle."), name, tok, N_IMG)


def test_chatml_replies_stop_at_im_end():
    assert data.TEMPLATES["chatml_direct"].stop == "<|im_end|>" and data.TEMPLATES["mistral_instruct"].stop == ""


def test_chatml_needs_its_special_tokens(tok):
    with pytest.raises(ValueError, match=r"special token=\"<\|im_start\|>\" is neither a piece"):
        render(turns("<image>\nWhat?"), "chatml_direct", tok, N_IMG, for_generation=True)


# ------------------------------------------------------------------------- several images per row, and anyres
# A 64 px tower (16 tokens a tile) with 1x2, 2x1 and 2x2 grids: each image's count depends on its size
ANYRES = LLaVAConfig(llm=LlamaConfig.from_name("tiny"), vision=CLIPVisionConfig.from_name("tiny"),
                     image_aspect_ratio="anyres", patch_merge_type="spatial_unpad",
                     image_grid_pinpoints=[[64, 128], [128, 64], [128, 128]])
SIZES = {"wide.png": (120, 40), "tall.png": (40, 100), "square.png": (64, 64)}


@pytest.fixture
def images(tmp_path):
    for name, size in SIZES.items():
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / name)
    return tmp_path


def anyres_dataset(tmp_path, rows, **kwargs):
    return data.LLaVADataset(write_rows(tmp_path / "rows.json", rows), str(tmp_path), kwargs.pop("tok"), "vicuna_v1",
                             ANYRES.image_tokens, ANYRES.image_size, grid_pinpoints=ANYRES.image_grid_pinpoints,
                             **kwargs)


MULTI = {"id": "m", "image": ["wide.png", "tall.png", "square.png"],
         "conversations": turns("Compare <image> with <image>.", "Same.", "And this one? <image>", "Red.")}


def test_several_images_keep_their_places_and_each_gets_its_own_count(images, tok):
    counts = [ANYRES.image_tokens(SIZES[name]) for name in MULTI["image"]]
    assert len(set(counts)) == 3  # three sizes, three counts
    item = anyres_dataset(images, [MULTI], tok=tok)[0]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    # a turn with several <image> keeps them in place; a turn with one has it moved to the front (LLaVA-NeXT)
    first = VICUNA + " USER: Compare <image> with <image>. ASSISTANT:"
    second = first + " Same.</s>USER: <image>\nAnd this one? ASSISTANT:"
    assert ids == reference_ids(tok, second + " Red.</s>", counts)
    starts = [len(reference_ids(tok, first, counts)), len(reference_ids(tok, second, counts))]
    ends = [len(reference_ids(tok, first + " Same.</s>", counts)), len(ids)]
    expected = [i if any(a <= k < b for a, b in zip(starts, ends)) else IGNORE_INDEX for k, i in enumerate(ids)]
    assert labels == expected  # the two replies and their end tokens, nothing else


def test_a_multi_image_item_holds_every_images_tiles_and_size_in_order(images, tok):
    item = anyres_dataset(images, [MULTI], tok=tok)[0]
    tiles = [preprocess_anyres(Image.open(images / name), 64, ANYRES.image_grid_pinpoints) for name in MULTI["image"]]
    assert torch.equal(item["pixel_values"], torch.cat(tiles))
    assert item["image_sizes"] == [SIZES[name] for name in MULTI["image"]]


def test_truncation_with_counts_per_image_keeps_only_whole_images():
    ids = [1, 7] + [IMAGE_TOKEN_INDEX] * 3 + [8] + [IMAGE_TOKEN_INDEX] * 5 + [9, 10]
    labels = [IGNORE_INDEX] * 11 + [9, 10]
    for max_length in range(1, 14):
        cut_ids, cut_labels = data.truncate(ids, labels, max_length, [3, 5])
        assert cut_ids == ids[:len(cut_ids)] and cut_labels == labels[:len(cut_ids)] and len(cut_ids) <= max_length
        assert cut_ids.count(IMAGE_TOKEN_INDEX) in (0, 3, 8) and len(cut_ids) >= max_length - 4  # never mid-run
    assert data.truncate(ids, labels, 9, [3, 5]) == (ids[:6], labels[:6])  # the second image goes whole


def test_truncation_drops_the_pixels_of_the_images_it_cuts_off(images, tok):
    counts = [ANYRES.image_tokens(SIZES[name]) for name in MULTI["image"]]
    full = anyres_dataset(images, [MULTI], tok=tok)[0]["input_ids"].tolist()
    third = [k for k, i in enumerate(full) if i == IMAGE_TOKEN_INDEX][counts[0] + counts[1]]  # its first placeholder
    item = anyres_dataset(images, [MULTI], tok=tok, max_length=third + 5)[0]
    assert item["input_ids"].tolist() == full[:third]  # cut before the third image's run, not inside it
    assert (item["input_ids"] == IMAGE_TOKEN_INDEX).sum() == counts[0] + counts[1]
    assert item["image_sizes"] == [SIZES["wide.png"], SIZES["tall.png"]]  # what the model's embed gets: the two kept
    tiles = [1 + cols * rows for cols, rows in (anyres_grid(s, ANYRES.image_grid_pinpoints, 64)
                                                for s in item["image_sizes"])]
    assert len(item["pixel_values"]) == sum(tiles)


def test_anyres_rows_with_differently_sized_images_collate_in_batch_order(images, tok):
    rows = [{"id": "a", "image": "tall.png", "conversations": turns("<image>\nWhat?", "Red.")},
            {"id": "t", "conversations": turns("Just text.", "Fine.")}, MULTI]
    ds = anyres_dataset(images, rows, tok=tok)
    a, t, m = ds[0], ds[1], ds[2]
    assert t["pixel_values"] is None and t["image_sizes"] == []
    batch = data.collate([m, t, a], pad_id=tok.pad_id)
    assert torch.equal(batch["pixel_values"], torch.cat([m["pixel_values"], a["pixel_values"]]))
    assert batch["image_sizes"] == [*m["image_sizes"], SIZES["tall.png"]]
    assert (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum() == sum(ANYRES.image_tokens(s) for s in batch["image_sizes"])


def test_skip_bad_blanks_a_corrupt_image_of_a_list_with_its_tile_count(images, demo, tok):
    png = open(os.path.join(demo["images"], "train_00001.png"), "rb").read()  # 64 x 64
    (images / "cut.png").write_bytes(png[:len(png) // 2])  # valid header, pixel data cut off
    row = {"id": "x", "image": ["wide.png", "cut.png"], "conversations": turns("<image> and <image>?", "b")}
    item = anyres_dataset(images, [row], tok=tok, skip_bad=True)[0]
    wide = preprocess_anyres(Image.open(images / "wide.png"), 64, ANYRES.image_grid_pinpoints)
    assert item["skipped"] == 1 and (item["labels"] == IGNORE_INDEX).all()
    assert torch.equal(item["pixel_values"], torch.cat([wide, torch.zeros(3, 3, 64, 64)]))  # 64 x 64: 1 x 2 tiles
    with pytest.raises(ValueError, match=re.escape("row 0 (id 'x')") + ".*cut.png"):
        anyres_dataset(images, [row], tok=tok)[0]


def test_an_image_changed_since_start_up_is_named(images, tok):
    ds = anyres_dataset(images, [MULTI], tok=tok)
    Image.new("RGB", (64, 128)).save(images / "tall.png")  # its placeholders were counted for 40 x 100
    with pytest.raises(ValueError, match=r"row 0 \(id 'm'\): image file tall.png: 64x128 pixels, 40x100 at start-up"):
        ds[0]
