"""formats.py: the foreign layouts (llava-hf in and out, the original LLaVA release, full CLIPModel and transformers-5
CLIP folders, pickle .bin files), each key map with its inverse, the format detector and the llava-hf export files.
Fixtures from tests/make_fixtures.py, which also checks by hand that transformers loads what export_hf writes."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import formats
from clip import CLIPVisionConfig, tower_to_clip_keys
from data import TEMPLATES, Template, render
from tokenizer import Tokenizer
from llama import Llama, LlamaConfig
from llava import IMAGE_TOKEN_INDEX, LLaVA, LLaVAConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HF_DIR = os.path.join(FIXTURES, "llava_hf")  # tiny LlavaForConditionalGeneration saved by transformers 5
REF = load_file(os.path.join(FIXTURES, "llava_ref", "reference.safetensors"))
CLIP_REF = load_file(os.path.join(FIXTURES, "clip_outputs", "tower.safetensors"))
TOKENIZER = os.path.join(FIXTURES, "tokenizer.model")  # 512 pieces
HF_IMAGE_TOKEN = 120  # image_token_index of the llava-hf fixture
CLIP_LAYOUTS = ["clip_tiny", "clip_tiny_hf5", "clip_full"]  # published prefix, transformers 5 (none), full CLIPModel


def ours(ids):  # llava-hf prompts hold the image token id; ours hold -200 placeholders
    return ids.masked_fill(ids == HF_IMAGE_TOKEN, IMAGE_TOKEN_INDEX)


@pytest.fixture(scope="module")
def model():
    return formats.load_llava(HF_DIR)


def logits_of(model, ids, pixel_values):
    with torch.no_grad():
        return model(ours(ids), pixel_values)[0]


# -------------------------------------------------------------------------------------------------- detector

def write_original_release(model, out, clip_dir, pickle_shards=False):
    """The same weights as liuhaotian/llava-v1.5-7b stores them: no tower inside, tower in a CLIP folder."""
    model.vision_tower.save_pretrained(clip_dir)
    sd = formats.llava_to_original_keys({k: v for k, v in model.state_dict().items()
                                         if not k.startswith("vision_tower.")})
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


@pytest.mark.parametrize("folder, kind", [("llava_hf", "llava-hf"), ("llama_gqa/model", "llama"),
                                          ("llama_tied/model", "llama"), ("clip_tiny", "clip"),
                                          ("clip_tiny_hf5", "clip"), ("clip_full", "clip")])
def test_detect_format_of_the_fixtures(folder, kind):
    assert formats.detect_format(os.path.join(FIXTURES, folder)) == kind


def test_detect_format_of_our_own_checkpoint(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert formats.detect_format(tmp_path) == "llava-minimal"


def test_detect_format_of_the_original_release(model, tmp_path):
    write_original_release(model, tmp_path / "llava", tmp_path / "clip")
    assert formats.detect_format(tmp_path / "llava") == "llava-original"


def test_detect_format_refuses_other_models_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match=r"config\.json: not a LLaVA, LLaMA or CLIP checkpoint \(model_type 'mist"):
        formats.detect_format(tmp_path)


def test_detect_format_refuses_a_config_that_is_no_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object"):
        formats.detect_format(tmp_path)


def test_detect_format_names_a_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        formats.detect_format(tmp_path)


# ----------------------------------------------------------------------------------------- pickle .bin files

def test_bin_file_reads_its_tensors(tmp_path):
    torch.save({"a": torch.ones(2), "b": torch.zeros(1, dtype=torch.int64)}, tmp_path / "x.bin")
    tensors = formats.read_bin(str(tmp_path / "x.bin"))
    assert set(tensors) == {"a", "b"} and torch.equal(tensors["a"], torch.ones(2))


def test_bin_file_holding_a_non_tensor_names_key_and_file(tmp_path):
    torch.save({"a": torch.ones(2), "epoch": 3}, tmp_path / "x.bin")
    with pytest.raises(ValueError, match=r"x\.bin: key 'epoch' holds a int, not a tensor"):
        formats.read_bin(str(tmp_path / "x.bin"))


def test_bin_file_holding_no_dict_names_the_file(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "x.bin")
    with pytest.raises(ValueError, match=r"x\.bin: holds a list"):
        formats.read_bin(str(tmp_path / "x.bin"))


def test_corrupt_bin_file_names_the_file(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match=r"x\.bin: not a pickle of tensors"):
        formats.read_bin(str(tmp_path / "x.bin"))


def test_bin_file_with_code_is_refused_without_running_it(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.remove, (str(tmp_path / "canary"),))
    (tmp_path / "canary").write_text("alive")
    (tmp_path / "x.bin").write_bytes(pickle.dumps({"a": Payload()}, protocol=2))
    with pytest.raises(ValueError, match=r"x\.bin: not a pickle of tensors"):
        formats.read_bin(str(tmp_path / "x.bin"))
    assert (tmp_path / "canary").exists()


def test_bin_shard_index_outside_the_folder_is_refused(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-1.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "../pytorch_model-1.bin"}}))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin\.index\.json: shard .* lies outside"):
        formats.read_tensors(tmp_path)


# ------------------------------------------------------------------------------------------------------ CLIP

@pytest.mark.parametrize("layout", CLIP_LAYOUTS)
def test_every_clip_layout_matches_the_reference(layout):
    tower = formats.load_clip(os.path.join(FIXTURES, layout))
    with torch.no_grad():
        states = [tower(CLIP_REF["pixel_values"], i, "cls_patch") for i in range(len(tower.encoder.layers) + 1)]
        features = tower(CLIP_REF["pixel_values"])
    for i, state in enumerate(states):
        torch.testing.assert_close(state, CLIP_REF[f"hidden_states.{i}"], atol=1e-4, rtol=0, msg=f"layer {i}")
    torch.testing.assert_close(features, CLIP_REF["features"], atol=1e-4, rtol=0)


def test_all_clip_layouts_load_identical_weights():
    states = [formats.load_clip(os.path.join(FIXTURES, layout)).state_dict() for layout in CLIP_LAYOUTS]
    for other in states[1:]:
        assert other.keys() == states[0].keys()
        assert all(torch.equal(other[k], states[0][k]) for k in states[0])


def test_full_clip_model_applies_dtype():
    tower = formats.load_clip(os.path.join(FIXTURES, "clip_full"), dtype=torch.bfloat16)
    assert {p.dtype for p in tower.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in tower.parameters()} == {"cpu"}  # nothing left on meta


def test_clip_pickle_checkpoint_loads_like_safetensors(tmp_path):
    shutil.copy(os.path.join(FIXTURES, "clip_full", "config.json"), tmp_path / "config.json")
    torch.save(load_file(os.path.join(FIXTURES, "clip_full", "model.safetensors")), tmp_path / "pytorch_model.bin")
    with torch.no_grad():
        features = formats.load_clip(tmp_path)(CLIP_REF["pixel_values"])
    torch.testing.assert_close(features, CLIP_REF["features"], atol=1e-4, rtol=0)


def test_transformers_5_clip_saves_back_in_the_published_layout(tmp_path):
    formats.load_clip(os.path.join(FIXTURES, "clip_tiny_hf5")).save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    published = load_file(os.path.join(FIXTURES, "clip_tiny", "model.safetensors"))
    published.pop("vision_model.embeddings.position_ids")  # an old buffer, not a weight
    assert saved.keys() == published.keys()
    assert all(torch.equal(saved[k], published[k]) for k in saved)


def test_clip_key_map_strips_the_prefix_with_inverse():
    published = {"vision_model.pre_layrnorm.weight": 1, "vision_model.encoder.layers.0.mlp.fc1.bias": 2}
    tower_keys = formats.clip_model_to_tower_keys(published)
    assert tower_keys == {"pre_layrnorm.weight": 1, "encoder.layers.0.mlp.fc1.bias": 2}
    assert tower_to_clip_keys(tower_keys) == published
    assert formats.clip_model_to_tower_keys(tower_keys) == tower_keys  # transformers-5 names are tower names


def test_clip_key_map_refuses_a_tensor_with_and_without_prefix():
    with pytest.raises(KeyError, match="pre_layrnorm.weight"):
        formats.clip_model_to_tower_keys({"vision_model.pre_layrnorm.weight": 1, "pre_layrnorm.weight": 2})


def test_text_tower_and_heads_are_never_read():
    assert all(formats.is_clip_skipped(k) for k in ["text_model.embeddings.token_embedding.weight", "logit_scale",
                                                    "visual_projection.weight", "text_projection.weight",
                                                    "vision_model.embeddings.position_ids"])
    assert not formats.is_clip_skipped("vision_model.post_layernorm.weight")


def test_full_clip_config_nests_the_vision_config():
    vision = json.load(open(os.path.join(FIXTURES, "clip_tiny", "config.json")))
    full = json.load(open(os.path.join(FIXTURES, "clip_full", "config.json")))
    assert CLIPVisionConfig.from_hf(formats.clip_vision_config(full)) == CLIPVisionConfig.from_hf(vision)


# -------------------------------------------------------------------------------------------------- llava-hf

def test_config_from_llava_hf(model):
    c = model.config
    assert (c.projector_type, c.select_layer, c.select_feature, c.image_token_index) == ("mlp2x_gelu", -2, "patch", 120)
    assert c.num_image_tokens == 25 and c.image_size == 30 and c.llm.vocab_size == 128


def test_llava_hf_config_map_has_an_inverse(model):
    own = model.config.to_dict()
    hf = formats.llava_to_hf_config(own, 128, 120, "float32")
    back = formats.llava_hf_config(hf, do_pad=own["image_aspect_ratio"] == "pad")
    assert LLaVAConfig.from_dict({**back, "template": own["template"]}) == model.config


@pytest.mark.parametrize("change", [{"projector_hidden_act": "relu"}, {"multimodal_projector_bias": False},
                                    {"vision_feature_layer": [-2, -1]}, {"vision_feature_select_strategy": "cls"}])
def test_llava_hf_config_refuses_what_the_model_cannot_do(change):
    d = json.load(open(os.path.join(HF_DIR, "config.json")))
    with pytest.raises(ValueError, match="not supported"):
        formats.llava_hf_config({**d, **change}, "config.json")


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
    other = formats.load_llava(write_hf_variant(tmp_path, rename))
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_llava_hf_key_map_has_an_inverse(model):
    sd = model.state_dict()
    assert formats.hf_to_llava_keys(formats.llava_to_hf_keys(sd)).keys() == sd.keys()
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in formats.llava_to_hf_keys(sd)


def test_unexpected_llava_hf_key_names_key_and_file(tmp_path):
    shutil.copy(os.path.join(HF_DIR, "config.json"), tmp_path / "config.json")
    sd = load_file(os.path.join(HF_DIR, "model.safetensors"))
    sd["multi_modal_projector.linear_3.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"model\.safetensors: unexpected key 'multi_modal_projector\.linear_3"):
        formats.load_llava(str(tmp_path))


def test_missing_llava_hf_key_names_both_names(tmp_path):
    shutil.copy(os.path.join(HF_DIR, "config.json"), tmp_path / "config.json")
    sd = load_file(os.path.join(HF_DIR, "model.safetensors"))
    del sd["language_model.model.norm.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"missing key 'language_model\.model\.norm\.weight' \(llm\.norm\.weight\)"):
        formats.load_llava(str(tmp_path))


def test_two_names_of_one_llava_hf_tensor_are_refused(tmp_path):
    shutil.copy(os.path.join(HF_DIR, "config.json"), tmp_path / "config.json")
    sd = load_file(os.path.join(HF_DIR, "model.safetensors"))  # transformers 5: the tower without "vision_model."
    sd["vision_tower.vision_model.post_layernorm.bias"] = sd["vision_tower.post_layernorm.bias"].clone()
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"model\.safetensors: several tensors map to one key"):
        formats.load_llava(str(tmp_path))


def test_integer_tensor_in_a_llava_hf_file_names_key_and_file(tmp_path):
    shutil.copy(os.path.join(HF_DIR, "config.json"), tmp_path / "config.json")
    sd = load_file(os.path.join(HF_DIR, "model.safetensors"))
    sd["multi_modal_projector.linear_1.bias"] = sd["multi_modal_projector.linear_1.bias"].long()
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors: key 'multi_modal_projector\.linear_1\.bias' holds "):
        formats.load_llava(str(tmp_path))


def test_wrong_type_in_a_llava_hf_text_config_names_file_and_key(tmp_path):
    shutil.copy(os.path.join(HF_DIR, "model.safetensors"), tmp_path / "model.safetensors")
    d = json.load(open(os.path.join(HF_DIR, "config.json")))
    d["text_config"]["hidden_size"] = "64"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"config\.json 'llm': hidden_size is '64', expected int"):
        formats.load_llava(str(tmp_path))


# ------------------------------------------------------------------------------------------ original release

def test_original_key_map_has_an_inverse(model):
    sd = model.state_dict()
    assert formats.original_to_llava_keys(formats.llava_to_original_keys(sd)).keys() == sd.keys()
    assert "model.mm_projector.2.bias" in formats.llava_to_original_keys(sd)


@pytest.mark.parametrize("pickle_shards", [False, True])
def test_original_release_layout_loads_to_identical_outputs(model, tmp_path, pickle_shards):
    out, clip_dir = str(tmp_path / "llava-v1.5"), str(tmp_path / "clip")
    write_original_release(model, out, clip_dir, pickle_shards)
    loaded = formats.load_llava(out, vision_tower=clip_dir)
    assert loaded.config.image_aspect_ratio == "pad" and loaded.config.projector_type == "mlp2x_gelu"
    assert torch.equal(logits_of(loaded, REF["input_ids_2"], REF["pixel_values_2"]),
                       logits_of(model, REF["input_ids_2"], REF["pixel_values_2"]))


def test_original_release_tower_may_be_a_full_clip_model(model, tmp_path):
    write_original_release(model, tmp_path / "llava", tmp_path / "unused")
    loaded = formats.load_llava(tmp_path / "llava", vision_tower=os.path.join(FIXTURES, "clip_full"))
    tower = formats.load_clip(os.path.join(FIXTURES, "clip_full"))
    for key, value in tower.state_dict().items():
        assert torch.equal(loaded.vision_tower.state_dict()[key], value), key


def test_original_release_without_a_tower_folder_says_what_to_pass(model, tmp_path):
    write_original_release(model, tmp_path / "llava", tmp_path / "clip")
    with pytest.raises(FileNotFoundError, match="vision_tower="):
        formats.load_llava(tmp_path / "llava")


@pytest.mark.parametrize("change, message", [({"sep_image_conv_front": True}, "sep_image_conv_front=True"),
                                             ({"mm_hidden_size": 64}, "mm_hidden_size=64, but the vision tower's")])
def test_original_release_settings_the_model_cannot_follow_are_refused(change, message):
    with pytest.raises(ValueError, match=re.escape(f"config.json: {message}")):
        formats.original_config(change, {"hidden_size": 32}, "config.json")


@pytest.mark.parametrize("path, config, template", [
    ("LLaVA-13b-v0", {}, "llava_v0"), ("runs/LLaVA-7b-v0-science_qa/checkpoint-500", {}, "llava_v0"),
    ("LLaVA-Lightning-7B-v1-1", {}, "vicuna_v1"), ("llava-llama-2-13b-chat-lightning-preview", {}, "llava_llama_2"),
    ("checkpoints/llava-v1.5-7b", {"mm_projector_type": "mlp2x_gelu"}, "vicuna_v1"),
    ("my-finetune", {"mm_projector_type": "mlp2x_gelu"}, "vicuna_v1"),
    ("llava-v1.6-mistral-7b", {"mm_projector_type": "mlp2x_gelu"}, "mistral_instruct"),
    ("llava-v1.6-34b", {"mm_projector_type": "mlp2x_gelu"}, "chatml_direct"),
    ("llava-v1.6-vicuna-13b", {"mm_projector_type": "mlp2x_gelu"}, "vicuna_v1")])
def test_original_release_template_follows_the_originals_name_rule(path, config, template):
    assert formats.original_template(path, config) == template


def test_original_stage_1_projector_loads(model, tmp_path):
    torch.save(formats.llava_to_original_keys({"projector." + k: v for k, v in model.projector.state_dict().items()}),
               tmp_path / "mm_projector.bin")
    fresh = LLaVA(model.config)
    formats.load_projector(fresh, tmp_path)
    for key, value in model.projector.state_dict().items():
        assert torch.equal(fresh.projector.state_dict()[key], value), key


def test_original_stage_1_projector_is_strict(model, tmp_path):
    sd = {"projector." + k: v for k, v in model.projector.state_dict().items() if k != "2.bias"}
    torch.save(formats.llava_to_original_keys(sd), tmp_path / "mm_projector.bin")
    with pytest.raises(KeyError, match=r"mm_projector\.bin: missing key 'model\.mm_projector\.2\.bias'"):
        formats.load_projector(LLaVA(model.config), tmp_path)


def test_no_projector_file_names_what_is_looked_for(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no projector.safetensors or mm_projector.bin"):
        formats.load_projector(LLaVA(model.config), tmp_path)


# ------------------------------------------------------------------------------------------ export to llava-hf

def with_vocabulary(model, vocab_size, seed=0):
    """A random LLaVA like `model` whose LLM has `vocab_size` ids and no remembered image token."""
    config = LLaVAConfig(**{**model.config.__dict__, "image_token_index": None})
    config.llm = type(config.llm)(**{**config.llm.__dict__, "vocab_size": vocab_size})
    torch.manual_seed(seed)
    return LLaVA(config).eval()


def test_export_hf_writes_the_recorded_keys(model, tmp_path):
    formats.export_hf(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        got = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    assert got == json.load(open(os.path.join(FIXTURES, "llava_ref", "export_keys.json")))


def test_export_hf_config_keeps_the_llava_hf_fields(model, tmp_path):
    formats.export_hf(model, tmp_path)
    config = json.load(open(tmp_path / "config.json"))
    assert config["image_token_index"] == 120 and config["text_config"]["vocab_size"] == 128
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert config["image_seq_length"] == 25 and config["architectures"] == ["LlavaForConditionalGeneration"]


def test_export_hf_reloads_to_the_reference_logits(model, tmp_path):
    formats.export_hf(model, tmp_path)
    reloaded = formats.load_llava(str(tmp_path))
    torch.testing.assert_close(logits_of(reloaded, REF["input_ids_1"], REF["pixel_values_1"]), REF["logits_1"],
                               atol=1e-4, rtol=0)


def test_export_hf_adds_image_token_and_pads_vocab(model, tmp_path):
    small = with_vocabulary(model, 100)
    formats.export_hf(small, tmp_path)
    exported = json.load(open(tmp_path / "config.json"))
    assert exported["image_token_index"] == 100 and exported["text_config"]["vocab_size"] == 128
    reloaded = formats.load_llava(str(tmp_path))
    ids = ours(REF["input_ids_1"])
    want, got = logits_of(small, ids, REF["pixel_values_1"]), logits_of(reloaded, ids, REF["pixel_values_1"])
    torch.testing.assert_close(got[..., :100], want, atol=1e-5, rtol=0)
    # the padding rows are the mean row: their logit is the mean logit, never the greedy pick
    assert (got[..., 100:] < got[..., :100].max(-1, keepdim=True).values).all()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_export_hf_refuses_the_linear_projector(model, tmp_path):
    linear = LLaVA(LLaVAConfig(**{**model.config.__dict__, "projector_type": "linear"}))
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        formats.export_hf(linear, tmp_path)


def test_export_hf_without_a_tokenizer_writes_no_tokenizer_files(model, tmp_path):
    formats.export_hf(model, tmp_path)  # loaded from a folder without tokenizer.model
    assert not {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"} & set(os.listdir(tmp_path))


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """A model over the fixture tokenizer (512 pieces: <image> = 512, vocabulary padded to 576), exported with it."""
    out = tmp_path_factory.mktemp("exported")
    formats.export_hf(with_vocabulary(model, 512), out, tokenizer=FIXTURES)
    return out


def read(folder, name):
    return json.load(open(folder / name))


def test_export_copies_the_tokenizer(exported):
    assert (exported / "tokenizer.model").read_bytes() == open(TOKENIZER, "rb").read()


def test_export_adds_image_as_a_special_token_at_the_image_id(exported):
    config = read(exported, "tokenizer_config.json")
    assert read(exported, "config.json")["image_token_index"] == 512
    assert config["added_tokens_decoder"]["512"] == {"content": "<image>", "lstrip": False, "normalized": False,
                                                     "rstrip": False, "single_word": False, "special": True}
    assert config["extra_special_tokens"] == {"image_token": "<image>"}


def test_export_tokenizer_config_names_the_sentencepiece_specials(exported):
    config, sp = read(exported, "tokenizer_config.json"), Tokenizer(TOKENIZER).sp
    assert {k: v["content"] for k, v in config["added_tokens_decoder"].items()} == {
        "0": sp.id_to_piece(0), "1": sp.id_to_piece(1), "2": sp.id_to_piece(2), "512": "<image>"}
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert config["pad_token"] == "<unk>"  # LLaVA pads with unk
    assert read(exported, "special_tokens_map.json") == {"unk_token": "<unk>", "bos_token": "<s>",
                                                         "eos_token": "</s>", "pad_token": "<unk>"}


def test_export_tokenizer_splits_like_the_original(exported):
    config = read(exported, "tokenizer_config.json")
    # legacy: a chunk after <image> starts a new word, as the original's slow tokenizer and data.render do
    assert config["legacy"] is True and config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["processor_class"] == "LlavaProcessor"


def test_export_processor_config_gives_the_image_token_count(exported):
    processor, vision = read(exported, "processor_config.json"), read(exported, "config.json")["vision_config"]
    assert processor["processor_class"] == "LlavaProcessor" and processor["image_token"] == "<image>"
    # LlavaProcessor: (size / patch)^2 + num_additional_image_tokens, minus CLS for the "default" strategy
    count = (vision["image_size"] // processor["patch_size"]) ** 2 + processor["num_additional_image_tokens"]
    assert count - (processor["vision_feature_select_strategy"] == "default") == 25


def test_export_preprocessor_config_is_llava_s_clip_processing(exported):
    config = read(exported, "preprocessor_config.json")
    assert config["size"] == {"shortest_edge": 30} and config["crop_size"] == {"height": 30, "width": 30}
    assert config["do_pad"] is True and config["resample"] == 3  # image_aspect_ratio "pad"; bicubic
    assert config["image_mean"] == [0.48145466, 0.4578275, 0.40821073]


def render_chat(template, messages, add_generation_prompt):
    """The chat through jinja as transformers' apply_chat_template renders it (sandbox, trim and lstrip blocks)."""
    jinja2 = pytest.importorskip("jinja2")
    import jinja2.ext
    import jinja2.sandbox
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token="<s>", eos_token="</s>")


def original_ids(text, tokenizer, n_image_tokens=3):
    """A prompt string tokenized as the original LLaVA did: bos first, then every chunk between <image>, <s> and
    </s> encoded on its own."""
    ids = [tokenizer.bos_id]
    for part in re.split(r"(<image>|<s>|</s>)", text):
        special = {"<image>": [IMAGE_TOKEN_INDEX] * n_image_tokens, "<s>": [tokenizer.bos_id],
                   "</s>": [tokenizer.eos_id]}
        ids += special[part] if part in special else tokenizer.sp.encode(part) if part else []
    return ids


JINJA = sorted(name for name, t in TEMPLATES.items() if t.style in formats.CHAT_TEMPLATES)  # v0's: none


def test_v0_templates_have_no_chat_template():  # their models have the linear projector, which llava-hf lacks
    with pytest.raises(ValueError, match="'llava_v0' \\(style 'single'\\) has no chat template"):
        formats.chat_template("llava_v0")


@pytest.mark.parametrize("name", JINJA)
def test_chat_template_renders_the_prompt_of_its_conversation_template(name):
    tokenizer = Tokenizer(TOKENIZER)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    text = render_chat(formats.chat_template(name), chat, add_generation_prompt=True)
    ids, _ = render([{"from": "human", "value": "<image>\nWhat colour is it?"}], name, tokenizer, 3,
                    for_generation=True)
    assert original_ids(text, tokenizer) == ids


@pytest.mark.parametrize("name", [name for name in JINJA if not TEMPLATES[name].generation_only])
def test_chat_template_renders_a_conversation_as_training_does(name):
    tokenizer = Tokenizer(TOKENIZER)
    turns = [("human", "Describe <image> briefly."), ("gpt", "A red circle."), ("human", "Where?"), ("gpt", "Left.")]
    turns = turns[:2] if TEMPLATES[name].style == "plain" else turns  # stage 1 is one image and its caption
    chat = [{"role": {"human": "user", "gpt": "assistant"}[role], "content": value} for role, value in turns]
    text = render_chat(formats.chat_template(name), chat, add_generation_prompt=False)
    ids, _ = render([{"from": role, "value": value} for role, value in turns], name, tokenizer, 3)
    assert original_ids(text, tokenizer) == ids


def test_chat_template_takes_the_system_message_in_place_of_the_template_s():
    tokenizer = Tokenizer(TOKENIZER)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is it?"}]
    text = render_chat(formats.chat_template("vicuna_v1"), chat, add_generation_prompt=True)
    ids, _ = render([{"from": "human", "value": "<image>\nWhat is it?"}], Template("two", "Be brief."), tokenizer, 3,
                    for_generation=True)
    assert original_ids(text, tokenizer) == ids


def test_export_writes_the_chat_template_of_the_model_s_conversation_template(model, tmp_path):
    llava_v1 = LLaVA(LLaVAConfig(**{**model.config.__dict__, "template": "llava_v1"}))
    formats.export_hf(llava_v1, tmp_path)
    assert read(tmp_path, "chat_template.json") == {"chat_template": formats.chat_template("llava_v1")}
    assert formats.chat_template("llava_v1") != formats.chat_template("vicuna_v1")


def test_export_refuses_an_unknown_conversation_template_before_writing(model, tmp_path):
    unknown = LLaVA(LLaVAConfig(**{**model.config.__dict__, "template": "mistral"}))
    with pytest.raises(ValueError, match="conversation template 'mistral' is unknown"):
        formats.export_hf(unknown, tmp_path)
    assert os.listdir(tmp_path) == []


def test_export_refuses_a_tokenizer_whose_pieces_do_not_end_at_the_image_id(model, tmp_path):
    with pytest.raises(ValueError, match=r"image token id 120 must be the first id after the tokenizer's 512 pieces"):
        formats.export_hf(model, tmp_path, tokenizer=TOKENIZER)
    assert os.listdir(tmp_path) == []  # checked before anything is written


def test_export_names_a_corrupt_tokenizer(model, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"garbage" * 20)
    with pytest.raises(ValueError, match=r"tokenizer\.model: not a sentencepiece model"):
        formats.export_hf(with_vocabulary(model, 100), tmp_path / "out", tokenizer=tmp_path)


def test_export_takes_the_tokenizer_of_the_folder_the_model_came_from(model, tmp_path):
    source = with_vocabulary(model, 512)
    source.save_pretrained(tmp_path / "ckpt")
    shutil.copy(TOKENIZER, tmp_path / "ckpt" / "tokenizer.model")
    formats.export_hf(formats.load_llava(tmp_path / "ckpt"), tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == open(TOKENIZER, "rb").read()


def test_exported_tower_keeps_the_clip_vision_model_names_and_weights(model, tmp_path):
    formats.export_hf(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for key, value in tower_to_clip_keys(model.vision_tower.state_dict()).items():
            assert torch.equal(f.get_tensor("vision_tower." + key), value), key


def test_load_projector_restores_the_saved_one(model, tmp_path):
    model.save_projector(tmp_path)
    torch.manual_seed(0)
    fresh = LLaVA(model.config)
    formats.load_projector(fresh, tmp_path)
    for key, value in model.projector.state_dict().items():
        assert torch.equal(fresh.projector.state_dict()[key], value), key
    assert all(p.requires_grad for p in fresh.projector.parameters())  # it goes on training


def test_load_projector_is_strict(model, tmp_path):
    model.save_projector(tmp_path)
    tensors = load_file(str(tmp_path / "projector.safetensors"))
    del tensors["projector.2.bias"]
    save_file(tensors, str(tmp_path / "projector.safetensors"))
    with pytest.raises(KeyError, match="projector.2.bias") as err:
        formats.load_projector(LLaVA(model.config), tmp_path)
    assert "projector.safetensors" in str(err.value)


def test_load_projector_refuses_another_projector_type(model, tmp_path):
    model.save_projector(tmp_path)
    linear = LLaVAConfig(**{**model.config.__dict__, "projector_type": "linear"})
    with pytest.raises(ValueError, match="projector_type"):
        formats.load_projector(LLaVA(linear), tmp_path)


# ---------------------------------------------------------------------------------------------- v0 deltas

V0_ADDED = {"<im_patch>": 512, "<im_start>": 513, "<im_end>": 514}  # LLaVA v0's tokens, after the 512 pieces


@pytest.fixture(scope="module")
def v0(tmp_path_factory):
    """A tiny LLaMA base, a LLaVA v0 model grown from it (3 added tokens, linear projector, <im_start>/<im_end>) and
    its delta stored as the paper's release is: float16 pickle shards of model - base (with the rotary buffer
    transformers 4.28 saved), a v0 config.json, the tokenizer with added_tokens.json. Applied by the command line."""
    root = tmp_path_factory.mktemp("v0")
    torch.manual_seed(0)
    base = Llama(LlamaConfig.from_name("tiny"))
    with torch.no_grad():
        base.norm.weight.uniform_(0.5, 1.5)
    base.save_pretrained(root / "base")
    clip_dir = os.path.join(FIXTURES, "clip_tiny")
    llm = {**base.config.to_hf(), "vocab_size": 515}
    model = LLaVA(LLaVAConfig.from_dict({"format": "llava-minimal", "llm": llm, "vision": CLIPVisionConfig.from_hf(
        json.load(open(os.path.join(clip_dir, "config.json")))).to_hf(), "projector_type": "linear"}))
    base_sd = {k: v.half() for k, v in base.state_dict().items()}
    delta = {}
    for key, value in formats.llava_to_original_keys(model.state_dict()).items():
        name = key.removeprefix("model.") if not key.startswith("lm_head.") else key
        if key.startswith("model.vision_tower."):
            continue
        value = value.half().clone()
        if name in base_sd:  # the target minus the base, the added rows as they are
            value[:base_sd[name].shape[0]] -= base_sd[name]
        delta[key] = value
    out = root / "delta"
    out.mkdir()
    keys = sorted(delta)
    shards = {"pytorch_model-00001-of-00002.bin": keys[:len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    delta["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    shards["pytorch_model-00001-of-00002.bin"].append("model.layers.0.self_attn.rotary_emb.inv_freq")
    for name, part in shards.items():
        torch.save({k: delta[k] for k in part}, out / name)
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, part in shards.items() for k in part}}))
    config = {**{k: v for k, v in llm.items() if k != "max_position_embeddings"}, "max_sequence_length": 2048,
              "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
              "mm_vision_tower": "openai/clip-vit-large-patch14",
              "mm_hidden_size": 32, "mm_use_im_start_end": True, "mm_vision_select_layer": -2, "use_mm_proj": True,
              "sep_image_conv_front": False, "tune_mm_mlp_adapter": False, "torch_dtype": "float16"}
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(TOKENIZER, out / "tokenizer.model")
    (out / "added_tokens.json").write_text(json.dumps({**V0_ADDED, "[PAD]": 515}))  # [PAD] past the rows, as released
    (out / "special_tokens_map.json").write_text(json.dumps(  # bos "</s>": the prompts start with id 2
        {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "[PAD]", "unk_token": "<unk>"}))
    formats.main(["apply-delta", "--base", str(root / "base"), "--delta", str(out), "--out", str(root / "LLaVA-7b"),
                  "--vision-tower", clip_dir])
    return {"base": base_sd, "delta": delta, "out": root / "LLaVA-7b", "root": root}


def applied(v0):
    return load_file(v0["out"] / "model-00001-of-00002.safetensors") | load_file(
        v0["out"] / "model-00002-of-00002.safetensors")


def test_apply_delta_adds_the_base_to_every_shared_tensor(v0):
    out = applied(v0)
    for name, base in v0["base"].items():
        key = name if name.startswith("lm_head.") else "model." + name
        rows = base.shape[0]
        assert torch.equal(out[key][:rows], v0["delta"][key][:rows] + base), key  # float16, as the original adds


def test_apply_delta_keeps_the_added_rows_and_the_projector_of_the_delta(v0):
    out = applied(v0)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[key].shape[0] == 515 and torch.equal(out[key][512:], v0["delta"][key][512:])
    assert torch.equal(out["model.mm_projector.weight"], v0["delta"]["model.mm_projector.weight"])
    assert not any("inv_freq" in k for k in out)  # recomputed from the config, never read


def test_apply_delta_copies_config_and_tokenizer(v0):
    assert sorted(os.listdir(v0["out"])) == ["added_tokens.json", "config.json", "model-00001-of-00002.safetensors",
                                              "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                              "special_tokens_map.json", "tokenizer.model"]
    tokenizer = Tokenizer(str(v0["out"]))
    assert tokenizer.token_id("<im_start>") == 513 and tokenizer.bos_id == 2


def test_apply_delta_adds_the_image_tokens_a_delta_lacks(v0, tmp_path):  # LLaVA-13b-delta-v0-science_qa has none
    delta = shutil.copytree(v0["root"] / "delta", tmp_path / "delta")
    os.remove(delta / "added_tokens.json")
    formats.apply_delta(v0["root"] / "base", delta, tmp_path / "out")
    # the original's loaders add them in this order after the pieces, as its training did
    assert json.load(open(tmp_path / "out" / "added_tokens.json")) == V0_ADDED


def test_apply_delta_names_a_tensor_of_another_shape(v0, tmp_path):
    shutil.copytree(v0["root"] / "base", tmp_path / "base")
    sd = load_file(tmp_path / "base" / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(sd, tmp_path / "base" / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(176, 64\) in the "
                                         r"delta but \(175, 64\) in the base"):
        formats.apply_delta(tmp_path / "base", v0["root"] / "delta", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")  # nothing half-written


def test_applied_v0_release_loads_with_its_settings(v0):
    model = formats.load_llava(v0["out"])  # apply-delta --vision-tower wrote the local CLIP folder in its config
    c = model.config
    assert (c.mm_use_im_start_end, c.template, c.projector_type, c.llm.vocab_size) == (True, "llava_v0", "linear", 515)


def test_v0_logits_equal_the_originals_input_construction(v0):
    """The original v0 model: the prompt holds <im_start>, one <im_patch> per feature and <im_end>; the embeddings
    of the <im_patch> positions are replaced by the image features, those of <im_start>/<im_end> kept."""
    model, tok = formats.load_llava(v0["out"]), Tokenizer(str(v0["out"]))
    n, pixel_values = model.config.num_image_tokens, torch.randn(1, 3, 30, 30)
    ids, _ = render([{"from": "human", "value": "<image>\nWhat is it?"}], "llava_v0", tok, n, for_generation=True,
                    image_start_end=True)
    text = (TEMPLATES["llava_v0"].system + "###Human: <im_start>" + "<im_patch>" * n + "<im_end>\nWhat is it?"
            "###Assistant:")
    original_ids = torch.tensor(tok.encode(text))
    assert ids == [IMAGE_TOKEN_INDEX if i == 512 else i for i in original_ids.tolist()]
    with torch.no_grad():
        embeds = model.llm.embed_tokens(original_ids)  # (T, D)
        features = model.projector(model.vision_tower(pixel_values, -2, "patch"))[0]  # (n, D)
        s = int((original_ids == 513).nonzero())
        embeds = torch.cat([embeds[:s + 1], features, embeds[s + n + 1:]])
        expected = model.llm(inputs_embeds=embeds[None])
        logits, _ = model(torch.tensor([ids]), pixel_values)
    assert torch.allclose(logits, expected, atol=1e-5, rtol=0)


def test_mistral_instruct_chat_template_renders_later_rounds_without_bos_or_system():
    tokenizer = Tokenizer(TOKENIZER)
    turns = [("human", "<image>\nWhat is it?"), ("gpt", "A red circle."), ("human", "Where?")]
    chat = [{"role": {"human": "user", "gpt": "assistant"}[role], "content": value} for role, value in turns]
    text = render_chat(formats.chat_template("mistral_instruct"), chat, add_generation_prompt=True)
    ids, _ = render([{"from": role, "value": value} for role, value in turns], "mistral_instruct", tokenizer, 3,
                    for_generation=True)
    assert text.count("[INST]") == 2 and "<<SYS>>" not in text and "<s>" not in text
    assert original_ids(text, tokenizer) == ids
