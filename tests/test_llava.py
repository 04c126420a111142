import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llava import (IMAGE_TOKEN_INDEX, LLaVA, LLaVAConfig, hf_to_llava_keys, llava_to_hf_keys, llava_to_original_keys,
                   original_to_llava_keys)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HF_DIR = os.path.join(FIXTURES, "llava_hf")  # tiny LlavaForConditionalGeneration saved by transformers 5
REF = load_file(os.path.join(FIXTURES, "llava_ref", "reference.safetensors"))
HF_IMAGE_TOKEN = 120  # image_token_index of the fixture


def ours(ids):  # llava-hf prompts hold the image token id; ours hold -200 placeholders
    return ids.masked_fill(ids == HF_IMAGE_TOKEN, IMAGE_TOKEN_INDEX)


@pytest.fixture(scope="module")
def model():
    return LLaVA.from_pretrained(HF_DIR)


def logits_of(model, ids, pixel_values):
    with torch.no_grad():
        return model(ours(ids), pixel_values)[0]


def test_logits_and_loss_match_transformers(model):
    torch.testing.assert_close(logits_of(model, REF["input_ids_1"], REF["pixel_values_1"]), REF["logits_1"],
                               atol=1e-4, rtol=0)
    # two images in one prompt: features go to the placeholders in order
    torch.testing.assert_close(logits_of(model, REF["input_ids_2"], REF["pixel_values_2"]), REF["logits_2"],
                               atol=1e-4, rtol=0)
    with torch.no_grad():
        _, loss = model(ours(REF["input_ids_1"]), REF["pixel_values_1"], labels=REF["labels_1"])
    torch.testing.assert_close(loss.reshape(1), REF["loss_1"], atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers(model):
    model.llm.setup_cache(1, 64)
    tokens = list(model.generate(ours(REF["input_ids_1"]), REF["pixel_values_1"], max_new_tokens=20))
    model.llm.reset_cache()
    assert tokens == REF["greedy_1"][0].tolist()


def test_config_from_llava_hf(model):
    c = model.config
    assert (c.projector_type, c.select_layer, c.select_feature, c.image_token_index) == ("mlp2x_gelu", -2, "patch", 120)
    assert c.num_image_tokens == 25 and c.image_size == 30 and c.llm.vocab_size == 128


def write_hf_variant(tmp_path, rename):
    shutil.copy(os.path.join(HF_DIR, "config.json"), tmp_path / "config.json")
    sd = load_file(os.path.join(HF_DIR, "model.safetensors"))
    save_file({rename(k): v for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    return str(tmp_path)


def published_name(key):  # llava-1.5-7b-hf on the hub: the tower keeps "vision_model."
    return key.replace("vision_tower.", "vision_tower.vision_model.", 1)


def in_memory_name(key):  # transformers >= 4.52 module names
    if key.startswith("language_model.lm_head."):
        return key.removeprefix("language_model.")
    return "model." + key.replace("language_model.model.", "language_model.", 1)


@pytest.mark.parametrize("rename", [published_name, in_memory_name])
def test_llava_hf_key_variants_load_identically(model, tmp_path, rename):
    other = LLaVA.from_pretrained(write_hf_variant(tmp_path, rename))
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_key_mappings_are_inverse(model):
    sd = model.state_dict()
    assert hf_to_llava_keys(llava_to_hf_keys(sd)).keys() == sd.keys()
    assert original_to_llava_keys(llava_to_original_keys(sd)).keys() == sd.keys()
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in llava_to_hf_keys(sd)
    assert "model.mm_projector.2.bias" in llava_to_original_keys(sd)


def write_original_release(model, out, clip_dir, pickle_shards):
    """The same weights as liuhaotian/llava-v1.5-7b stores them: no tower inside, tower in a CLIP folder."""
    model.vision_tower.save_pretrained(clip_dir)
    sd = llava_to_original_keys({k: v for k, v in model.state_dict().items() if not k.startswith("vision_tower.")})
    config = {**model.config.llm.to_hf(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
              "mm_hidden_size": 32, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat",
              "image_aspect_ratio": "pad", "tune_mm_mlp_adapter": False, "use_mm_proj": True}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    if not pickle_shards:
        save_file(sd, os.path.join(out, "model.safetensors"))
        return
    # two pickle shards + index, plus the rotary buffer transformers 4.31 saved
    keys = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    shards["pytorch_model-00001-of-00002.bin"].append("model.layers.0.self_attn.rotary_emb.inv_freq")
    for name, part in shards.items():
        torch.save({k: sd[k] for k in part}, os.path.join(out, name))
    with open(os.path.join(out, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"weight_map": {k: name for name, part in shards.items() for k in part}}, f)


@pytest.mark.parametrize("pickle_shards", [False, True])
def test_original_release_layout_loads_to_identical_outputs(model, tmp_path, pickle_shards):
    out, clip_dir = str(tmp_path / "llava-v1.5"), str(tmp_path / "clip")
    write_original_release(model, out, clip_dir, pickle_shards)
    with pytest.raises(FileNotFoundError, match="vision_tower="):
        LLaVA.from_pretrained(out)
    loaded = LLaVA.from_pretrained(out, vision_tower=clip_dir)
    assert loaded.config.image_aspect_ratio == "pad" and loaded.config.projector_type == "mlp2x_gelu"
    assert torch.equal(logits_of(loaded, REF["input_ids_2"], REF["pixel_values_2"]),
                       logits_of(model, REF["input_ids_2"], REF["pixel_values_2"]))


def test_own_layout_round_trip_keeps_weights_and_settings(model, tmp_path):
    config = LLaVAConfig(**{**model.config.__dict__, "template": "plain", "image_aspect_ratio": "square"})
    changed = LLaVA(config)
    changed.load_state_dict(model.state_dict())
    changed.save_pretrained(tmp_path)
    loaded = LLaVA.from_pretrained(str(tmp_path))
    assert loaded.config == config
    assert json.load(open(tmp_path / "config.json"))["format"] == "llava-minimal"
    for key, value in changed.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert all(not p.requires_grad for p in loaded.vision_tower.parameters())


def test_save_and_load_projector(model, tmp_path):
    model.save_projector(tmp_path)
    with safe_open(str(tmp_path / "projector.safetensors"), "pt") as f:
        assert set(f.keys()) == {"projector.0.weight", "projector.0.bias", "projector.2.weight", "projector.2.bias"}
    torch.manual_seed(0)
    fresh = LLaVA(model.config)
    fresh.load_projector(tmp_path)
    for key, value in model.projector.state_dict().items():
        assert torch.equal(fresh.projector.state_dict()[key], value), key
    # a stage-1 projector from the original release (mm_projector.bin)
    orig = tmp_path / "orig"
    orig.mkdir()
    torch.save(llava_to_original_keys({"projector." + k: v for k, v in model.projector.state_dict().items()}),
               orig / "mm_projector.bin")
    fresh = LLaVA(model.config)
    fresh.load_projector(orig)
    assert torch.equal(fresh.projector[2].weight, model.projector[2].weight)


def test_load_projector_is_strict(model, tmp_path):
    model.save_projector(tmp_path)
    tensors = load_file(str(tmp_path / "projector.safetensors"))
    del tensors["projector.2.bias"]
    save_file(tensors, str(tmp_path / "projector.safetensors"))
    with pytest.raises(KeyError, match="projector.2.bias") as err:
        LLaVA(model.config).load_projector(tmp_path)
    assert "projector.safetensors" in str(err.value)
    linear = LLaVAConfig(**{**model.config.__dict__, "projector_type": "linear"})
    with pytest.raises(ValueError, match="projector_type"):
        LLaVA(linear).load_projector(tmp_path)


def test_strict_loading_names_key_and_file(tmp_path):
    shutil.copy(os.path.join(HF_DIR, "config.json"), tmp_path / "config.json")
    sd = load_file(os.path.join(HF_DIR, "model.safetensors"))
    sd["multi_modal_projector.linear_3.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="linear_3") as err:
        LLaVA.from_pretrained(str(tmp_path))
    assert "model.safetensors" in str(err.value)
    del sd["multi_modal_projector.linear_3.weight"], sd["language_model.model.norm.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="llm.norm.weight"):
        LLaVA.from_pretrained(str(tmp_path))


def test_export_hf_writes_the_recorded_keys_and_reloads(model, tmp_path):
    model.export_hf(tmp_path, tokenizer=os.path.join(FIXTURES, "tokenizer.model"))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        got = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    assert got == json.load(open(os.path.join(FIXTURES, "llava_ref", "export_keys.json")))
    config = json.load(open(tmp_path / "config.json"))
    assert config["image_token_index"] == 120 and config["text_config"]["vocab_size"] == 128
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert (tmp_path / "tokenizer.model").read_bytes() == open(os.path.join(FIXTURES, "tokenizer.model"), "rb").read()
    reloaded = LLaVA.from_pretrained(str(tmp_path))
    torch.testing.assert_close(logits_of(reloaded, REF["input_ids_1"], REF["pixel_values_1"]), REF["logits_1"],
                               atol=1e-4, rtol=0)


def test_export_hf_adds_image_token_and_pads_vocab(model, tmp_path):
    config = LLaVAConfig(**{**model.config.__dict__, "image_token_index": None})
    config.llm = type(config.llm)(**{**config.llm.__dict__, "vocab_size": 100})
    torch.manual_seed(0)
    small = LLaVA(config).eval()
    small.export_hf(tmp_path)
    exported = json.load(open(tmp_path / "config.json"))
    assert exported["image_token_index"] == 100 and exported["text_config"]["vocab_size"] == 128
    reloaded = LLaVA.from_pretrained(str(tmp_path))
    ids = ours(REF["input_ids_1"])
    want, got = logits_of(small, ids, REF["pixel_values_1"]), logits_of(reloaded, ids, REF["pixel_values_1"])
    torch.testing.assert_close(got[..., :100], want, atol=1e-5, rtol=0)
    # the padding rows are the mean row: their logit is the mean logit, never the greedy pick
    assert (got[..., 100:] < got[..., :100].max(-1, keepdim=True).values).all()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_batch_mixing_0_1_2_images_matches_each_sample_alone(model):
    text_only = torch.tensor([1, 5, 9, 33, 7, 4])
    one_image = ours(REF["input_ids_1"][0])
    two_images = ours(REF["input_ids_2"][0])
    pix1, pix2 = REF["pixel_values_1"], REF["pixel_values_2"]
    samples = [(two_images, pix2), (text_only, None), (one_image, pix1)]
    T = max(len(ids) for ids, _ in samples)
    batch = torch.zeros(len(samples), T, dtype=torch.long)  # right padding with pad id 0
    for i, (ids, _) in enumerate(samples):
        batch[i, :len(ids)] = ids
    with torch.no_grad():
        logits, _ = model(batch, torch.cat([pix2, pix1]))  # images in row-major order
        for i, (ids, pix) in enumerate(samples):
            alone, _ = model(ids[None], pix)
            torch.testing.assert_close(logits[i, :len(ids)], alone[0], atol=1e-5, rtol=0)


def test_placeholder_count_mismatch_names_both_numbers(model):
    ids = ours(REF["input_ids_1"])  # 25 placeholders
    with pytest.raises(ValueError, match=r"25 image placeholders.*50 features"):
        model(ids, REF["pixel_values_2"])  # two images
    with pytest.raises(ValueError, match=r"25 image placeholders.*0 features"):
        model(ids)


def test_tower_is_frozen_and_gets_no_gradient(model):
    assert all(not p.requires_grad for p in model.vision_tower.parameters())
    model.zero_grad(set_to_none=True)
    _, loss = model(ours(REF["input_ids_1"]), REF["pixel_values_1"], labels=REF["labels_1"])
    loss.backward()
    assert all(p.grad is None for p in model.vision_tower.parameters())
    assert model.projector[0].weight.grad.abs().sum() > 0 and model.llm.norm.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    # stage 1: the LLM frozen too, the projector still learns through the embeddings it writes
    model.llm.requires_grad_(False)
    try:
        _, loss = model(ours(REF["input_ids_1"]), REF["pixel_values_1"], labels=REF["labels_1"])
        loss.backward()
        assert model.projector[2].weight.grad.abs().sum() > 0
    finally:
        model.llm.requires_grad_(True)
        model.zero_grad(set_to_none=True)


def test_from_parts_loads_base_checkpoints_and_builds_a_fresh_projector(model, tmp_path):
    model.llm.save_pretrained(tmp_path / "llm")  # base checkpoints in HF layout, as a user has them
    model.vision_tower.save_pretrained(tmp_path / "clip")
    torch.manual_seed(0)
    built = LLaVA.from_parts(str(tmp_path / "llm"), str(tmp_path / "clip"), projector_type="linear", template="plain")
    assert built.config.template == "plain" and built.config.num_image_tokens == 25
    assert isinstance(built.projector, torch.nn.Linear) and built.projector.weight.shape == (64, 32)
    for key, value in model.state_dict().items():
        if not key.startswith("projector."):
            assert torch.equal(built.state_dict()[key], value), key
    assert all(not p.requires_grad for p in built.vision_tower.parameters())
    assert all(p.requires_grad for p in built.projector.parameters())


def test_tied_embeddings_round_trip(model, tmp_path):
    config = LLaVAConfig(**model.config.__dict__)
    config.llm = type(config.llm)(**{**config.llm.__dict__, "tie_word_embeddings": True})
    tied = LLaVA(config)
    tied.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "llm.lm_head.weight" not in f.keys()
    loaded = LLaVA.from_pretrained(str(tmp_path))
    assert loaded.llm.lm_head.weight is loaded.llm.embed_tokens.weight
    assert torch.equal(loaded.llm.embed_tokens.weight, tied.llm.embed_tokens.weight)
