"""LLaVA-1.6 "anyres" end to end: clip.preprocess_anyres against transformers' LlavaNextImageProcessor (PIL), the
merges of llava.py against LlavaNextForConditionalGeneration ("spatial_unpad") and the original's llava_arch.py ("flat",
"spatial"), both checkpoint layouts, per-image counts in data.render, the engine's answers against transformers'
generate, and export_hf's LlavaNext folder. Fixtures from tests/make_fixtures.py (llava_next)."""
import io
import json
import os
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import chat
import formats
import inference
from clip import CLIPVisionConfig, anyres_grid, preprocess_anyres, select_best_resolution
from data import render, with_image
from llama import LlamaConfig
from llava import IMAGE_TOKEN_INDEX, LLaVA, LLaVAConfig
from tokenizer import Tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HF_DIR = os.path.join(FIXTURES, "llava_next_hf")  # LlavaNextForConditionalGeneration, pinpoints "a"
REF_DIR = os.path.join(FIXTURES, "llava_next_ref")
PIXELS = load_file(os.path.join(REF_DIR, "preprocess.safetensors"))
REF = load_file(os.path.join(REF_DIR, "reference.safetensors"))
META = json.load(open(os.path.join(REF_DIR, "meta.json")))
TOKENIZER = os.path.join(FIXTURES, "tokenizer.model")
PROMPT = ([1, 17, 30], [40, 50, 60, 70])  # the reference's text ids around the image
UNPAD_CASES = sorted(k.split(".", 1) for k in REF if ".spatial_unpad." in k)  # [[pinpoint set, "spatial_unpad.x"]]
MERGE_CASES = sorted(k.removeprefix("a.").split(".", 1) for k in REF if k.startswith(("a.flat.", "a.spatial.")))


def image_path(name):
    folder = "llava_next_ref" if name in ("wide.png", "tall.png", "big.png") else "clip_outputs"
    return os.path.join(FIXTURES, folder, "images", name)


def hf_folder(tmp_path, pinpoints="a"):
    """The llava-hf fixture with pinpoint set "a", or a copy with set "b"'s config.json."""
    if pinpoints == "a":
        return HF_DIR
    folder = tmp_path / "hf_b"
    shutil.copytree(HF_DIR, folder)
    shutil.copy(os.path.join(REF_DIR, "config_b.json"), folder / "config.json")
    return str(folder)


@pytest.fixture(scope="module")
def model():
    return formats.load_llava(HF_DIR)


def last_logits(model, name):
    """The reference prompt around one image, its pixels ours (as the processor's: rgba.png composited on white,
    where load_image drops alpha as the original did): the last position's logits (1, V)."""
    with Image.open(image_path(name)) as image:
        c = model.config
        pixels, size = preprocess_anyres(image, c.image_size, c.image_grid_pinpoints), image.size
    ids = torch.tensor([PROMPT[0] + [IMAGE_TOKEN_INDEX] * c.image_tokens(size) + PROMPT[1]])
    with torch.no_grad():
        return model(ids, pixels, image_sizes=[size])[0][0, -1:]


# ---------------------------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("key", sorted(PIXELS))
def test_preprocess_anyres_equals_llava_next_image_processor_bit_for_bit(key):
    pinpoints, name = key.split(".", 1)
    with Image.open(image_path(name)) as image:
        pixels = preprocess_anyres(image, META["tile"], META["pinpoints"][pinpoints])
    assert pixels.dtype == torch.float32 and pixels.shape == PIXELS[key].shape
    assert torch.equal(pixels, PIXELS[key])


def test_best_resolution_reads_pinpoints_as_width_height():
    pinpoints = META["pinpoints"]["b"]  # [[24, 36], [48, 12], [12, 24], [36, 24]]
    assert select_best_resolution((120, 8), pinpoints) == (48, 12)  # wide: four tiles in a row
    assert select_best_resolution((7, 112), pinpoints) == (24, 36)  # tall: the tallest, 2 x 3 tiles
    assert anyres_grid((7, 112), pinpoints, 12) == (2, 3)
    # equal kept pixels (all of a 10x10 image): the least wasted area wins, the first of equals
    assert select_best_resolution((10, 10), [[24, 24], [12, 24], [24, 12]]) == (12, 24)


def test_preprocess_anyres_refuses_an_extreme_aspect_ratio():
    with pytest.raises(ValueError, match="21x1 pixels is refused"):
        preprocess_anyres(Image.new("RGB", (21, 1)), 12, META["pinpoints"]["a"])


# ----------------------------------------------------------------------------------------- the image tokens

@pytest.mark.parametrize("key", sorted(META["tokens"]))
def test_image_tokens_equal_the_references_counts(model, key):
    pinpoints, merge, name = key.split(".", 2)
    config = LLaVAConfig(**{**model.config.__dict__, "patch_merge_type": merge,
                            "image_grid_pinpoints": META["pinpoints"][pinpoints]})
    assert config.image_tokens(tuple(META["sizes"][name])) == META["tokens"][key]


def test_unpadding_truncates_as_the_original_where_transformers_rounds():
    # 88x55 at LLaVA-1.6's 336 px tower and grid: 1 x 2 tiles, a 24 x 48 feature map; the image's height scales to
    # 55 * (24 / 88) = 14.999...: int() makes it 14 and (48 - 14) // 2 = 17 padding rows go on each side, 14 rows stay
    # (transformers' round() makes it 15: 16 rows stay, as for 88x56, where 56 * (24 / 88) = 15.27)
    config = LLaVAConfig(llm=LlamaConfig.from_name("tiny"), vision=CLIPVisionConfig.from_name("vit-l-14-336"),
                         image_aspect_ratio="anyres", patch_merge_type="spatial_unpad",
                         image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
    assert config.image_tokens((88, 55)) == 576 + 14 * (24 + 1)
    assert config.image_tokens((88, 56)) == 576 + 16 * (24 + 1)


def test_num_image_tokens_refuses_anyres_naming_image_tokens(model):
    with pytest.raises(ValueError, match=r"anyres.*LLaVAConfig\.image_tokens"):
        model.config.num_image_tokens


@pytest.mark.parametrize("change, message", [
    ({"image_grid_pinpoints": None}, "image_grid_pinpoints=None"),
    ({"image_grid_pinpoints": [[12, 20]]}, r"\[\[12, 20\]\]: .*multiple of the tower's image_size 12"),
    ({"image_grid_pinpoints": [[12]]}, "list of \\[width, height\\]"),
    ({"select_feature": "cls_patch"}, "needs select_feature 'patch'"),
    ({"patch_merge_type": "spatial_unpad_anyres_max_9"}, "patch_merge_type=.* is not supported")])
def test_config_refuses_what_anyres_cannot_do(model, change, message):
    with pytest.raises(ValueError, match=message):
        LLaVAConfig(**{**model.config.__dict__, **change})


def test_render_takes_one_count_per_image():
    tokenizer = Tokenizer(TOKENIZER)
    turn = [{"from": "human", "value": with_image("What is it?")}]
    ids, labels = render(turn, "vicuna_v1", tokenizer, [7], for_generation=True)
    assert (ids, labels) == render(turn, "vicuna_v1", tokenizer, 7, for_generation=True)
    assert ids.count(IMAGE_TOKEN_INDEX) == 7
    with pytest.raises(ValueError, match="2 image token counts for 1 images"):
        render(turn, "vicuna_v1", tokenizer, [7, 9], for_generation=True)


# ------------------------------------------------------------------------------------ parity with transformers

@pytest.mark.parametrize("pinpoints, case", UNPAD_CASES)
def test_logits_match_llava_next_from_the_llava_hf_layout(tmp_path, pinpoints, case):
    loaded = formats.load_llava(hf_folder(tmp_path, pinpoints))
    name = case.removeprefix("spatial_unpad.")
    torch.testing.assert_close(last_logits(loaded, name), REF[f"{pinpoints}.{case}"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("merge, name", MERGE_CASES)
def test_flat_and_spatial_merges_match_the_original(model, merge, name):
    config = LLaVAConfig(**{**model.config.__dict__, "patch_merge_type": merge})
    merged = LLaVA(config).eval()  # the same weights, no image_newline
    merged.load_state_dict({k: v for k, v in model.state_dict().items() if k != "image_newline"})
    torch.testing.assert_close(last_logits(merged, name), REF[f"a.{merge}.{name}"], atol=1e-4, rtol=0)


def test_tile_count_that_does_not_fit_image_sizes_is_named(model):
    pixels, sizes = inference.image_input(model, image_path("wide.png"))
    with pytest.raises(ValueError, match=r"5 tiles in pixel_values, 4 for image_sizes \[\(120, 8\)\]"):
        model.embed(torch.tensor([[1, 2]]), torch.cat([pixels, pixels[:1]]), sizes)


def test_own_format_keeps_the_anyres_settings_and_image_newline(model, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded = LLaVA.from_pretrained(tmp_path)
    assert reloaded.config == model.config and torch.equal(reloaded.image_newline, model.image_newline)
    torch.testing.assert_close(last_logits(reloaded, "big.png"), REF["a.spatial_unpad.big.png"], atol=1e-4, rtol=0)


def test_from_parts_gives_a_fresh_image_newline(model):
    built = LLaVA.from_parts(model.llm, model.vision_tower, image_aspect_ratio="anyres",
                             image_grid_pinpoints=[[12, 24]], patch_merge_type="spatial_unpad")
    assert not built.image_newline.is_meta and built.image_newline.shape == (24,)
    assert 0.05 < built.image_newline.std() < 0.5  # the original's init: std 1 / sqrt(24) = 0.2


# ---------------------------------------------------------------------------------------- the original layout

def write_original_release(folder, tmp_path, as_string=False):
    """The fixture's weights as liuhaotian/llava-v1.6-vicuna-7b stores them (tower inside, model.image_newline), its
    config a LLaMA config with mm_* fields and (width, height) pinpoints; the tower's config in a CLIP folder."""
    hf = json.load(open(os.path.join(folder, "config.json")))
    renames = [("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
               ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
               ("multi_modal_projector.linear_2.", "model.mm_projector.2."), ("image_newline", "model.image_newline")]
    tensors = {}
    for key, value in load_file(os.path.join(folder, "model.safetensors")).items():
        old, new = next((old, new) for old, new in renames if key.startswith(old))
        tensors[new + key[len(old):]] = value
    out, clip = tmp_path / "original", tmp_path / "clip"
    os.makedirs(out), os.makedirs(clip)
    save_file(tensors, str(out / "model.safetensors"))
    grid = [[w, h] for h, w in hf["image_grid_pinpoints"]]
    config = {**hf["text_config"], "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
              "mm_hidden_size": 16, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres", "mm_use_im_start_end": False,
              "image_grid_pinpoints": str([tuple(p) for p in grid]) if as_string else grid}
    (out / "config.json").write_text(json.dumps(config))
    (clip / "config.json").write_text(json.dumps(hf["vision_config"]))
    return out, clip


@pytest.mark.parametrize("pinpoints, case", [("a", "spatial_unpad.wide.png"), ("a", "spatial_unpad.portrait.png"),
                                             ("b", "spatial_unpad.tall.png"), ("b", "spatial_unpad.big.png")])
def test_logits_match_llava_next_from_the_original_layout(tmp_path, pinpoints, case):
    folder, clip = write_original_release(hf_folder(tmp_path, pinpoints), tmp_path)
    loaded = formats.load_llava(folder, vision_tower=str(clip))
    assert loaded.config.image_grid_pinpoints == META["pinpoints"][pinpoints]  # (width, height) as written
    name = case.removeprefix("spatial_unpad.")
    torch.testing.assert_close(last_logits(loaded, name), REF[f"{pinpoints}.{case}"], atol=1e-4, rtol=0)


def test_original_pinpoints_written_as_a_string_are_read(tmp_path):
    folder, clip = write_original_release(HF_DIR, tmp_path, as_string=True)  # "[(12, 24), (24, 12), ...]"
    assert formats.load_llava(folder, vision_tower=str(clip)).config.image_grid_pinpoints == META["pinpoints"]["a"]
    with pytest.raises(ValueError, match=r"config\.json: image_grid_pinpoints='\(1x1\),\(2x2\)' is not a list"):
        formats.original_config({"image_grid_pinpoints": "(1x1),(2x2)"}, {}, "config.json")


def test_original_merge_type_it_cannot_do_is_refused_naming_the_file(tmp_path):
    folder, _ = write_original_release(HF_DIR, tmp_path)
    with pytest.raises(ValueError, match=r"config\.json: mm_patch_merge_type='unpad_max' is not supported"):
        formats.original_config({**json.load(open(folder / "config.json")), "mm_patch_merge_type": "unpad_max"}, {},
                                str(folder / "config.json"))


def test_transformers_module_names_load_too(model, tmp_path):
    renames = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower.vision_model."),
               ("multi_modal_projector.", "model.multi_modal_projector."), ("image_newline", "model.image_newline")]
    tensors = {}
    for key, value in load_file(os.path.join(HF_DIR, "model.safetensors")).items():
        old, new = next((old, new) for old, new in renames if key.startswith(old))
        tensors[new + key[len(old):]] = value
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(HF_DIR, "config.json"), tmp_path / "config.json")
    loaded = formats.load_llava(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------------- engine

def test_prompt_and_greedy_answer_equal_transformers_generate(model):
    tokenizer, path = Tokenizer(TOKENIZER), image_path(META["answer_image"])
    ids = inference.prompt_ids(model, tokenizer, META["question"], path)
    assert ids == REF["answer_ids"].masked_fill(REF["answer_ids"] == 512, IMAGE_TOKEN_INDEX)[0].tolist()
    greedy = REF["answer_greedy"][0].tolist()
    assert inference.answer(model, tokenizer, META["question"], path, max_new_tokens=len(greedy)) == \
        tokenizer.decode(greedy).strip()
    model.llm.setup_cache(1, len(ids) + len(greedy))
    tokens = list(inference.generate_llava(model, torch.tensor([ids]), *inference.image_input(model, path),
                                           max_new_tokens=len(greedy)))
    model.llm.reset_cache()
    assert tokens == greedy


def test_batched_answers_over_images_of_different_sizes_equal_single_answers(model):
    tokenizer = Tokenizer(TOKENIZER)
    items = [{"text": "What is it?", "image_path": image_path(name)} for name in ("wide.png", "tall.png", "big.png")]
    items.append({"text": "Describe a circle."})  # no image
    batched = [reply for batch in inference.answer_batches(model, tokenizer, items, 8, batch_size=4)
               for _, reply in batch]
    assert len({len(inference.prompt_ids(model, tokenizer, i["text"], i.get("image_path"))) for i in items}) == 4
    assert sorted(batched) == sorted(inference.answer(model, tokenizer, i["text"], i.get("image_path"), 8)
                                     for i in items)


def test_chat_about_an_anyres_image_answers_as_the_engine():
    model, tokenizer, path = formats.load_llava(HF_DIR), Tokenizer(TOKENIZER), image_path("tall.png")
    expected = inference.answer(model, tokenizer, "What is it?", path, 8)  # before the session: answer frees the cache
    session = chat.ChatSession(model, tokenizer, "vicuna_v1", max_new_tokens=8)
    session.set_image(path)
    first = session.reply("What is it?", out=io.StringIO())
    assert first == expected
    second = session.reply("And the colour?", out=io.StringIO())  # reuses the cached image rows
    conversation = [{"from": "human", "value": with_image("What is it?")}, {"from": "gpt", "value": first},
                    {"from": "human", "value": "And the colour?"}]
    ids, _ = render(conversation, "vicuna_v1", tokenizer, [model.config.image_tokens((7, 112))], for_generation=True)
    model.llm.setup_cache(1, len(ids) + 8)  # the whole conversation afresh
    tokens = list(inference.generate_llava(model, torch.tensor([ids]), *inference.image_input(model, path),
                                           max_new_tokens=8, eos_id=tokenizer.eos_id))
    assert second == inference.reply_text(tokenizer, tokens)


# --------------------------------------------------------------------------------------------------- export

def test_export_writes_a_llava_next_folder_that_reloads_to_the_reference(tmp_path):
    source = formats.load_llava(hf_folder(tmp_path, "b"))
    formats.export_hf(source, tmp_path / "out", tokenizer=TOKENIZER)
    config = json.load(open(tmp_path / "out" / "config.json"))
    b = json.load(open(os.path.join(REF_DIR, "config_b.json")))
    assert (config["model_type"], config["architectures"]) == ("llava_next", ["LlavaNextForConditionalGeneration"])
    assert config["image_grid_pinpoints"] == b["image_grid_pinpoints"]  # (height, width) again
    processor = json.load(open(tmp_path / "out" / "preprocessor_config.json"))
    assert processor["image_processor_type"] == "LlavaNextImageProcessor"
    assert processor["image_grid_pinpoints"] == b["image_grid_pinpoints"]
    assert json.load(open(tmp_path / "out" / "processor_config.json"))["processor_class"] == "LlavaNextProcessor"
    reloaded = formats.load_llava(tmp_path / "out")
    assert reloaded.config == source.config
    torch.testing.assert_close(last_logits(reloaded, "tall.png"), REF["b.spatial_unpad.tall.png"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("merge", ["flat", "spatial"])
def test_export_refuses_merges_llava_next_does_not_have(model, tmp_path, merge):
    other = LLaVA(LLaVAConfig(**{**model.config.__dict__, "patch_merge_type": merge}))
    with pytest.raises(ValueError, match=f"only as 'spatial_unpad', this model has patch_merge_type '{merge}'"):
        formats.export_hf(other, tmp_path)
    assert os.listdir(tmp_path) == []


def test_exported_folder_answers_alone_in_transformers(model, tmp_path):
    """Runs where transformers is installed: AutoProcessor renders the chat, cuts the tiles and counts the image
    tokens as we do, and LlavaNextForConditionalGeneration gives our logits and greedy tokens."""
    transformers = pytest.importorskip("transformers")
    tokenizer, path = Tokenizer(TOKENIZER), image_path("wide.png")
    formats.export_hf(model, tmp_path, tokenizer=TOKENIZER)
    processor = transformers.AutoProcessor.from_pretrained(tmp_path)
    theirs = transformers.LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    inputs = processor(text=processor.apply_chat_template(chat, add_generation_prompt=True),
                       images=Image.open(path).convert("RGB"), return_tensors="pt")
    ids = inference.prompt_ids(model, tokenizer, "What is it?", path)
    assert inputs["input_ids"].masked_fill(inputs["input_ids"] == 512, IMAGE_TOKEN_INDEX)[0].tolist() == ids
    pixels, sizes = inference.image_input(model, path)
    assert torch.equal(inputs["pixel_values"][0], pixels) and inputs["image_sizes"][0].tolist() == [8, 120]
    with torch.no_grad():
        want = model(torch.tensor([ids]), pixels, image_sizes=sizes)[0]
        got = theirs(**inputs).logits[..., :512]
        greedy = theirs.generate(**inputs, max_new_tokens=8, do_sample=False)[0, len(ids):]
    torch.testing.assert_close(got, want[..., :512], atol=1e-4, rtol=0)
    model.llm.setup_cache(1, len(ids) + 8)
    assert list(inference.generate_llava(model, torch.tensor([ids]), pixels, sizes, max_new_tokens=8)) == \
        greedy.tolist()
    model.llm.reset_cache()


def test_a_llava_hf_folder_named_for_mistral_chats_in_mistral_instruct(tmp_path):
    folder = tmp_path / "llava-v1.6-mistral-7b-hf"  # serve/cli.py's name rule, as for the original layout
    shutil.copytree(HF_DIR, folder)
    assert formats.load_llava(str(folder)).config.template == "mistral_instruct"
    assert formats.load_llava(HF_DIR).config.template == "vicuna_v1"
