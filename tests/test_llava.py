"""llava.py against transformers' LlavaForConditionalGeneration (fixtures from tests/make_fixtures.py), and its own
checkpoint format. The other layouts (llava-hf keys, the original release, export) are tests/test_formats.py's."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import formats
import inference
from llama import Llama
from llava import IMAGE_TOKEN_INDEX, LLaVA, LLaVAConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HF_DIR = os.path.join(FIXTURES, "llava_hf")  # tiny LlavaForConditionalGeneration saved by transformers 5
REF = load_file(os.path.join(FIXTURES, "llava_ref", "reference.safetensors"))
HF_IMAGE_TOKEN = 120  # image_token_index of the fixture


def ours(ids):  # llava-hf prompts hold the image token id; ours hold -200 placeholders
    return ids.masked_fill(ids == HF_IMAGE_TOKEN, IMAGE_TOKEN_INDEX)


@pytest.fixture(scope="module")
def model():
    return formats.load_llava(HF_DIR)


def logits_of(model, ids, pixel_values):
    with torch.no_grad():
        return model(ours(ids), pixel_values)[0]


# ------------------------------------------------------------------------------------ parity with transformers

def test_logits_match_transformers(model):
    torch.testing.assert_close(logits_of(model, REF["input_ids_1"], REF["pixel_values_1"]), REF["logits_1"],
                               atol=1e-4, rtol=0)


def test_two_images_fill_their_placeholders_in_order(model):
    torch.testing.assert_close(logits_of(model, REF["input_ids_2"], REF["pixel_values_2"]), REF["logits_2"],
                               atol=1e-4, rtol=0)


def test_loss_matches_transformers(model):
    with torch.no_grad():
        loss = model(ours(REF["input_ids_1"]), REF["pixel_values_1"], labels=REF["labels_1"])[1].mean()
    torch.testing.assert_close(loss.reshape(1), REF["loss_1"], atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers(model):
    model.llm.setup_cache(1, 64)
    tokens = list(inference.generate_llava(model, ours(REF["input_ids_1"]), REF["pixel_values_1"], max_new_tokens=20))
    model.llm.reset_cache()
    assert tokens == REF["greedy_1"][0].tolist()


# ---------------------------------------------------------------------------------------------- the model

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


def test_more_images_than_placeholders_names_both_numbers(model):
    with pytest.raises(ValueError, match=r"25 image placeholders.*50 features"):
        model(ours(REF["input_ids_1"]), REF["pixel_values_2"])  # two images


def test_placeholders_without_images_name_both_numbers(model):
    with pytest.raises(ValueError, match=r"25 image placeholders.*0 features"):
        model(ours(REF["input_ids_1"]))


def test_tower_is_frozen_and_gets_no_gradient(model):
    assert all(not p.requires_grad for p in model.vision_tower.parameters())
    model.zero_grad(set_to_none=True)
    loss = model(ours(REF["input_ids_1"]), REF["pixel_values_1"], labels=REF["labels_1"])[1].mean()
    loss.backward()
    assert all(p.grad is None for p in model.vision_tower.parameters())
    assert model.projector[0].weight.grad.abs().sum() > 0 and model.llm.norm.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_stage_1_projector_learns_through_a_frozen_llm(model):
    model.llm.requires_grad_(False)
    try:
        loss = model(ours(REF["input_ids_1"]), REF["pixel_values_1"], labels=REF["labels_1"])[1].mean()
        loss.backward()
        assert model.projector[2].weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in model.llm.parameters())
    finally:
        model.llm.requires_grad_(True)
        model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------- own checkpoints

def changed_settings(model):
    config = LLaVAConfig(**{**model.config.__dict__, "template": "plain", "image_aspect_ratio": "square",
                            "mm_use_im_start_end": True})
    changed = LLaVA(config)
    changed.load_state_dict(model.state_dict())
    return changed


def test_own_layout_round_trip_keeps_weights_and_settings(model, tmp_path):
    changed = changed_settings(model)
    changed.save_pretrained(tmp_path)
    loaded = LLaVA.from_pretrained(str(tmp_path))
    assert loaded.config == changed.config
    for key, value in changed.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_own_config_is_marked_with_its_format(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["format"] == "llava-minimal"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # fileio's atomic writes


def test_loaded_tower_stays_frozen(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = LLaVA.from_pretrained(str(tmp_path))
    assert all(not p.requires_grad for p in loaded.vision_tower.parameters())
    assert all(p.requires_grad for p in loaded.projector.parameters())


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


def test_integer_tensor_where_a_weight_belongs_names_key_and_file(model, tmp_path):
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["projector.0.bias"] = tensors["projector.0.bias"].long()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors: key 'projector\.0\.bias' holds torch\.int64"):
        LLaVA.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("change, message", [({"select_layer": "-2"}, r"select_layer is '-2', expected int"),
                                             ({"image_token_index": 1.0}, r"image_token_index is 1\.0"),
                                             ({"mm_use_im_start_end": 1}, r"mm_use_im_start_end is 1, expected bool"),
                                             ({"llm": None}, r"not a llava-minimal config")])
def test_own_config_value_of_the_wrong_type_names_file_and_key(model, tmp_path, change, message):
    model.save_pretrained(tmp_path)
    config = json.load(open(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=r"config\.json: " + message):
        LLaVA.from_pretrained(str(tmp_path))


def test_llm_config_value_of_the_wrong_type_names_the_part(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.load(open(tmp_path / "config.json"))
    config["llm"]["num_attention_heads"] = 4.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json 'llm': num_attention_heads is 4\.0, expected int"):
        LLaVA.from_pretrained(str(tmp_path))


def test_save_projector_writes_only_the_projector(model, tmp_path):
    model.save_projector(tmp_path)
    with safe_open(str(tmp_path / "projector.safetensors"), "pt") as f:
        assert set(f.keys()) == {"projector.0.weight", "projector.0.bias", "projector.2.weight", "projector.2.bias"}


def test_from_parts_loads_base_checkpoints_and_builds_a_fresh_projector(model, tmp_path):
    model.llm.save_pretrained(tmp_path / "llm")  # base checkpoints in HF layout, as a user has them
    model.vision_tower.save_pretrained(tmp_path / "clip")
    torch.manual_seed(0)
    llm, tower = Llama.from_pretrained(str(tmp_path / "llm")), formats.load_clip(str(tmp_path / "clip"))
    built = LLaVA.from_parts(llm, tower, projector_type="linear", template="plain")
    assert built.config.template == "plain" and built.config.num_image_tokens == 25
    assert isinstance(built.projector, torch.nn.Linear) and built.projector.weight.shape == (64, 32)
    for key, value in model.state_dict().items():
        if not key.startswith("projector."):
            assert torch.equal(built.state_dict()[key], value), key
    assert all(not p.requires_grad for p in built.vision_tower.parameters())
    assert all(p.requires_grad for p in built.projector.parameters())


def test_from_parts_reads_a_full_clip_model(model, tmp_path):  # openai/clip-vit-large-patch14-336 is one
    model.llm.save_pretrained(tmp_path / "llm")
    llm = Llama.from_pretrained(str(tmp_path / "llm"))
    built = LLaVA.from_parts(llm, formats.load_clip(os.path.join(FIXTURES, "clip_full")))
    reference = LLaVA.from_parts(llm, formats.load_clip(os.path.join(FIXTURES, "clip_tiny")))
    for key, value in reference.vision_tower.state_dict().items():
        assert torch.equal(built.vision_tower.state_dict()[key], value), key


def _full_logits_loss(model, ids, pixel_values, labels):  # the textbook form: every position's logits, then shift
    logits = model.llm(inputs_embeds=model.embed(ids, pixel_values))  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100)


def test_loss_on_labelled_positions_equals_the_full_logits_loss():
    model = formats.load_llava(HF_DIR).requires_grad_(True)
    ids, pixels, labels = ours(REF["input_ids_1"]), REF["pixel_values_1"], REF["labels_1"]
    loss = model(ids, pixels, labels=labels)[1].mean()
    torch.testing.assert_close(loss, _full_logits_loss(model, ids, pixels, labels), atol=1e-6, rtol=0)


def test_loss_on_labelled_positions_gives_the_full_logits_gradients():
    model = formats.load_llava(HF_DIR).requires_grad_(True)
    model.vision_tower.requires_grad_(False)
    ids, pixels, labels = ours(REF["input_ids_1"]), REF["pixel_values_1"], REF["labels_1"]
    model(ids, pixels, labels=labels)[1].mean().backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    _full_logits_loss(model, ids, pixels, labels).backward()
    assert ours_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours_grads[name], p.grad, atol=1e-6, rtol=0, msg=name)


def test_training_forward_returns_logits_of_the_labelled_positions_only():
    labels = REF["labels_1"]
    logits, _ = formats.load_llava(HF_DIR)(ours(REF["input_ids_1"]), REF["pixel_values_1"], labels=labels)
    assert logits.shape == (int((labels[:, 1:] != -100).sum()), REF["logits_1"].shape[-1])


@pytest.mark.parametrize("change, message", [({"select_layer": -5}, "select_layer -5 is out of range for 3 CLIP layers"),
                                             ({"select_feature": "cls"}, "select_feature='cls' is not supported")])
def test_a_feature_selection_the_tower_cannot_give_is_refused(model, change, message):
    with pytest.raises(ValueError, match=message):
        LLaVAConfig(**{**model.config.__dict__, **change})


def test_another_layout_names_its_loader():
    with pytest.raises(ValueError, match=r"llava_hf.*config\.json: not a llava-minimal config.*formats\.load_llava"):
        LLaVA.from_pretrained(HF_DIR)
