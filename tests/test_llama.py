import json
import os
import shutil

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file

from llama import (Llama, LlamaConfig, Tokenizer, check_state_dict, generate, hf_to_llama_keys, llama_to_hf_keys,
                   load_safetensors_dir, sample)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MODELS = ["llama_gqa", "llama_tied"]  # gqa: sharded, 2 KV heads; tied: tied head, head_dim 16 != 48/4, linear RoPE


def load(name):
    model = Llama.from_pretrained(os.path.join(FIXTURES, name, "model"))
    return model, load_file(os.path.join(FIXTURES, name, "reference.safetensors"))


def tied_copy(tmp_path):
    """A writable single-file checkpoint: (folder, its tensors)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIXTURES, "llama_tied", "model"), folder)
    return folder, load_file(folder / "model.safetensors")


# ------------------------------------------------------------------------------------------ parity with transformers

@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers(name):
    model, ref = load(name)
    with torch.no_grad():
        logits = model(ref["input_ids"])  # (B, T, V)
    assert logits.shape == ref["logits"].shape
    assert (logits - ref["logits"]).abs().max() <= 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_greedy_tokens_match_transformers(name):
    model, ref = load(name)
    model.setup_cache(1, 32)
    tokens = list(generate(model, ref["prompt"], max_new_tokens=20))
    assert tokens == ref["greedy"][0].tolist()


def test_sharded_checkpoint_is_read_from_every_shard():
    folder = os.path.join(FIXTURES, "llama_gqa", "model")
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) > 1
    tensors = load_safetensors_dir(folder)
    for shard in shards:  # every tensor of every shard arrives unchanged
        for key, value in load_file(os.path.join(folder, shard)).items():
            assert torch.equal(tensors[key], value)
    model = Llama.from_pretrained(folder)
    assert set(load_safetensors_dir(os.path.join(folder, sorted(shards)[0]))) < set(tensors)  # one file alone
    assert torch.equal(model.layers[1].mlp.down_proj.weight, tensors["model.layers.1.mlp.down_proj.weight"])


def test_missing_shard_names_the_file(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIXTURES, "llama_gqa", "model"), folder)
    os.remove(folder / "model-00002-of-00004.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00004.safetensors"):
        Llama.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ KV cache

@pytest.mark.parametrize("name", MODELS)
def test_cached_decode_equals_full_forward(name):
    model, ref = load(name)
    model.double()  # fp64: any indexing/masking mistake shows far above rounding (logits reach |30| here)
    ids = ref["input_ids"]  # (2, 12)
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(2, 16)
        steps = [model(ids[:, :5], input_pos=torch.arange(5))]  # prefill
        steps += [model(ids[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(5, 12)]  # decode
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_chunked_prefill_from_embeddings_and_rollback():
    model, ref = load("llama_gqa")
    ids = ref["input_ids"][:1]  # (1, 12)
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(1, 16)
        model(inputs_embeds=model.embed_tokens(ids[:, :4]), input_pos=torch.arange(4))
        junk = torch.randint(0, 256, (1, 8))
        model(junk, input_pos=torch.arange(4, 12))  # later overwritten: a rolled-back turn
        chunk = model(ids[:, 4:9], input_pos=torch.arange(4, 9))  # prefill after cached positions: masked
        last = model(ids[:, 9:], input_pos=torch.arange(9, 12))  # stale junk at 11 is overwritten/ignored
    assert (chunk - full[:, 4:9]).abs().max() <= 1e-5
    assert (last - full[:, 9:]).abs().max() <= 1e-5


def test_inputs_embeds_equals_input_ids():
    model, ref = load("llama_tied")
    with torch.no_grad():
        assert torch.allclose(model(inputs_embeds=model.embed_tokens(ref["input_ids"])), model(ref["input_ids"]))
    with pytest.raises(ValueError, match="exactly one"):
        model(ref["input_ids"], inputs_embeds=model.embed_tokens(ref["input_ids"]))


def test_positions_past_cache_or_max_position_raise():
    model, ref = load("llama_tied")  # max_position_embeddings = 64
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="setup_cache"):
        model(ref["prompt"], input_pos=torch.arange(8))
    model.setup_cache(1, 8)
    with pytest.raises(ValueError, match="past the KV cache"):
        model(torch.zeros(1, 1, dtype=torch.long), input_pos=torch.tensor([8]))
    model.setup_cache(1, 100)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 1, dtype=torch.long), input_pos=torch.tensor([64]))
    with pytest.raises(ValueError, match="KV cache length"):
        next(generate(model, ref["prompt"], max_new_tokens=93))
    model.reset_cache()
    assert model.layers[0].self_attn.k_cache is None and model.cache_len == 0


def test_generate_stops_and_leaves_cache_ready_for_the_next_turn():
    model, ref = load("llama_gqa")
    prompt, greedy = ref["prompt"], ref["greedy"][0].tolist()  # (1, 8)
    model.setup_cache(1, 40)
    assert list(generate(model, prompt, max_new_tokens=20, eos_id=greedy[4])) == greedy[:greedy.index(greedy[4]) + 1]
    out = list(generate(model, prompt, max_new_tokens=6))
    assert out == greedy[:6]
    # the cache now holds 8 + 6 - 1 positions; the next turn starts with the last (unfed) token
    turn = torch.tensor([[out[-1], 7, 8, 9]])
    sequence = torch.cat([prompt, torch.tensor([out]), turn[:, 1:]], dim=1)  # (1, 17)
    with torch.no_grad():
        cont = list(generate(model, turn, max_new_tokens=3, start_pos=13))
        full_next = [model(sequence).argmax(-1)[0, -1].item()]
    assert cont[0] == full_next[0]


# ----------------------------------------------------------------------------------------- loading: strictness

def test_save_pretrained_round_trip_keeps_hf_layout(tmp_path):
    model, ref = load("llama_gqa")
    model.save_pretrained(tmp_path / "out")
    again = Llama.from_pretrained(tmp_path / "out")
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == set(load_safetensors_dir(
        os.path.join(FIXTURES, "llama_gqa", "model")))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    tied, _ = load("llama_tied")
    tied.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    tied = Llama.from_pretrained(tmp_path / "tied")
    assert tied.lm_head.weight is tied.embed_tokens.weight
    with torch.no_grad():
        assert (tied(ref["input_ids"]) - load("llama_tied")[0](ref["input_ids"])).abs().max() == 0


def test_loading_to_another_dtype_keeps_no_second_copy(monkeypatch):
    """fp16 7B -> bf16 on one GPU: each file tensor is freed once converted, not held until all are converted."""
    import weakref
    import llama
    originals, load_checkpoint = [], llama._load_checkpoint

    def tracked(path, device="cpu"):
        tensors, files = load_checkpoint(path, device)
        originals.extend(weakref.ref(t) for t in tensors.values())
        return tensors, files
    alive = []
    real_load = Llama.load_state_dict
    monkeypatch.setattr(llama, "_load_checkpoint", tracked)
    monkeypatch.setattr(Llama, "load_state_dict", lambda self, *a, **k: (
        alive.append(sum(r() is not None for r in originals)), real_load(self, *a, **k))[1])
    model = Llama.from_pretrained(os.path.join(FIXTURES, "llama_gqa", "model"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert len(originals) > 10 and alive[0] <= 1  # at most the loop's last tensor


def test_missing_key_is_named(tmp_path):
    folder, tensors = tied_copy(tmp_path)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(KeyError, match=r"missing key 'model\.layers\.2\.mlp\.up_proj\.weight'"):
        Llama.from_pretrained(folder)


def test_unexpected_key_is_named_with_its_file(tmp_path):
    folder, tensors = tied_copy(tmp_path)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(KeyError, match=r"model\.safetensors: unexpected key 'model\.layers\.0\.self_attn\.q_proj"):
        Llama.from_pretrained(folder)


def test_wrong_shape_is_named_with_its_shard(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIXTURES, "llama_gqa", "model"), folder)
    with open(folder / "model.safetensors.index.json") as f:
        shard = json.load(f)["weight_map"]["model.norm.weight"]
    tensors = load_file(folder / shard)
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, folder / shard)
    with pytest.raises(ValueError, match=rf"{shard}: key 'model\.norm\.weight' has shape \(65,\), expected \(64,\)"):
        Llama.from_pretrained(folder)


def test_rotary_inv_freq_is_ignored_and_nothing_else(tmp_path):
    folder, tensors = tied_copy(tmp_path)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, folder / "model.safetensors")
    model = Llama.from_pretrained(folder)
    assert set(llama_to_hf_keys(model.state_dict())) - {"lm_head.weight"} == set(tensors) - {
        "model.layers.0.self_attn.rotary_emb.inv_freq"}
    with pytest.raises(KeyError, match="unexpected key 'extra'"):
        check_state_dict({"a": (2,)}, {"a": torch.zeros(2), "extra": torch.zeros(1)}, "f.safetensors",
                         ignore=("rotary_emb.inv_freq",))


def test_key_mapping_is_a_pure_prefix_rename_with_inverse():
    hf = {"model.embed_tokens.weight": 1, "model.layers.0.mlp.up_proj.weight": 2, "lm_head.weight": 3}
    ours = hf_to_llama_keys(hf)
    assert ours == {"embed_tokens.weight": 1, "layers.0.mlp.up_proj.weight": 2, "lm_head.weight": 3}
    assert llama_to_hf_keys(ours) == hf
    model = Llama(LlamaConfig.from_name("tiny"))
    assert set(model.state_dict()) == set(hf_to_llama_keys(llama_to_hf_keys(model.state_dict())))
    assert not any("rotary" in k or "cache" in k for k in model.state_dict())  # no non-checkpoint state


@pytest.mark.parametrize("name", MODELS)
def test_meta_init_then_to_empty_and_load_works(name):  # the FSDP path: no RoPE buffer to restore
    model, ref = load(name)
    with torch.device("meta"):
        meta = Llama(model.config)
    meta.to_empty(device="cpu")
    meta.tie_weights()  # to_empty made two Parameters of the tied one
    assert (meta.lm_head.weight is meta.embed_tokens.weight) == model.config.tie_word_embeddings
    meta.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (meta(ref["input_ids"]) - ref["logits"]).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------------------------ config

def test_config_reads_both_rope_styles_and_round_trips():
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2)
    old = LlamaConfig.from_hf({**base, "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 4.0}})
    new = LlamaConfig.from_hf({**base, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}})
    assert old == new and old.rope_theta == 1e6 and old.rope_scaling_factor == 4.0 and old.head_dim == 4
    with open(os.path.join(FIXTURES, "llama_gqa", "model", "config.json")) as f:
        hf = json.load(f)
    config = LlamaConfig.from_hf(hf)
    assert config.num_key_value_heads == 2 and config.rms_norm_eps == 1e-5 and not config.tie_word_embeddings
    for name in ["tiny", "tinyllama-1.1b", "llama-2-7b", "vicuna-7b", "llama-2-13b", "smollm-135m"]:
        preset = LlamaConfig.from_name(name)
        assert LlamaConfig.from_hf(json.loads(json.dumps(preset.to_hf()))) == preset
    assert LlamaConfig.from_hf(new.to_hf()) == new
    with pytest.raises(ValueError, match="unknown preset"):
        LlamaConfig.from_name("gpt-2")


@pytest.mark.parametrize("change, word", [
    ({"attention_bias": True}, "attention_bias"), ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"), ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "yarn"), ({"model_type": "mistral"}, "mistral"),
    ({"eos_token_id": [2, 3]}, "eos_token_id")])
def test_unsupported_config_features_are_refused(change, word):
    with open(os.path.join(FIXTURES, "llama_gqa", "model", "config.json")) as f:
        hf = json.load(f)
    with pytest.raises(ValueError, match=word):
        LlamaConfig.from_hf({**hf, **change})


# --------------------------------------------------------------------------------------------------- tokenizer

TEXTS = ["USER: What colour is the circle?\nASSISTANT: Red.", "  two leading spaces,   runs    of spaces  ",
         "line one\n\nline three\n", "naïve café, Größe, 東京, Ελληνικά", "emoji 🐍🎉 and 👩‍👩‍👧 family", "\t tab\t",
         "", "1234567890 3.14"]


def test_tokenizer_equals_raw_sentencepiece_and_round_trips():
    tokenizer = Tokenizer(FIXTURES)
    raw = spm.SentencePieceProcessor(model_file=os.path.join(FIXTURES, "tokenizer.model"))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size) == (1, 2, 0, 512)
    for text in TEXTS:
        ids = tokenizer.encode(text, bos=False)
        assert ids == raw.encode(text)
        assert tokenizer.encode(text, bos=True, eos=True) == [1] + ids + [2]
        assert tokenizer.decode(ids) == text  # byte fallback and identity normalisation keep everything
        # a model with a padded vocabulary (llava-hf: 32064 rows, 32000 pieces) may sample an id past the pieces
        assert tokenizer.decode(ids + [512, 600]) == text and tokenizer.stream().push(511 + 64) == ""
    assert any(raw.id_to_piece(i).startswith("<0x") for i in tokenizer.encode(TEXTS[4]))  # emoji -> byte pieces


def test_stream_equals_full_decode_and_never_splits_a_character():
    tokenizer = Tokenizer(os.path.join(FIXTURES, "tokenizer.model"))
    sequences = [tokenizer.encode(text, bos=False) for text in TEXTS]
    generator = torch.Generator().manual_seed(0)
    sequences += [torch.randint(3, 512, (40,), generator=generator).tolist() for _ in range(20)]  # any id order
    for ids in sequences:
        stream = tokenizer.stream()
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == tokenizer.decode(ids)
    stream = tokenizer.stream()
    pieces = [stream.push(i) for i in tokenizer.encode("a 🐍 b", bos=False)]
    assert "" in pieces and any("🐍" in p for p in pieces)  # held back until the emoji's last byte arrives
    assert not any("\ufffd" in p for p in pieces)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer("/nowhere/tokenizer.model")
    from pathlib import Path
    for path in [Path(FIXTURES), Path(FIXTURES) / "tokenizer.model"]:  # pathlib works as well as str
        assert Tokenizer(path).encode("red circle") == tokenizer.encode("red circle")


# ----------------------------------------------------------------------------------------------------- sampling

def test_sample_greedy_temperature_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))  # (2, 3)
    assert sample(logits).tolist() == [0, 2]
    generator = torch.Generator().manual_seed(0)
    draws = sample(logits[:1].expand(4000, 3), 1.0, 0.6, generator)  # keep {0, 1}: 0.5 < 0.6
    assert set(draws.unique().tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    draws = sample(logits[:1].expand(4000, 3), 1.0, 1.0, generator)
    assert abs((draws == 2).float().mean().item() - 0.2) < 0.03
    cold = sample(logits[:1].expand(4000, 3), 0.05, 1.0, generator)  # low temperature: nearly greedy
    assert (cold == 0).float().mean() > 0.99
    for top_p in (0.0, -1.0, 1e-9):  # a nucleus that no token fills keeps the most likely token, never none
        assert sample(logits[:1].expand(100, 3), 1.0, top_p, generator).tolist() == [0] * 100
