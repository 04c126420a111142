"""llama.py against transformers' LlamaForCausalLM (fixtures from tests/make_fixtures.py): logits and greedy tokens,
the KV cache by equivalence with a full forward, strict loading with named errors, the config, sampling."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama
from checkpoint import load_checkpoint
from llama import Llama, LlamaConfig, generate, hf_to_llama_keys, llama_to_hf_keys, sample

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MODELS = ["llama_gqa", "llama_tied", "mistral_tiny"]
# gqa: sharded, 2 KV heads; tied: tied head, head_dim 16 != 48/4, linear RoPE; mistral: MistralForCausalLM with
# rope_theta 1e6, one KV head and a 32-token sliding window (every reference sequence fits in it)


def load(name):
    model = Llama.from_pretrained(os.path.join(FIXTURES, name, "model"))
    return model, load_file(os.path.join(FIXTURES, name, "reference.safetensors"))


def tied_copy(tmp_path):
    """A writable single-file checkpoint: (folder, its tensors)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIXTURES, "llama_tied", "model"), folder)
    return folder, load_file(folder / "model.safetensors")


def sharded_copy(tmp_path):
    """A writable sharded checkpoint: (folder, its index as a dict)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIXTURES, "llama_gqa", "model"), folder)
    return folder, json.loads((folder / "model.safetensors.index.json").read_text())


def edited_config(tmp_path, **change):
    folder, _ = tied_copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({k: v for k, v in {**config, **change}.items() if v is not None}))
    return folder


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


GQA = os.path.join(FIXTURES, "llama_gqa", "model")


def test_sharded_model_holds_the_checkpoint_weights():
    model = Llama.from_pretrained(GQA)
    tensors, _ = load_checkpoint(GQA)
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


def test_generate_takes_exactly_one_prompt_form():
    model, ref = load("llama_tied")
    model.setup_cache(1, 32)
    with pytest.raises(AssertionError, match="exactly one"):  # the forward pass keeps an assert
        next(generate(model, ref["prompt"], inputs_embeds=model.embed_tokens(ref["prompt"]), max_new_tokens=2))
    with pytest.raises(AssertionError, match="exactly one"):
        model(ref["input_ids"], inputs_embeds=model.embed_tokens(ref["input_ids"]))


def test_cache_longer_than_max_position_embeddings_is_refused():
    model, _ = load("llama_tied")  # max_position_embeddings = 64
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model.setup_cache(1, 65)
    model.setup_cache(1, 64)  # every position up to the limit
    assert model.cache_len == 64


def test_cache_longer_than_the_sliding_window_is_refused_naming_it():
    model, _ = load("mistral_tiny")  # max_position_embeddings 128, sliding_window 32
    model.setup_cache(1, 32)
    with pytest.raises(ValueError, match="sliding_window=32"):
        model.setup_cache(1, 33)


def test_sliding_window_survives_the_hf_round_trip():
    config = LlamaConfig.from_hf(json.loads(open(os.path.join(FIXTURES, "mistral_tiny", "model", "config.json")).read()))
    assert config.sliding_window == 32 and config.context_len == 32 and config.rope_theta == 1e6
    assert config.to_hf()["model_type"] == "mistral" and LlamaConfig.from_hf(config.to_hf()) == config


def test_generate_past_the_cache_length_raises():
    model, ref = load("llama_tied")
    model.setup_cache(1, 64)
    with pytest.raises(ValueError, match="KV cache length"):
        next(generate(model, ref["prompt"], max_new_tokens=57))  # 8 + 57 > 64


def test_cached_forward_past_the_cache_or_without_one_fails_its_assert():
    model, ref = load("llama_tied")
    with pytest.raises(AssertionError, match="past the KV cache"):  # no cache: zero slots
        model(ref["prompt"], input_pos=torch.arange(8))
    model.setup_cache(1, 8)
    with pytest.raises(AssertionError, match="past the KV cache"):
        model(torch.zeros(1, 1, dtype=torch.long), input_pos=torch.tensor([8]))


def test_reset_cache_frees_it():
    model, _ = load("llama_tied")
    model.setup_cache(1, 8)
    model.reset_cache()
    assert model.layers[0].self_attn.k_cache is None and model.cache_len == 0


# ------------------------------------------------------------------------------------- gradient checkpointing

def test_gradient_checkpointing_runs_every_layer_inside_checkpoint_with_equal_gradients(monkeypatch):
    model, ref = load("llama_gqa")
    assert model.gradient_checkpointing is False
    model.train()
    model(ref["input_ids"]).float().square().mean().backward()
    plain = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    calls, real_checkpoint = [], llama.checkpoint
    monkeypatch.setattr(llama, "checkpoint", lambda fn, *a, **kw: (calls.append(kw), real_checkpoint(fn, *a, **kw))[1])
    model.gradient_checkpointing = True
    model(ref["input_ids"]).float().square().mean().backward()
    assert calls == [{"use_reentrant": False}] * len(model.layers)
    for key, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[key], atol=1e-6, rtol=1e-5, msg=key)


def test_gradient_checkpointing_is_off_in_eval_mode(monkeypatch):
    model, ref = load("llama_gqa")
    model.gradient_checkpointing = True
    monkeypatch.setattr(llama, "checkpoint", lambda *a, **kw: pytest.fail("checkpoint() in eval mode"))
    with torch.no_grad():
        assert (model(ref["input_ids"]) - ref["logits"]).abs().max() <= 1e-4


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
    model, _ = load("llama_gqa")
    model.save_pretrained(tmp_path / "out")
    again = Llama.from_pretrained(tmp_path / "out")
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == set(load_checkpoint(GQA)[0])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_tied_head_is_saved_once_and_tied_again_on_load(tmp_path):
    tied, ref = load("llama_tied")
    tied.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    again = Llama.from_pretrained(tmp_path / "tied")
    assert again.lm_head.weight is again.embed_tokens.weight
    with torch.no_grad():
        assert (again(ref["input_ids"]) - tied(ref["input_ids"])).abs().max() == 0
    assert not [f for f in os.listdir(tmp_path / "tied") if f.endswith(".tmp")]  # fileio's atomic writes


def test_loading_to_another_dtype_keeps_no_second_copy(monkeypatch):
    """fp16 7B -> bf16 on one GPU: each file tensor is freed once converted, not held until all are converted."""
    import weakref
    originals, real_read = [], llama.load_checkpoint

    def tracked(*args, **kwargs):
        tensors, files = real_read(*args, **kwargs)
        originals.extend(weakref.ref(t) for t in tensors.values())
        return tensors, files
    alive = []
    real_load = Llama.load_state_dict
    monkeypatch.setattr(llama, "load_checkpoint", tracked)
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


def test_rotary_inv_freq_is_ignored(tmp_path):
    folder, tensors = tied_copy(tmp_path)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, folder / "model.safetensors")
    model = Llama.from_pretrained(folder)
    assert set(llama_to_hf_keys(model.state_dict())) - {"lm_head.weight"} == set(tensors) - {
        "model.layers.0.self_attn.rotary_emb.inv_freq"}


def test_integer_tensor_where_a_weight_belongs_names_key_and_file(tmp_path):
    folder, tensors = tied_copy(tmp_path)
    tensors["model.norm.weight"] = torch.ones(48, dtype=torch.int64)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: key 'model\.norm\.weight' holds torch\.int64"):
        Llama.from_pretrained(folder)


def test_truncated_safetensors_names_the_file(tmp_path):
    folder, _ = tied_copy(tmp_path)
    content = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(content[: len(content) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        Llama.from_pretrained(folder)


def test_shard_index_without_weight_map_names_the_index(tmp_path):
    folder, index = sharded_copy(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": index["metadata"]}))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: no 'weight_map'"):
        Llama.from_pretrained(folder)


@pytest.mark.parametrize("shard", ["../../etc/passwd", "/etc/passwd", "sub/../../model.safetensors"])
def test_shard_outside_the_folder_is_refused_naming_the_index(tmp_path, shard):
    folder, index = sharded_copy(tmp_path)
    index["weight_map"]["model.norm.weight"] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index\.json: shard .* lies outside the checkpoint folder"):
        Llama.from_pretrained(folder)


def test_malformed_config_json_names_the_file(tmp_path):
    folder, _ = tied_copy(tmp_path)
    (folder / "config.json").write_text('{"hidden_size": 48,')
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON"):
        Llama.from_pretrained(folder)


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": "48"}, r"hidden_size is '48', expected int"),
    ({"num_attention_heads": 4.0}, r"num_attention_heads is 4\.0, expected int"),
    ({"vocab_size": None}, r"missing 'vocab_size'"),
    ({"tie_word_embeddings": "yes"}, r"tie_word_embeddings is 'yes', expected bool"),
    ({"rms_norm_eps": "1e-6"}, r"rms_norm_eps is '1e-6', expected float")])
def test_config_value_of_the_wrong_type_names_file_and_key(tmp_path, change, message):
    with pytest.raises(ValueError, match=r"config\.json: " + message):
        Llama.from_pretrained(edited_config(tmp_path, **change))


def test_config_int_is_a_fine_float(tmp_path):
    assert Llama.from_pretrained(edited_config(tmp_path, rms_norm_eps=1)).config.rms_norm_eps == 1.0


def test_key_mapping_is_a_pure_prefix_rename_with_inverse():
    hf = {"model.embed_tokens.weight": 1, "model.layers.0.mlp.up_proj.weight": 2, "lm_head.weight": 3}
    ours = hf_to_llama_keys(hf)
    assert ours == {"embed_tokens.weight": 1, "layers.0.mlp.up_proj.weight": 2, "lm_head.weight": 3}
    assert llama_to_hf_keys(ours) == hf


def test_key_mapping_round_trips_every_model_key():
    model = Llama(LlamaConfig.from_name("tiny"))
    assert set(model.state_dict()) == set(hf_to_llama_keys(llama_to_hf_keys(model.state_dict())))


def test_model_state_holds_only_checkpoint_tensors():
    model = Llama(LlamaConfig.from_name("tiny"))
    assert not any("rotary" in k or "cache" in k for k in model.state_dict())


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

ROPE_BASE = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2)


def test_config_reads_both_rope_styles():
    old = LlamaConfig.from_hf({**ROPE_BASE, "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 4.0}})
    new = LlamaConfig.from_hf({**ROPE_BASE, "rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                                                 "rope_theta": 1e6}})
    assert old == new and old.rope_theta == 1e6 and old.rope_scaling_factor == 4.0 and old.head_dim == 4
    assert LlamaConfig.from_hf(new.to_hf()) == new


def test_config_from_the_fixture():
    with open(os.path.join(GQA, "config.json")) as f:
        config = LlamaConfig.from_hf(json.load(f))
    assert config.num_key_value_heads == 2 and config.rms_norm_eps == 1e-5 and not config.tie_word_embeddings


@pytest.mark.parametrize("name", ["tiny", "tinyllama-1.1b", "llama-2-7b", "vicuna-7b", "llama-2-13b", "smollm-135m"])
def test_presets_round_trip_through_hf_json(name):
    preset = LlamaConfig.from_name(name)
    assert LlamaConfig.from_hf(json.loads(json.dumps(preset.to_hf()))) == preset


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown preset"):
        LlamaConfig.from_name("gpt-2")


@pytest.mark.parametrize("change, word", [
    ({"attention_bias": True}, "attention_bias"), ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"), ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "yarn"), ({"model_type": "gpt2"}, "gpt2"),
    ({"eos_token_id": [2, 3]}, "eos_token_id")])
def test_unsupported_config_features_are_refused(change, word):
    with open(os.path.join(FIXTURES, "llama_gqa", "model", "config.json")) as f:
        hf = json.load(f)
    with pytest.raises(ValueError, match=word):
        LlamaConfig.from_hf({**hf, **change})


# ----------------------------------------------------------------------------------------------------- sampling

LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))  # (2, 3)


def test_sample_greedy():
    assert sample(LOGITS).tolist() == [0, 2]


def test_sample_top_p_keeps_the_nucleus_renormalised():
    generator = torch.Generator().manual_seed(0)
    draws = sample(LOGITS[:1].expand(4000, 3), 1.0, 0.6, generator)  # keep {0, 1}: 0.5 < 0.6
    assert set(draws.unique().tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.03


def test_sample_temperature_one_follows_the_distribution():
    draws = sample(LOGITS[:1].expand(4000, 3), 1.0, 1.0, torch.Generator().manual_seed(0))
    assert abs((draws == 2).float().mean().item() - 0.2) < 0.03


def test_sample_low_temperature_is_nearly_greedy():
    cold = sample(LOGITS[:1].expand(4000, 3), 0.05, 1.0, torch.Generator().manual_seed(0))
    assert (cold == 0).float().mean() > 0.99


@pytest.mark.parametrize("top_p", [0.0, -1.0, 1e-9])
def test_empty_nucleus_keeps_the_most_likely_token(top_p):
    generator = torch.Generator().manual_seed(0)
    assert sample(LOGITS[:1].expand(100, 3), 1.0, top_p, generator).tolist() == [0] * 100


# ------------------------------------------------------------------------------------------ cache details

def test_last_only_gives_the_last_positions_logits():
    model, ref = load("llama_tied")
    with torch.no_grad():
        model.setup_cache(2, 12)
        last = model(ref["input_ids"], input_pos=torch.arange(12), last_only=True)  # (2, 1, V)
    assert last.shape[1] == 1 and (last[:, 0] - ref["logits"][:, -1]).abs().max() <= 1e-4


def test_grown_cache_keeps_its_entries():
    model, ref = load("llama_gqa")
    model.double()
    ids = ref["input_ids"]  # (2, 12)
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(2, 5)
        model(ids[:, :5], input_pos=torch.arange(5))
        model.grow_cache(12)
        assert model.cache_len == 12 and model.layers[0].self_attn.k_cache.shape[2] == 12
        rest = model(ids[:, 5:], input_pos=torch.arange(5, 12))
    assert (rest - full[:, 5:]).abs().max() <= 1e-9
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.grow_cache(10_000)


def test_a_size_typo_in_config_json_is_refused_before_any_module_is_built(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json: num_hidden_layers is 100000000, not in 0\.\.1024"):
        Llama.from_pretrained(edited_config(tmp_path, num_hidden_layers=100_000_000))
