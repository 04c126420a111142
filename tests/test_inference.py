"""inference.py and LLaVA's batched generation: a batch answers what each question alone answers (greedy, fp32),
with and without images; the answer file is resumable and reads as a batch-1 run wrote it; int8 loading."""
import os
from collections import Counter
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import inference
from clip import CLIPVisionConfig
from fileio import read_jsonl
from llama import LlamaConfig, Tokenizer
from llava import LLaVA, LLaVAConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
QUESTIONS = ["What is it?", "What colour is the big shape in the middle of the picture?", "Count.",
             "Is there a circle or a square here, and where is it?", "Why?", "Name every shape you see, please."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint folder, model, tokenizer, items): a tiny random LLaVA with weights large enough that answers
    depend on the image and the words, and questions with and without images."""
    tmp = tmp_path_factory.mktemp("inference")
    tokenizer = Tokenizer(os.path.join(FIXTURES, "tokenizer.model"))
    config = LLaVAConfig(llm=replace(LlamaConfig.from_name("tiny"), vocab_size=tokenizer.vocab_size),
                         vision=CLIPVisionConfig.from_name("tiny"))
    torch.manual_seed(0)
    model = LLaVA(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("llm.", "projector.")):
                p.normal_(0.0, 0.5 if p.ndim > 1 else 1.0)
    model.save_pretrained(str(tmp / "model"))
    shutil.copy(os.path.join(FIXTURES, "tokenizer.model"), tmp / "model" / "tokenizer.model")
    rng = np.random.default_rng(0)
    for n in range(3):
        Image.fromarray(rng.integers(0, 256, (30 + 4 * n, 40, 3), dtype=np.uint8)).save(tmp / f"{n}.png")
    items = [{"question_id": f"q{n}", "text": q, "image_path": str(tmp / f"{n % 3}.png") if n % 2 == 0 else None}
             for n, q in enumerate(QUESTIONS)]
    model, tokenizer = inference.load_model(str(tmp / "model"), "cpu", "float32")
    return str(tmp / "model"), model, tokenizer, items


def one_by_one(model, tokenizer, items, max_new_tokens):
    return [inference.answer(model, tokenizer, item["text"], item["image_path"], max_new_tokens) for item in items]


def test_llava_batch_equals_each_prompt_alone_with_and_without_images(tiny):
    _, model, tokenizer, items = tiny
    prompts = [(torch.tensor(inference.prompt_ids(model, tokenizer, item["text"], item["image_path"])),
                inference.pixel_values(model, item["image_path"])) for item in items]
    alone = []
    for ids, pixels in prompts:
        model.llm.setup_cache(1, len(ids) + 10)
        alone.append(list(model.generate(ids[None], pixels, max_new_tokens=10)))
    assert len({len(ids) for ids, _ in prompts}) >= 4, "prompts of one length: no padding tested"
    assert model.generate_batch(prompts, max_new_tokens=10) == alone
    rows_with = Counter(token for out in alone for token in set(out))
    eos = next(token for token in alone[0] if 1 < rows_with[token] < len(alone))  # some rows stop, others run on
    expected = [out[:out.index(eos) + 1] if eos in out else out for out in alone]
    assert model.generate_batch(prompts, max_new_tokens=10, eos_id=eos) == expected


@pytest.fixture(scope="module")
def singles(tiny):
    _, model, tokenizer, items = tiny
    return one_by_one(model, tokenizer, items, 12)


@pytest.mark.parametrize("batch_size", [1, 4, 8])
def test_answer_batches_equal_answer(tiny, singles, batch_size):
    _, model, tokenizer, items = tiny
    got = {item["question_id"]: reply for batch in inference.answer_batches(model, tokenizer, items, 12, batch_size)
           for item, reply in batch}
    assert [got[item["question_id"]] for item in items] == singles
    assert model.llm.cache_len == 0  # freed afterwards


def test_batches_are_sorted_by_prompt_length(tiny, monkeypatch):
    _, model, tokenizer, items = tiny
    lengths, real = [], model.generate_batch
    monkeypatch.setattr(model, "generate_batch", lambda prompts, **kw: (
        lengths.append([len(ids) for ids, _ in prompts]), real(prompts, **kw))[1])
    for _ in inference.answer_batches(model, tokenizer, items, 2, batch_size=4):
        pass
    assert [len(b) for b in lengths] == [4, 2]
    flat = [n for batch in lengths for n in batch]
    assert flat == sorted(flat, reverse=True)  # longest first: the first batch sets up the largest cache


def record(item, text):
    return {"question_id": item["question_id"], "prompt": item["text"], "text": text}


def test_answer_file_resumes_and_reads_as_a_batch_1_run(tiny, tmp_path, monkeypatch):
    _, model, tokenizer, items = tiny
    path = str(tmp_path / "answers.jsonl")
    assert inference.answer_file(model, tokenizer, items[:3], path, record, 6, batch_size=2) == (0, 3)
    with open(path, "a") as f:
        f.write('{"question_id": "q5", "te')  # a torn last line (a crash mid-write)
    asked, real = [], model.generate_batch
    monkeypatch.setattr(model, "generate_batch", lambda prompts, **kw: (asked.append(len(prompts)),
                                                                          real(prompts, **kw))[1])
    assert inference.answer_file(model, tokenizer, items, path, record, 6, batch_size=2) == (3, 3)
    assert sum(asked) == 3  # only the three not answered before
    expected = [record(item, text) for item, text in zip(items, one_by_one(model, tokenizer, items, 6))]
    assert read_jsonl(path) == expected  # the items' order, not the batches'
    assert inference.answer_file(model, tokenizer, items, path, record, 6) == (6, 0) and sum(asked) == 3


def test_int8_weights_load_and_answer(tiny):
    from quantize import Int8Linear
    path, model, tokenizer, items = tiny
    quantized, _ = inference.load_model(path, "cpu", "float32", quantize="int8")
    linears = [m for part in (quantized.llm.layers, quantized.projector) for m in part.modules()
               if isinstance(m, (torch.nn.Linear, Int8Linear))]
    assert len(linears) == 7 * len(quantized.llm.layers) + 2 and all(isinstance(m, Int8Linear) for m in linears)
    replies = one_by_one(quantized, tokenizer, items[:3], 6)
    assert all(isinstance(r, str) for r in replies)
    batched = [reply for batch in inference.answer_batches(quantized, tokenizer, items[:3], 6) for _, reply in batch]
    assert sorted(batched) == sorted(replies)
    with pytest.raises(ValueError, match="quantize='int4' is not supported"):
        inference.load_model(path, "cpu", "float32", quantize="int4")


def test_an_unknown_dtype_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="dtype='fp16' is not supported; known: float32, bfloat16, float16"):
        inference.load_model(str(tmp_path), "cpu", "fp16")


def test_default_batch_size():
    assert inference.default_batch_size("cpu") == 8 and inference.default_batch_size("cuda:1") == 32


def test_without_torchrun_it_is_one_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with inference.distributed("cpu") as (rank, world, device):
        assert (rank, world, device) == (0, 1, "cpu")
