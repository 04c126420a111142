"""inference.py, the engine: a batch answers what each prompt alone answers (greedy, fp32; LLaMA prompts of mixed
lengths, LLaVA prompts with and without images); the answer file is resumable and reads as a batch-1 run wrote it;
int8 loading."""
import os
import shutil
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import inference
from clip import CLIPVisionConfig
from fileio import read_jsonl
from llama import LlamaConfig, generate
from llava import LLaVA, LLaVAConfig
from test_llama import MODELS, load
from tokenizer import Tokenizer

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
        alone.append(list(inference.generate_llava(model, ids[None], pixels, max_new_tokens=10)))
    assert len({len(ids) for ids, _ in prompts}) >= 4, "prompts of one length: no padding tested"
    with torch.no_grad():
        embeds = [model.embed(ids[None], pixels)[0] for ids, pixels in prompts]  # (T_i, D): LLaVA's prompts
    assert inference.generate_batch(model.llm, embeds, max_new_tokens=10) == alone
    rows_with = Counter(token for out in alone for token in set(out))
    eos = next(token for token in alone[0] if 1 < rows_with[token] < len(alone))  # some rows stop, others run on
    expected = [out[:out.index(eos) + 1] if eos in out else out for out in alone]
    assert inference.generate_batch(model.llm, embeds, max_new_tokens=10, eos_id=eos) == expected


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
    lengths, real = [], inference.generate_batch
    monkeypatch.setattr(inference, "generate_batch", lambda llm, prompts, **kw: (
        lengths.append([len(embeds) for embeds in prompts]), real(llm, prompts, **kw))[1])
    for _ in inference.answer_batches(model, tokenizer, items, 2, batch_size=4):
        pass
    assert [len(b) for b in lengths] == [4, 2]
    flat = [n for batch in lengths for n in batch]
    assert flat == sorted(flat, reverse=True)  # longest first: the first batch sets up the largest cache


def record(item, text):
    return {"question_id": item["question_id"], "prompt": item["text"], "text": text}


def test_answer_file_resumes_and_reads_as_a_batch_1_run(tiny, tmp_path, monkeypatch):
    folder, model, tokenizer, items = tiny
    path, source = str(tmp_path / "answers.jsonl"), inference.answer_source(folder, model, 6)
    assert inference.answer_file(model, tokenizer, items[:3], path, record, 6, batch_size=2, source=source) == (0, 3)
    with open(path, "a") as f:
        f.write('{"question_id": "q5", "te')  # a torn last line (a crash mid-write)
    asked, real = [], inference.generate_batch
    monkeypatch.setattr(inference, "generate_batch", lambda llm, prompts, **kw: (asked.append(len(prompts)),
                                                                                   real(llm, prompts, **kw))[1])
    assert inference.answer_file(model, tokenizer, items, path, record, 6, batch_size=2, source=source) == (3, 3)
    assert sum(asked) == 3  # only the three not answered before
    expected = [record(item, text) for item, text in zip(items, one_by_one(model, tokenizer, items, 6))]
    assert read_jsonl(path) == expected  # the items' order, not the batches'
    assert inference.answer_file(model, tokenizer, items, path, record, 6, source=source) == (6, 0) and sum(asked) == 3


def test_answer_source_names_the_checkpoint_and_the_settings(tiny):
    from checkpoint import fingerprint
    folder, model, _, _ = tiny
    assert inference.answer_source(folder, model, 6, prompt_format="QCM-LEA") == {
        "model": os.path.abspath(folder), "fingerprint": fingerprint(folder), "template": model.config.template,
        "dtype": "float32", "max_new_tokens": 6, "temperature": 0.0, "seed": None, "prompt_format": "QCM-LEA"}


def test_answer_source_records_the_template_temperature_and_seed_it_samples_with(tiny):
    folder, model, _, _ = tiny
    source = inference.answer_source(folder, model, 6, template="llava_v1", temperature=0.2, seed=3)
    assert (source["template"], source["temperature"], source["seed"]) == ("llava_v1", 0.2, 3)
    assert inference.answer_source(folder, model, 6, seed=3)["seed"] is None  # greedy answers do not depend on it


def test_the_template_chosen_reaches_the_rendered_prompt(tiny, monkeypatch):
    from data import render, with_image
    _, model, tokenizer, items = tiny
    expected = render([{"from": "human", "value": with_image(items[0]["text"])}], "llava_v1", tokenizer,
                      model.config.num_image_tokens, for_generation=True)[0]
    assert inference.prompt_ids(model, tokenizer, items[0]["text"], items[0]["image_path"], "llava_v1") == expected
    assert tokenizer.decode([t for t in expected if t >= 0]).startswith("A chat between a curious human")
    assert model.config.template == "vicuna_v1" and inference.prompt_ids(
        model, tokenizer, items[0]["text"], items[0]["image_path"]) != expected  # the checkpoint's: "curious user"
    seen, real = [], inference.generate_batch
    monkeypatch.setattr(inference, "generate_batch", lambda llm, prompts, **kw: (seen.extend(prompts),
                                                                                   real(llm, prompts, **kw))[1])
    for _ in inference.answer_batches(model, tokenizer, items[:1], 2, template="llava_v1"):
        pass
    with torch.no_grad():
        embeds = model.embed(torch.tensor([expected]), inference.pixel_values(model, items[0]["image_path"]))[0]
    assert len(seen) == 1 and torch.equal(seen[0], embeds)


def replies(model, tokenizer, items, **decoding):
    return [reply for batch in inference.answer_batches(model, tokenizer, items, 12, 4, **decoding)
            for _, reply in sorted(batch, key=lambda pair: pair[0]["question_id"])]


def test_sampling_repeats_with_its_seed_and_differs_with_another(tiny, singles):
    _, model, tokenizer, items = tiny
    first = replies(model, tokenizer, items, temperature=1.0, seed=5)
    assert replies(model, tokenizer, items, temperature=1.0, seed=5) == first
    assert replies(model, tokenizer, items, temperature=1.0, seed=6) != first
    assert sorted(first) != sorted(singles)  # sampled, not greedy
    assert sorted(replies(model, tokenizer, items, seed=5)) == sorted(singles)  # temperature 0: greedy, seed unused


def test_answer_file_refuses_answers_made_with_other_settings(tiny, tmp_path, monkeypatch):
    folder, model, tokenizer, items = tiny
    path = str(tmp_path / "answers.jsonl")
    four, six = inference.answer_source(folder, model, 4), inference.answer_source(folder, model, 6)
    inference.answer_file(model, tokenizer, items[:2], path, record, 4, source=four)
    monkeypatch.setattr(inference, "generate_batch", lambda *a, **kw: pytest.fail("answered"))
    with pytest.raises(ValueError, match="max_new_tokens 4 there, 6 now"):
        inference.answer_file(model, tokenizer, items, path, record, 6, source=six)
    assert len(read_jsonl(path)) == 2


@pytest.mark.parametrize("before, after, differs", [
    ({}, {"template": "llava_v1"}, "template 'vicuna_v1' there, 'llava_v1' now"),
    ({}, {"temperature": 0.2, "seed": 1}, "seed None there, 1 now; temperature 0.0 there, 0.2 now"),
    ({"temperature": 0.2, "seed": 1}, {"temperature": 0.2, "seed": 2}, "seed 1 there, 2 now")])
def test_answers_of_another_template_temperature_or_seed_are_not_continued(tiny, tmp_path, monkeypatch, before,
                                                                           after, differs):
    folder, model, tokenizer, items = tiny
    path = str(tmp_path / "answers.jsonl")
    inference.answer_file(model, tokenizer, items[:2], path, record, 4,
                          source=inference.answer_source(folder, model, 4, **before), **before)
    monkeypatch.setattr(inference, "generate_batch", lambda *a, **kw: pytest.fail("answered"))
    with pytest.raises(ValueError, match=differs):
        inference.answer_file(model, tokenizer, items, path, record, 4,
                              source=inference.answer_source(folder, model, 4, **after), **after)
    assert len(read_jsonl(path)) == 2


def test_answer_file_refuses_repeated_ids(tiny, tmp_path, monkeypatch):
    folder, model, tokenizer, items = tiny
    monkeypatch.setattr(inference, "generate_batch", lambda *a, **kw: pytest.fail("answered"))
    with pytest.raises(ValueError, match="question ids repeated: 'q1'"):
        inference.answer_file(model, tokenizer, items + [{**items[1], "text": "Another?"}], str(tmp_path / "a.jsonl"),
                              record, 4, source=inference.answer_source(folder, model, 4))


def test_a_prompt_longer_than_the_context_is_refused_before_answering(tiny, monkeypatch):
    _, model, tokenizer, items = tiny
    context = model.config.llm.context_len
    longest = max(items, key=lambda item: len(inference.prompt_ids(model, tokenizer, item["text"], item["image_path"])))
    n = len(inference.prompt_ids(model, tokenizer, longest["text"], longest["image_path"]))
    monkeypatch.setattr(inference, "generate_batch", lambda *a, **kw: pytest.fail("answered"))
    with pytest.raises(ValueError, match=f"question_id {longest['question_id']!r}: its prompt \\({n} tokens\\) and "
                                         f"max_new_tokens \\({context - n + 1}\\) need {context + 1} positions, more "
                                         f"than the model's {context}"):
        next(inference.answer_batches(model, tokenizer, items, context - n + 1))


def test_int8_weights_load_and_answer(tiny):
    from quantize import Int8Linear
    path, model, tokenizer, items = tiny
    quantized, _ = inference.load_model(path, "cpu", "float32", quantize="int8")
    linears = [m for part in (quantized.llm.layers, quantized.projector) for m in part.modules()
               if isinstance(m, (torch.nn.Linear, Int8Linear))]
    assert len(linears) == 7 * len(quantized.llm.layers) + 2 and all(isinstance(m, Int8Linear) for m in linears)
    assert isinstance(quantized.llm.lm_head, Int8Linear)
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


# ------------------------------------------------------------------------------------------- batched generation


def mixed_prompts(vocab_size, lengths=(5, 12, 1, 8, 3), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def alone(model, prompt, max_new_tokens, eos_id=None):
    model.setup_cache(1, len(prompt) + max_new_tokens)
    return list(generate(model, torch.tensor([prompt]), max_new_tokens=max_new_tokens, eos_id=eos_id))


def test_left_padded_rows_compute_what_they_compute_alone():
    model, _ = load("llama_tied")  # linear RoPE scaling: the per-row positions go through the scaling too
    model.double()
    prompts = mixed_prompts(model.config.vocab_size, (3, 9, 6))
    T = max(map(len, prompts))
    ids = torch.stack([torch.tensor([0] * (T - len(p)) + p) for p in prompts])  # (3, 9) left-padded
    left_pad = torch.tensor([T - len(p) for p in prompts])
    with torch.no_grad():
        model.setup_cache(3, T + 1)
        mask, positions = inference.left_pad_mask(torch.arange(T), left_pad)
        prefill = model(ids, input_pos=torch.arange(T), mask=mask, positions=positions)  # (3, T, V)
        mask, positions = inference.left_pad_mask(torch.tensor([T]), left_pad)
        step = model(torch.tensor([[7], [8], [9]]), input_pos=torch.tensor([T]), mask=mask, positions=positions)
        for b, p in enumerate(prompts):
            full = model(torch.tensor([p + [7 + b]]))  # (1, len + 1, V), no cache
            assert (prefill[b, T - len(p):] - full[0, :-1]).abs().max() <= 1e-9
            assert (step[b, 0] - full[0, -1]).abs().max() <= 1e-9


@pytest.mark.parametrize("name", MODELS)
def test_generate_batch_equals_each_prompt_alone(name):
    model, _ = load(name)
    prompts = mixed_prompts(model.config.vocab_size)
    assert inference.generate_batch(model, prompts, max_new_tokens=10) == [alone(model, p, 10) for p in prompts]


def test_generate_batch_rows_stop_at_their_own_eos():
    model, _ = load("llama_gqa")
    prompts = mixed_prompts(model.config.vocab_size, (5, 12, 1, 8, 3, 7, 2, 10))
    free = [alone(model, p, 12) for p in prompts]
    eos = free[0][2]
    expected = [alone(model, p, 12, eos) for p in prompts]
    stops = sorted(len(out) for out in expected if out[-1] == eos)
    assert len(set(stops)) >= 2 and len(stops) >= 3 and min(map(len, expected)) < 12 == max(map(len, expected)), \
        "rows must finish at different steps (the batch is compacted) while one runs to the end"
    assert inference.generate_batch(model, prompts, max_new_tokens=12, eos_id=eos) == expected


def test_generate_batch_from_embeddings_equals_token_ids():
    model, _ = load("llama_gqa")
    prompts = mixed_prompts(model.config.vocab_size)
    with torch.no_grad():
        embeds = [model.embed_tokens(torch.tensor(p)) for p in prompts]  # (T_i, C) each
    assert inference.generate_batch(model, embeds, max_new_tokens=8) == \
        inference.generate_batch(model, prompts, max_new_tokens=8)


def test_generate_batch_reuses_a_large_enough_cache_and_refuses_an_empty_prompt():
    model, _ = load("llama_gqa")
    prompts = mixed_prompts(model.config.vocab_size)
    model.setup_cache(8, 40)  # stale entries from an earlier use do not matter
    model(torch.randint(0, 200, (8, 40)), input_pos=torch.arange(40))
    assert inference.generate_batch(model, prompts, max_new_tokens=6) == [alone(model, p, 6) for p in prompts]
    model.setup_cache(8, 40)
    cache = model.layers[0].self_attn.k_cache
    inference.generate_batch(model, prompts, max_new_tokens=6)
    assert model.layers[0].self_attn.k_cache is cache
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        inference.generate_batch(model, [[5], []], max_new_tokens=2)


def test_reply_text_ends_at_the_templates_stop(tiny):  # v0 models end a reply with "###", not </s>
    tokenizer = tiny[2]
    tokens = tokenizer.encode("A red circle.\n###Human: and more", bos=False)
    assert inference.reply_text(tokenizer, tokens, "###") == "A red circle."
    assert inference.reply_text(tokenizer, tokens + [tokenizer.eos_id]) == "A red circle.\n###Human: and more"
