"""clip.py against transformers' CLIPVisionModel and CLIPImageProcessor (fixtures from tests/make_fixtures.py)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import images
from clip import (CLIPVisionConfig, CLIPVisionTower, PAD_COLOR, clip_to_tower_keys, preprocess, quick_gelu,
                  tower_to_clip_keys)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
# the published CLIPVisionModel layout; transformers-5 and full CLIPModel folders are formats.py's (test_formats.py)
OUTPUTS = os.path.join(FIXTURES, "clip_outputs")
REFERENCE = load_file(os.path.join(OUTPUTS, "tower.safetensors"))
PREPROCESS = load_file(os.path.join(OUTPUTS, "preprocess.safetensors"))
PREPROCESS_META = json.load(open(os.path.join(OUTPUTS, "preprocess.json")))


def tower(layout="clip_tiny", **kw):
    return CLIPVisionTower.from_pretrained(os.path.join(FIXTURES, layout), **kw)


def test_every_hidden_state_and_llava_features_match_reference():
    model = tower("clip_tiny")
    x = REFERENCE["pixel_values"]
    with torch.no_grad():  # select_layer i: HF's hidden_states[i] (0: the embeddings), CLS kept
        states = [model(x, select_layer=i, select_feature="cls_patch") for i in range(len(model.encoder.layers) + 1)]
        features = model(x)  # LLaVA's default: layer -2, CLS dropped
    assert len(states) == 4
    for i, state in enumerate(states):
        torch.testing.assert_close(state, REFERENCE[f"hidden_states.{i}"], atol=1e-4, rtol=0, msg=f"layer {i}")
    assert features.shape == (2, 25, 32)
    torch.testing.assert_close(features, REFERENCE["features"], atol=1e-4, rtol=0)


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


def test_a_full_clip_model_folder_names_its_loader():
    with pytest.raises(ValueError, match=r"clip_full.*config\.json: a full CLIPModel .* formats\.load_clip"):
        CLIPVisionTower.from_pretrained(os.path.join(FIXTURES, "clip_full"))


def test_dtype_and_device_are_applied():
    model = tower("clip_tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # nothing left on meta
    with torch.no_grad():
        features = model(REFERENCE["pixel_values"])  # fp32 pixels are cast to the weights' dtype
    assert features.dtype == torch.bfloat16
    torch.testing.assert_close(features.float(), REFERENCE["features"], atol=0.1, rtol=0)  # bf16 rounding


def test_save_pretrained_writes_published_layout(tmp_path):
    model = tower("clip_tiny")
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


def _edited_checkpoint(tmp_path, edit=lambda tensors: None):
    d = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIXTURES, "clip_tiny"), d)
    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors")
    return d


def _edited_config(tmp_path, **change):
    d = _edited_checkpoint(tmp_path)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **change}))
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


def test_integer_tensor_where_a_weight_belongs_names_key_and_file(tmp_path):
    d = _edited_checkpoint(tmp_path, lambda t: t.update(
        {"vision_model.pre_layrnorm.weight": torch.ones(32, dtype=torch.int64)}))
    with pytest.raises(ValueError, match=r"model\.safetensors: key 'vision_model\.pre_layrnorm\.weight' holds "
                                         r"torch\.int64"):
        CLIPVisionTower.from_pretrained(d)


def test_corrupt_safetensors_names_the_file(tmp_path):
    d = _edited_checkpoint(tmp_path)
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="model.safetensors"):
        CLIPVisionTower.from_pretrained(d)


def test_missing_weights_file_raises_naming_what_is_looked_for(tmp_path):
    d = _edited_checkpoint(tmp_path)
    os.remove(d / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        CLIPVisionTower.from_pretrained(d)


def test_missing_config_names_the_file(tmp_path):
    d = _edited_checkpoint(tmp_path)
    os.remove(d / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        CLIPVisionTower.from_pretrained(d)


def test_malformed_config_names_the_file(tmp_path):
    d = _edited_checkpoint(tmp_path)
    (d / "config.json").write_text('{"hidden_size": ')
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON"):
        CLIPVisionTower.from_pretrained(d)


@pytest.mark.parametrize("change, message", [({"hidden_size": "32"}, r"hidden_size is '32', expected int"),
                                             ({"patch_size": 6.0}, r"patch_size is 6\.0, expected int"),
                                             ({"hidden_act": 1}, r"hidden_act is 1, expected str")])
def test_config_value_of_the_wrong_type_names_file_and_key(tmp_path, change, message):
    with pytest.raises(ValueError, match=r"config\.json: " + message):
        CLIPVisionTower.from_pretrained(_edited_config(tmp_path, **change))


def test_key_mapping_is_a_prefix_strip_with_inverse():
    published = {"vision_model.pre_layrnorm.weight": 1, "vision_model.encoder.layers.0.mlp.fc1.bias": 2}
    tower_keys = clip_to_tower_keys(published)
    assert tower_keys == {"pre_layrnorm.weight": 1, "encoder.layers.0.mlp.fc1.bias": 2}
    assert tower_to_clip_keys(tower_keys) == published


def test_config_from_hf():
    config = CLIPVisionConfig.from_hf(json.load(open(os.path.join(FIXTURES, "clip_tiny", "config.json"))))
    assert (config.hidden_size, config.num_hidden_layers, config.image_size, config.num_patches) == (32, 3, 30, 25)
    assert CLIPVisionConfig.from_hf(config.to_hf()) == config


@pytest.mark.parametrize("name, patches, count", [("vit-l-14", 256, 303179776), ("vit-l-14-336", 576, 303507456)])
def test_presets_have_the_published_sizes(name, patches, count):
    assert CLIPVisionConfig.from_name(name).num_patches == patches
    with torch.device("meta"):  # parameter counts of transformers' CLIPVisionModel at these sizes
        assert sum(p.numel() for p in CLIPVisionTower(CLIPVisionConfig.from_name(name)).parameters()) == count


def test_unknown_preset_and_activation_are_refused():
    with pytest.raises(ValueError, match="vit-b"):
        CLIPVisionConfig.from_name("vit-b")
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPVisionConfig.from_hf({**json.load(open(os.path.join(FIXTURES, "clip_tiny", "config.json"))),
                                  "hidden_act": "relu"})


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


@pytest.mark.parametrize("size, refused", [((21, 1), True), ((1, 21), True), ((20, 1), False), ((40, 800), False)])
def test_preprocess_refuses_aspect_ratios_beyond_the_limit(size, refused):
    image = Image.new("RGB", size, (200, 10, 10))
    for pad in (False, True):
        if refused:
            with pytest.raises(ValueError, match=f"{size[0]}x{size[1]} pixels is refused"):
                preprocess(image, 24, pad)
        else:
            assert preprocess(image, 24, pad).shape == (1, 3, 24, 24)


def peak_rss_growth(fn):
    """Bytes by which the resident set grew at its peak while fn() ran (Linux: clear_refs resets the peak). Unlike
    tracemalloc this sees pillow's own allocations."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs /proc/self/clear_refs (Linux) to reset the peak resident set size")

    def kilobytes(field):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(field + ":")).split()[1])
    before = kilobytes("VmRSS")
    fn()
    return (kilobytes("VmHWM") - before) * 1024


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("size", [(300, 6000), (6000, 300), (1300, 6000), (5000, 5000)])
def test_preprocess_memory_is_a_few_times_the_output(size, pad):
    image = Image.new("RGB", size, (30, 60, 90))  # (the input itself is the caller's, made before measuring)
    image.load()
    output_bytes = 3 * 336 * 336 * 4  # 1.35 MB; a 6000x6000 pad canvas is 144 MB, 300x6000 cropped 17 MB
    assert peak_rss_growth(lambda: preprocess(image, 336, pad_to_square=pad)) < 8 * output_bytes


def test_large_images_are_reduced_first_and_stay_close_to_the_exact_result(monkeypatch):
    ys, xs = np.mgrid[0:900, 0:1200]
    smooth = np.stack([xs * 255 // 1199, ys * 255 // 899, (xs + ys) * 255 // 2098], axis=-1).astype(np.uint8)
    image = Image.fromarray(smooth)  # 1200x900: past EXACT_UP_TO x 24
    for pad in (False, True):
        reduced = preprocess(image, 24, pad)
        monkeypatch.setattr(images, "EXACT_UP_TO", 10**6)
        exact = preprocess(image, 24, pad)
        monkeypatch.undo()
        assert not torch.equal(reduced, exact)  # the reduction did happen...
        assert (reduced - exact).abs().max() < 0.05  # ...and moved pixels by about a level (1/255/std = 0.015)
    strip = image.crop((0, 0, 1200, 200))  # 1:6, cropped: only its centre is resized
    reduced = preprocess(strip, 24)
    monkeypatch.setattr(images, "EXACT_UP_TO", 10**6)
    exact = preprocess(strip, 24)
    monkeypatch.undo()
    assert not torch.equal(reduced, exact) and (reduced - exact).abs().max() < 0.05
    small = image.resize((96, 72))  # at EXACT_UP_TO x 24 exactly: the processor's own path
    monkeypatch.setattr(images, "EXACT_UP_TO", 10**6)
    exact = [preprocess(small, 24, pad) for pad in (False, True)]
    monkeypatch.undo()
    assert all(torch.equal(preprocess(small, 24, pad), e) for pad, e in zip((False, True), exact))


def test_a_size_typo_in_config_json_is_refused_before_any_module_is_built(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json: num_hidden_layers is 10000000, not in 0\.\.1024"):
        CLIPVisionTower.from_pretrained(_edited_config(tmp_path, num_hidden_layers=10_000_000))


def test_quick_gelu_in_place_without_gradient_gives_the_bits_of_the_graph_version():
    x = torch.randn(3, 7, 16) * 4
    graph = quick_gelu(x.clone().requires_grad_())  # autograd needs the out-of-place form
    graph.sum().backward()  # and it trains
    with torch.no_grad():
        assert torch.equal(quick_gelu(x.clone()), graph.detach())
        assert torch.equal(graph.detach(), x * torch.sigmoid(1.702 * x))
