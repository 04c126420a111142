"""clip.py against transformers' CLIPVisionModel and CLIPImageProcessor (fixtures from tests/make_fixtures.py)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from clip import (CLIPVisionConfig, CLIPVisionTower, PAD_COLOR, clip_to_tower_keys, load_image, preprocess,
                  tower_to_clip_keys)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
LAYOUTS = ["clip_tiny", "clip_tiny_hf5", "clip_full"]  # published prefix, transformers-5 (no prefix), full CLIPModel
OUTPUTS = os.path.join(FIXTURES, "clip_outputs")
REFERENCE = load_file(os.path.join(OUTPUTS, "tower.safetensors"))
PREPROCESS = load_file(os.path.join(OUTPUTS, "preprocess.safetensors"))
PREPROCESS_META = json.load(open(os.path.join(OUTPUTS, "preprocess.json")))


def tower(layout="clip_tiny", **kw):
    return CLIPVisionTower.from_pretrained(os.path.join(FIXTURES, layout), **kw)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_hidden_state_and_llava_features_match_reference(layout):
    model = tower(layout)
    x = REFERENCE["pixel_values"]
    with torch.no_grad():
        states = model.hidden_states(x)
        features = model(x)  # LLaVA's default: layer -2, CLS dropped
    assert len(states) == 4
    for i, state in enumerate(states):
        torch.testing.assert_close(state, REFERENCE[f"hidden_states.{i}"], atol=1e-4, rtol=0, msg=f"layer {i}")
    assert features.shape == (2, 25, 32)
    torch.testing.assert_close(features, REFERENCE["features"], atol=1e-4, rtol=0)


def test_all_layouts_load_identical_weights():
    states = [tower(layout).state_dict() for layout in LAYOUTS]
    for other in states[1:]:
        assert other.keys() == states[0].keys()
        assert all(torch.equal(other[k], states[0][k]) for k in states[0])


@pytest.mark.parametrize("select_layer", [0, 1, -1, -2, 3])
@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
def test_feature_selection(select_layer, select_feature):
    model = tower()
    calls = []
    for i, layer in enumerate(model.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    with torch.no_grad():
        features = model(REFERENCE["pixel_values"], select_layer=select_layer, select_feature=select_feature)
    expected = REFERENCE[f"hidden_states.{select_layer % 4}"]
    expected = expected[:, 1:] if select_feature == "patch" else expected
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=0)
    assert calls == list(range(select_layer % 4))  # layers after the selected one are never run


def test_bad_selection_and_input_size_raise():
    model = tower()
    x = REFERENCE["pixel_values"]
    with pytest.raises(ValueError, match="select_layer"):
        model(x, select_layer=-5)
    with pytest.raises(ValueError, match="select_feature"):
        model(x, select_feature="cls")
    with pytest.raises(ValueError, match="30x30"):
        model(torch.zeros(1, 3, 36, 36))


def test_dtype_and_device_are_applied():
    model = tower("clip_full", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # nothing left on meta
    with torch.no_grad():
        features = model(REFERENCE["pixel_values"])  # fp32 pixels are cast to the weights' dtype
    assert features.dtype == torch.bfloat16
    torch.testing.assert_close(features.float(), REFERENCE["features"], atol=0.1, rtol=0)  # bf16 rounding


def test_save_pretrained_writes_published_layout(tmp_path):
    model = tower("clip_tiny_hf5")
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    published = load_file(os.path.join(FIXTURES, "clip_tiny", "model.safetensors"))
    published.pop("vision_model.embeddings.position_ids")  # an old buffer, not a weight
    assert saved.keys() == published.keys()
    assert all(torch.equal(saved[k], published[k]) for k in saved)
    config = json.load(open(tmp_path / "config.json"))
    assert config["model_type"] == "clip_vision_model" and CLIPVisionConfig.from_hf(config) == model.config
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    with torch.no_grad():
        torch.testing.assert_close(CLIPVisionTower.from_pretrained(tmp_path)(REFERENCE["pixel_values"]),
                                   REFERENCE["features"], atol=1e-4, rtol=0)


def test_pickle_checkpoint_loads_like_safetensors(tmp_path):
    shutil.copy(os.path.join(FIXTURES, "clip_full", "config.json"), tmp_path / "config.json")
    torch.save(load_file(os.path.join(FIXTURES, "clip_full", "model.safetensors")), tmp_path / "pytorch_model.bin")
    model = CLIPVisionTower.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(REFERENCE["pixel_values"]), REFERENCE["features"], atol=1e-4, rtol=0)


def _edited_checkpoint(tmp_path, edit):
    d = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIXTURES, "clip_tiny"), d)
    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors")
    return d


def test_unexpected_tensor_raises_naming_key_and_file(tmp_path):
    d = _edited_checkpoint(tmp_path, lambda t: t.update({"vision_model.encoder.layers.9.fc.weight": torch.zeros(2)}))
    with pytest.raises(KeyError, match=r"model\.safetensors.*vision_model\.encoder\.layers\.9\.fc\.weight"):
        CLIPVisionTower.from_pretrained(d)


def test_missing_tensor_raises_naming_key_and_file(tmp_path):
    d = _edited_checkpoint(tmp_path, lambda t: t.pop("vision_model.encoder.layers.1.mlp.fc1.bias"))
    with pytest.raises(KeyError, match=r"model\.safetensors.*encoder\.layers\.1\.mlp\.fc1\.bias"):
        CLIPVisionTower.from_pretrained(d)


def test_wrong_shape_raises_naming_key_and_shapes(tmp_path):
    d = _edited_checkpoint(tmp_path, lambda t: t.update(
        {"vision_model.embeddings.position_embedding.weight": torch.zeros(37, 32)}))
    key = r"vision_model\.embeddings\.position_embedding\.weight"
    with pytest.raises(ValueError, match=key + r".*\(37, 32\).*\(26, 32\)"):
        CLIPVisionTower.from_pretrained(d)


def test_missing_and_corrupt_checkpoint_files_raise_naming_them(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIXTURES, "clip_tiny"), d)
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="model.safetensors"):
        CLIPVisionTower.from_pretrained(d)
    os.remove(d / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        CLIPVisionTower.from_pretrained(d)
    os.remove(d / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        CLIPVisionTower.from_pretrained(d)


def test_key_mapping_is_a_prefix_strip_with_inverse():
    published = {"vision_model.pre_layrnorm.weight": 1, "vision_model.encoder.layers.0.mlp.fc1.bias": 2}
    tower_keys = clip_to_tower_keys(published)
    assert tower_keys == {"pre_layrnorm.weight": 1, "encoder.layers.0.mlp.fc1.bias": 2}
    assert tower_to_clip_keys(tower_keys) == published
    assert clip_to_tower_keys(tower_keys) == tower_keys  # transformers-5 names are already tower names
    with pytest.raises(KeyError, match="pre_layrnorm.weight"):
        clip_to_tower_keys({"vision_model.pre_layrnorm.weight": 1, "pre_layrnorm.weight": 2})


def test_config_from_hf_presets_and_round_trip():
    vision = json.load(open(os.path.join(FIXTURES, "clip_tiny", "config.json")))
    full = json.load(open(os.path.join(FIXTURES, "clip_full", "config.json")))
    config = CLIPVisionConfig.from_hf(vision)
    assert config == CLIPVisionConfig.from_hf(full)
    assert (config.hidden_size, config.num_hidden_layers, config.image_size, config.num_patches) == (32, 3, 30, 25)
    assert CLIPVisionConfig.from_hf(config.to_hf()) == config
    assert CLIPVisionConfig.from_name("vit-l-14").num_patches == 256
    assert CLIPVisionConfig.from_name("vit-l-14-336").num_patches == 576
    with torch.device("meta"):  # parameter counts of transformers' CLIPVisionModel at these sizes
        for name, count in [("vit-l-14", 303179776), ("vit-l-14-336", 303507456)]:
            assert sum(p.numel() for p in CLIPVisionTower(CLIPVisionConfig.from_name(name)).parameters()) == count
    with pytest.raises(ValueError, match="vit-b"):
        CLIPVisionConfig.from_name("vit-b")
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPVisionConfig.from_hf({**vision, "hidden_act": "relu"})


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("name", sorted(PREPROCESS_META["modes"]))
def test_preprocess_matches_clip_image_processor(name, pad):
    with Image.open(os.path.join(OUTPUTS, "images", name)) as image:
        assert image.mode == PREPROCESS_META["modes"][name]  # the fixture still exercises this mode
        pixels = preprocess(image, PREPROCESS_META["image_size"], pad_to_square=pad)
    expected = PREPROCESS[f"{name}.{'pad' if pad else 'plain'}"]
    assert pixels.shape == (1, 3, 24, 24) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[0], expected, atol=1e-5, rtol=0)


def test_preprocess_batches_a_list():
    names = ["landscape.png", "gray.png", "rgba.png"]
    images = [Image.open(os.path.join(OUTPUTS, "images", n)) for n in names]
    batch = preprocess(images, 24, pad_to_square=True)
    torch.testing.assert_close(batch, torch.stack([PREPROCESS[f"{n}.pad"] for n in names]), atol=1e-5, rtol=0)
    assert tuple(PAD_COLOR) == tuple(PREPROCESS_META["pad_color"])


def test_load_image_is_rgb_with_alpha_dropped():
    path = os.path.join(OUTPUTS, "images", "rgba.png")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (33, 45)
    with Image.open(path) as rgba:  # like LLaVA's Image.open(f).convert("RGB"): colour channels kept, alpha dropped
        assert np.array_equal(np.asarray(image), np.asarray(rgba)[..., :3])
    # a transparent palette entry is not whitened either: LLaVA's pixels are those of convert("RGB")
    path = os.path.join(OUTPUTS, "images", "palette_transparent.png")
    with Image.open(path) as palette:
        rgb = palette.convert("RGB")
    for pad in (False, True):
        expected = preprocess(Image.fromarray(np.asarray(rgb)), 24, pad_to_square=pad)  # no transparency info
        assert torch.equal(preprocess(load_image(path), 24, pad_to_square=pad), expected)


def test_missing_and_corrupt_images_raise_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        load_image(tmp_path / "nowhere.jpg")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="garbage.png"):
        load_image(garbage)
    good = open(os.path.join(OUTPUTS, "images", "square.png"), "rb").read()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        load_image(truncated)
