"""Every checkpoint layout that is not a model file's own, mapped onto ours: key renames, config maps, nothing else.

  llava-original  the haotian-liu/LLaVA release (liuhaotian/llava-v1.5-7b): a LLaMA config.json with "mm_*" fields,
                  keys model.* / lm_head.weight / model.mm_projector.*, safetensors or pickle .bin shards, and no CLIP
                  weights (the tower comes from `vision_tower=`, a CLIP folder); its stage-1 output mm_projector.bin
  llava-hf        transformers' LlavaForConditionalGeneration (llava-hf/llava-1.5-7b-hf) and, for LLaVA-1.6 ("anyres"),
                  LlavaNextForConditionalGeneration (llava-hf/llava-v1.6-vicuna-7b-hf), old and new key names; and
                  export_hf, which writes one that transformers' AutoProcessor and model load from the folder alone
  clip            full CLIPModel checkpoints (openai/clip-vit-large-patch14-336: the text tower is never read), the
                  transformers-5 CLIPVisionModel without "vision_model.", pickle pytorch_model.bin
detect_format(path) names a checkpoint folder's layout, one of FORMATS; load_llava, load_clip and load_projector read
a folder of any of them (the own layouts through LLaVA.from_pretrained and CLIPVisionTower.from_pretrained). Pickle
files go through torch.load(weights_only=True): tensors only, never code.
"""
import argparse
import ast
import json
import os
import pickle
import sys

import torch

from checkpoint import load_checkpoint, load_strict, read_index, write_output
from clip import CLIP_MEAN, CLIP_STD, CLIPVisionConfig, CLIPVisionTower, tower_to_clip_keys
from data import IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKEN, TEMPLATES
from fileio import read_json, save_tensors, write_bytes, write_json
from llava import FORMAT as OWN, MERGE_TYPES, LLaVA, LLaVAConfig
from tokenizer import FILES as TOKENIZER_FILES, Tokenizer

FORMATS = (OWN, "llava-hf", "llava-original", "llama", "clip")
# transformers fills fields missing from a sub-config with its class defaults; llava-1.5-7b-hf relies on that
LLAMA_HF_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6)
SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}  # ours -> llava-hf vision_feature_select_strategy
# llava-hf model_type -> (model, processor, image processor) classes that export_hf names
LLAVA_HF_CLASSES = {"llava": ("LlavaForConditionalGeneration", "LlavaProcessor", "LlavaImageProcessor"),
                    "llava_next": ("LlavaNextForConditionalGeneration", "LlavaNextProcessor",
                                   "LlavaNextImageProcessor")}
# read by nobody: the CLIP text tower and contrastive heads, and the position_ids buffer (positions are 0..N)
CLIP_SKIPPED = ("text_model.", "visual_projection.", "text_projection.", "logit_scale",
                "vision_model.embeddings.position_ids", "embeddings.position_ids")


def detect_format(path) -> str:
    """The layout of a checkpoint folder, from its config.json: one of FORMATS."""
    file = os.path.join(path, "config.json")
    d = read_json(file)
    if not isinstance(d, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(d).__name__}")
    kind, architectures = d.get("model_type"), d.get("architectures") or []
    if d.get("format") == OWN:
        return OWN
    if "mm_vision_tower" in d or "mm_projector_type" in d:
        return "llava-original"
    if kind in ("clip", "clip_vision_model"):  # a full CLIPModel has a text_config too
        return "clip"
    if "text_config" in d or kind in ("llava", "llava_next") or "LlavaForConditionalGeneration" in architectures:
        return "llava-hf"
    if kind == "llama" or "LlamaForCausalLM" in architectures:
        return "llama"
    raise ValueError(f"{file}: not a LLaVA, LLaMA or CLIP checkpoint (model_type {kind!r}); known: {FORMATS}")


# ------------------------------------------------------------------------------------------------ reading tensors

def read_bin(file, device="cpu", skip=lambda key: False) -> dict:
    """A pickle checkpoint: only a flat {name: tensor} dict is accepted, and torch.load never runs code from it.
    A pickle cannot be read in part: on the meta device it is read whole, to the CPU."""
    try:
        sd = torch.load(file, map_location="cpu" if str(device) == "meta" else device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        reason = (str(e).split("WeightsUnpickler error:")[-1].strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{file}: not a pickle of tensors that loads with weights_only=True ({reason})") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{file}: holds a {type(sd).__name__}, expected a dict of tensors")
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{file}: key {key!r} holds a {type(value).__name__}, not a tensor")
    return {k: v for k, v in sd.items() if not skip(k)}


def read_tensors(path, device="cpu", skip=lambda key: False):
    """(tensors, {key: file}) from safetensors, single or sharded, else from pickle pytorch_model.bin (or shards)."""
    path = os.fspath(path)
    names = set(os.listdir(path)) if os.path.isdir(path) else set()
    safetensors = names & {"model.safetensors", "model.safetensors.index.json"}
    pickles = names & {"pytorch_model.bin", "pytorch_model.bin.index.json"}
    if path.endswith(".bin") or pickles and not safetensors:
        return load_checkpoint(path, device, skip, single="pytorch_model.bin", read=read_bin)
    return load_checkpoint(path, device, skip)


# ------------------------------------------------------------------------------------------------------------ CLIP

def clip_vision_config(d: dict) -> dict:
    return d.get("vision_config", d) if isinstance(d, dict) else d  # a full CLIPModel config nests the vision part


def clip_model_to_tower_keys(sd: dict) -> dict:
    """Published ("vision_model.x") or transformers-5 ("x") names -> tower names ("x"). Inverse: tower_to_clip_keys."""
    out = {}
    for key, value in sd.items():
        name = key.removeprefix("vision_model.")
        if name in out:
            raise KeyError(f"tensor '{name}' appears both with and without the 'vision_model.' prefix")
        out[name] = value
    return out


def is_clip_skipped(key: str) -> bool:
    return key.startswith(CLIP_SKIPPED)


def load_clip(path, device="cpu", dtype=torch.float32) -> CLIPVisionTower:
    """Any CLIP folder: CLIPVisionModel (published or transformers-5 names) or a full CLIPModel, safetensors or .bin."""
    config_file = os.path.join(path, "config.json")
    config = CLIPVisionConfig.from_hf(clip_vision_config(read_json(config_file)), config_file)
    with torch.device("meta"):  # no memory until the checkpoint tensors are assigned
        model = CLIPVisionTower(config)
    tensors, files = read_tensors(path, device, skip=is_clip_skipped)
    return load_strict(model, tensors, files, clip_model_to_tower_keys, tower_to_clip_keys, device, dtype).eval()


# ----------------------------------------------------------------------------------------------------------- LLaVA
# (file prefix, our prefix); first match wins. transformers >= 4.52 adds "model." before the first three parts
# and writes "lm_head." at the top; transformers 5 drops "vision_model." from the tower.
HF_PREFIXES = [("language_model.model.", "llm."), ("language_model.lm_head.", "llm.lm_head."),
               ("language_model.", "llm."), ("lm_head.", "llm.lm_head."),
               ("vision_tower.vision_model.", "vision_tower."), ("vision_tower.", "vision_tower."),
               ("multi_modal_projector.linear_1.", "projector.0."),
               ("multi_modal_projector.linear_2.", "projector.2.")]
HF_PUBLISHED = [("llm.lm_head.", "language_model.lm_head."), ("llm.", "language_model.model."),  # llava-1.5-*-hf
                ("vision_tower.", "vision_tower.vision_model."), ("projector.0.", "multi_modal_projector.linear_1."),
                ("projector.2.", "multi_modal_projector.linear_2.")]
ORIGINAL_PREFIXES = [("model.image_newline", "image_newline"), ("model.mm_projector.", "projector."),
                     ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
                     ("model.", "llm."), ("lm_head.", "llm.lm_head.")]
ORIGINAL_PUBLISHED = [("image_newline", "model.image_newline"), ("projector.", "model.mm_projector."),
                      ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
                      ("llm.lm_head.", "lm_head."), ("llm.", "model.")]


def rename(key, prefixes):
    for old, new in prefixes:
        if key.startswith(old):
            return new + key[len(old):]
    return key  # unknown: left as is, so the strict check reports it by its own name


def hf_to_llava_keys(sd: dict) -> dict:
    new = ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.", "model.image_newline")
    return {rename(k.removeprefix("model.") if k.startswith(new) else k, HF_PREFIXES): v for k, v in sd.items()}


def llava_to_hf_keys(sd: dict) -> dict:
    return {rename(k, HF_PUBLISHED): v for k, v in sd.items()}


def original_to_llava_keys(sd: dict) -> dict:
    return {rename(k, ORIGINAL_PREFIXES): v for k, v in sd.items()}


def llava_to_original_keys(sd: dict) -> dict:
    return {rename(k, ORIGINAL_PUBLISHED): v for k, v in sd.items()}


def llava_hf_config(d: dict, source="config.json", do_pad=True) -> dict:
    """llava-hf config.json -> our config dict (LLaVAConfig.to_dict's layout). do_pad: preprocessor_config.json's."""
    for key, allowed in [("projector_hidden_act", "gelu"), ("multimodal_projector_bias", True)]:
        if d.get(key, allowed) != allowed:
            raise ValueError(f"{source}: {key}={d[key]!r} is not supported (only {allowed!r})")
    layer, strategy = d.get("vision_feature_layer", -2), d.get("vision_feature_select_strategy", "default")
    if type(layer) is not int or strategy not in SELECT_STRATEGY.values():
        raise ValueError(f"{source}: vision_feature_layer={layer!r} / select strategy {strategy!r} not supported "
                         f"(one layer; 'default' or 'full')")
    vision = d.get("vision_config") or CLIPVisionConfig.from_name("vit-l-14-336").to_hf()  # LlavaConfig's default
    return {"format": OWN, "llm": {**LLAMA_HF_DEFAULTS, **d.get("text_config", {})}, "vision": vision,
            "projector_type": "mlp2x_gelu", "select_layer": layer,
            "select_feature": {v: k for k, v in SELECT_STRATEGY.items()}[strategy],
            "image_aspect_ratio": "pad" if do_pad else "square", "image_token_index": d.get("image_token_index", 32000),
            **(llava_next_settings(d, source) if d.get("model_type") == "llava_next" else {})}


# LLaVA-1.6 in llava-hf's layout: always the "spatial_unpad" merge with image_newline (the only one transformers has),
# and image_grid_pinpoints as (height, width), where the original and our config write (width, height)
def llava_next_settings(d: dict, source="config.json") -> dict:
    """A LlavaNext config.json's anyres fields -> ours (pinpoints swapped to (width, height))."""
    pinpoints = d.get("image_grid_pinpoints", [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
    if not isinstance(pinpoints, list) or not all(isinstance(p, list) and len(p) == 2 for p in pinpoints):
        raise ValueError(f"{source}: image_grid_pinpoints={pinpoints!r} is not a list of [height, width]")
    return {"image_aspect_ratio": "anyres", "image_grid_pinpoints": [[w, h] for h, w in pinpoints],
            "patch_merge_type": "spatial_unpad"}


def llava_to_hf_config(c: dict, vocab_size: int, image_token: int, dtype: str) -> dict:
    """Our config dict -> llava-hf config.json (LlavaNext for anyres), with the (padded) vocabulary size. Inverse:
    llava_hf_config."""
    vision = {k: v for k, v in c["vision"].items() if k != "architectures"}
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + (c["select_feature"] == "cls_patch")
    if c["image_aspect_ratio"] == "anyres":
        kind, extra = "llava_next", {"image_grid_pinpoints": [[h, w] for w, h in c["image_grid_pinpoints"]]}
    else:
        kind, extra = "llava", {"image_seq_length": tokens}
    return {"architectures": [LLAVA_HF_CLASSES[kind][0]], "model_type": kind, **extra,
            "text_config": {**c["llm"], "vocab_size": vocab_size}, "vision_config": vision,
            "image_token_index": image_token, "projector_hidden_act": "gelu",
            "vision_feature_layer": c["select_layer"],
            "vision_feature_select_strategy": SELECT_STRATEGY[c["select_feature"]], "multimodal_projector_bias": True,
            "tie_word_embeddings": c["llm"].get("tie_word_embeddings", False), "torch_dtype": dtype}


def original_config(d: dict, vision: dict, source="config.json") -> dict:
    """The original release's config.json (a LLaMA config with "mm_*" fields) + its tower's -> our config dict.
    v0 (the paper's release: use_mm_proj, a linear projector, no mm_projector_type) also has mm_use_im_start_end."""
    for key, allowed in [("sep_image_conv_front", False)]:
        if d.get(key, allowed) != allowed:
            raise ValueError(f"{source}: {key}={d[key]!r} is not supported (only {allowed!r})")
    if "mm_hidden_size" in d and d["mm_hidden_size"] != vision.get("hidden_size", d["mm_hidden_size"]):
        raise ValueError(f"{source}: mm_hidden_size={d['mm_hidden_size']!r}, but the vision tower's hidden_size is "
                         f"{vision['hidden_size']}")
    return {"format": OWN, "llm": {**d, "model_type": "llama"}, "vision": vision,
            "projector_type": d.get("mm_projector_type", "linear"), "select_layer": d.get("mm_vision_select_layer", -2),
            "select_feature": d.get("mm_vision_select_feature", "patch"),
            "image_aspect_ratio": d.get("image_aspect_ratio", "square"),
            "mm_use_im_start_end": d.get("mm_use_im_start_end", False), **original_anyres_settings(d, source)}


def name_template(path):
    """The template the original's CLI (serve/cli.py) picks by the model's name (the folder, or parent_checkpoint-N)
    for the families trained with their own: llava_llama_2, mistral_instruct or chatml_direct when the name says
    "llama-2", "mistral" or "v1.6-34b" (llava-hf's llava-v1.6-34b-hf too); else None."""
    rules = (("llama-2", "llava_llama_2"), ("mistral", "mistral_instruct"), ("v1.6-34b", "chatml_direct"))
    return next((template for word, template in rules if word in model_name(path)), None)


def model_name(path) -> str:
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    return (f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") else parts[-1]).lower()


def original_template(path, d: dict) -> str:
    """The template for an original release: name_template's, else, by the same CLI rule, llava_v0 unless the name
    says "v1" or "mpt". Releases from LLaVA-1.5 on (their config names mm_projector_type) and "v1" names get
    vicuna_v1, the template LLaVA-1.5 was trained and evaluated with (the CLI's llava_v1 differs only in its system
    prompt's "human" for "user")."""
    later = "v1" in model_name(path) or "mpt" in model_name(path) or "mm_projector_type" in d
    return name_template(path) or ("vicuna_v1" if later else "llava_v0")


def original_anyres_settings(d: dict, source="config.json") -> dict:
    """LLaVA-1.6's mm_patch_merge_type and image_grid_pinpoints ((width, height) pairs, as ours; the training
    scripts stored them as a string, which is read as a Python literal, as the original reads it)."""
    merge, pinpoints = d.get("mm_patch_merge_type", "flat"), d.get("image_grid_pinpoints")
    if merge not in MERGE_TYPES:
        raise ValueError(f"{source}: mm_patch_merge_type={merge!r} is not supported (known: {', '.join(MERGE_TYPES)})")
    if isinstance(pinpoints, str):
        try:
            pinpoints = [list(pair) for pair in ast.literal_eval(pinpoints)]  # literals only: never runs code
        except (ValueError, TypeError, SyntaxError):
            raise ValueError(f"{source}: image_grid_pinpoints={pinpoints!r} is not a list of [width, height]") from None
    return {"patch_merge_type": merge, "image_grid_pinpoints": pinpoints}


def load_llava(path, vision_tower=None, device="cpu", dtype=torch.float32) -> LLaVA:
    """A LLaVA checkpoint folder in any layout: ours (LLaVA.from_pretrained), llava-hf, or the original release, whose
    CLIP tower comes from `vision_tower` (a CLIP folder; default: the folder its config names, if it is local)."""
    config_file, kind = os.path.join(path, "config.json"), detect_format(path)
    if kind == OWN:
        model = LLaVA.from_pretrained(path, device, dtype)
        model.source_path = path  # export_hf copies the tokenizer from here
        return model
    d = read_json(config_file)
    if kind == "llava-hf":
        processor = os.path.join(path, "preprocessor_config.json")
        do_pad = read_json(processor).get("do_pad", True) if os.path.exists(processor) else True
        config, keys = llava_hf_config(d, config_file, do_pad), (hf_to_llava_keys, llava_to_hf_keys)
        config["template"] = name_template(path) or config.get("template", "vicuna_v1")
        tensors, files = read_tensors(path, device)
    elif kind == "llava-original":
        vision_tower = vision_tower or d.get("mm_vision_tower")  # a hub id in released configs, or a folder
        if not vision_tower or not os.path.isfile(os.path.join(vision_tower, "config.json")):
            raise FileNotFoundError(f"{path}: the original LLaVA release has no vision tower weights; pass "
                                    f"vision_tower=<local folder of {d.get('mm_vision_tower')}> (a CLIP checkpoint)")
        tensors, files = read_tensors(path, device, skip=lambda key: "rotary_emb.inv_freq" in key)  # transformers 4.31
        if not any(k.startswith("model.vision_tower.") for k in tensors):  # the release ships no tower weights
            tower, tower_files = read_tensors(vision_tower, device, skip=is_clip_skipped)
            in_file = clip_model_to_tower_keys({k: k for k in tower})  # tower name -> key in the CLIP file
            names = llava_to_original_keys({"vision_tower." + k: v for k, v in in_file.items()})
            tensors.update({name: tower[k] for name, k in names.items()})
            files.update({name: tower_files[k] for name, k in names.items()})
        vision = clip_vision_config(read_json(os.path.join(vision_tower, "config.json")))
        config = {**original_config(d, vision, config_file), "template": original_template(path, d)}
        keys = (original_to_llava_keys, llava_to_original_keys)
    else:
        raise ValueError(f"{config_file}: a {kind} checkpoint, not LLaVA (base checkpoints: LLaVA.from_parts)")
    with torch.device("meta"):  # no memory until the checkpoint tensors are assigned
        model = LLaVA(LLaVAConfig.from_dict(config, config_file))
    model.source_path = path  # export_hf copies the tokenizer from here
    return load_strict(model, tensors, files, *keys, device=device, dtype=dtype).eval()


def load_projector(model, path) -> None:
    """A stage-1 output folder into model.projector, strictly: ours (LLaVA.save_projector: projector.safetensors and
    config.json) or the original release's mm_projector.bin."""
    own, original = os.path.join(path, "projector.safetensors"), os.path.join(path, "mm_projector.bin")
    w = next(model.projector.parameters())  # the projector's device and dtype
    if os.path.isfile(own):
        config_file = os.path.join(path, "config.json")
        if (saved := read_json(config_file).get("projector_type")) != model.config.projector_type:
            raise ValueError(f"{config_file}: projector_type {saved!r}, the model has {model.config.projector_type!r}")
        (tensors, files), to_ours, to_file = load_checkpoint(own, w.device), (lambda sd: sd), (lambda sd: sd)
    elif os.path.isfile(original):
        tensors, files = load_checkpoint(original, w.device, read=read_bin)
        to_ours, to_file = original_to_llava_keys, llava_to_original_keys
    else:
        raise FileNotFoundError(f"{path}: no projector.safetensors or mm_projector.bin")
    to_projector = lambda sd: {k.removeprefix("projector."): v for k, v in to_ours(sd).items()}  # noqa: E731
    load_strict(model.projector, tensors, files, to_projector,
                lambda sd: to_file({"projector." + k: v for k, v in sd.items()}), device=w.device, dtype=w.dtype)


# ------------------------------------------------------------------------------------------------- v0 deltas
# The paper's weights (LLaVA-13b-delta-v0, LLaVA-7b-delta-v0, LLaVA-13b-delta-v0-science_qa) were released as
# differences to LLaMA: the original's llava/model/apply_delta.py adds the base to every shared tensor.
GROWN = ("model.embed_tokens.weight", "lm_head.weight")  # rows added for <im_patch>, <im_start>, <im_end>


def tensor_shards(path) -> list:
    """A checkpoint folder's tensor files, in order, and the reader of each (safetensors first, as read_tensors)."""
    names = set(os.listdir(path))
    pickles = not names & {"model.safetensors", "model.safetensors.index.json"}
    single = "pytorch_model.bin" if pickles else "model.safetensors"
    index = os.path.join(path, single + ".index.json")
    shards = sorted(set(read_index(index).values())) if os.path.isfile(index) else [os.path.join(path, single)]
    for shard in shards:
        if not os.path.isfile(shard):
            raise FileNotFoundError(f"{path}: no {os.path.basename(shard)} (nor {single}.index.json)")
    return [(shard, read_bin if pickles else None) for shard in shards]


def add_delta(key, delta, base, source) -> torch.Tensor:
    """delta + base in the delta's dtype (the base is cast to it first, as the original loads both in float16): one
    rounding, as the original's in-place add. A grown table keeps the delta's own extra rows."""
    if base.shape != delta.shape and not (key in GROWN and base.dim() == 2 and base.shape[1] == delta.shape[1]
                                          and base.shape[0] < delta.shape[0]):
        raise ValueError(f"{source}: {key!r} has shape {tuple(delta.shape)} in the delta but {tuple(base.shape)} in "
                         "the base: a delta made against another model?")
    out = delta.clone()
    out[:base.shape[0]] = (delta[:base.shape[0]].float() + base.to(delta.dtype).float()).to(delta.dtype)
    return out


def apply_delta(base, delta, out, vision_tower=None) -> None:
    """Write base + delta to `out`, as the original's apply_delta: every tensor of the delta plus the base's tensor
    of the same name; embed_tokens / lm_head with more rows than the base's: the first rows plus the base, the extra
    rows (the added tokens) the delta's own; tensors only in the delta (model.mm_projector.*) copied. One delta shard
    at a time, each written as a safetensors shard (a pickle base is read whole, safetensors only tensor by tensor);
    with the delta's config.json and tokenizer files. Files appear in `out` only once all are written.
    vision_tower: a local CLIP folder written as mm_vision_tower (the release names a hub id), so that every command
    loads the result without --vision-tower."""
    base_tensors, base_files = read_tensors(base, "meta", skip=lambda key: "rotary_emb.inv_freq" in key)
    shards, seen = tensor_shards(delta), set()
    config = read_json(os.path.join(delta, "config.json"))  # read first: a wrong folder is found before any work
    if vision_tower is not None:
        if not os.path.isfile(os.path.join(vision_tower, "config.json")):
            raise FileNotFoundError(f"{vision_tower}: no config.json (a CLIP checkpoint folder is needed)")
        config["mm_vision_tower"] = os.path.abspath(vision_tower)
    if not os.path.isfile(os.path.join(delta, "tokenizer.model")):
        raise FileNotFoundError(f"{delta}: no tokenizer.model (the delta's tokenizer has its added tokens)")
    # LLaVA-13b-delta-v0-science_qa has no added_tokens.json: the original's loaders add <im_patch>, <im_start> and
    # <im_end> after the pieces, in this order (as its training did), when the config has mm_use_im_start_end
    added, pieces = None, Tokenizer(delta).vocab_size
    if config.get("mm_use_im_start_end") and not os.path.isfile(os.path.join(delta, "added_tokens.json")):
        if pieces + 3 <= config.get("vocab_size", 0):  # the embedding rows they index
            added = {token: pieces + k for k, token in enumerate(("<im_patch>", IM_START_TOKEN, IM_END_TOKEN))}

    def write(folder):
        weight_map = {}
        for n, (shard, read) in enumerate(shards, 1):
            tensors, _ = load_checkpoint(shard, read=read, skip=lambda key: "rotary_emb.inv_freq" in key)
            for key, value in tensors.items():
                if key in base_tensors:
                    found = base_tensors[key]
                    tensors[key] = add_delta(key, value, found if torch.is_tensor(found) else found[:], shard)
                elif not key.startswith("model.mm_projector."):
                    raise ValueError(f"{shard}: {key!r} is in the delta but not in the base {base}")
            name = "model.safetensors" if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_tensors(os.path.join(folder, name), {k: v.contiguous() for k, v in tensors.items()})
            weight_map.update(dict.fromkeys(tensors, name))
            seen.update(tensors)
            del tensors
        if missing := sorted(set(base_tensors) - seen):
            raise ValueError(f"{base_files[missing[0]]}: {missing[0]!r} of the base is not in the delta {delta}")
        if len(shards) > 1:
            write_json(os.path.join(folder, "model.safetensors.index.json"), {"metadata": {}, "weight_map": weight_map})
        write_json(os.path.join(folder, "config.json"), config)
        if added:
            write_json(os.path.join(folder, "added_tokens.json"), added)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(delta, name)):
                with open(os.path.join(delta, name), "rb") as f:
                    write_bytes(os.path.join(folder, name), f.read())

    write_output(out, write, sum(os.path.getsize(shard) for shard, _ in shards))


# ------------------------------------------------------------------------------------------- export to llava-hf

# Chat templates: jinja that renders a chat as data.render does the same conversation (its text, with <image>, <s>
# and </s> spelled out), one per template style, with the template's system prompt as the default system message.
# The leading <s> is left to the tokenizer (add_bos_token), as in llava-1.5-hf. A user message's images and text
# become LLaVA's "value" ("<image>\n" + text), and an image moves to the front as data.move_image_to_front does.
CHAT_MESSAGE = (
    "{%- macro text(message) -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}"
    "{%- endif -%}{%- endmacro -%}"
    "{%- macro question(message) -%}"
    "{%- set images = [] if message['content'] is string "
    "else message['content'] | selectattr('type', 'equalto', 'image') | list -%}"
    "{%- set value = ('<image>\n' if images else '') + text(message) -%}"
    "{%- if '<image>' in value -%}{{ ('<image>\n' + (value | replace('<image>', '') | trim)) | trim }}"
    "{%- else -%}{{ value }}{%- endif -%}{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = text(messages[0]) -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = DEFAULT_SYSTEM -%}{%- set turns = messages -%}{%- endif -%}")
CHAT_TEMPLATES = {  # by data.Template.style
    # "SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: ... ASSISTANT:" (vicuna_v1, llava_v1)
    "two": (
        "{{ system + ' ' }}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}{{ 'USER: ' + question(message) + ' ' }}"
        "{%- else -%}{{ 'ASSISTANT: ' + text(message) + eos_token }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"),
    # "[INST] <<SYS>>\nSYSTEM\n<</SYS>>\n\n<image>\nQ [/INST] A </s><s>[INST] ... [/INST]" (llama_2, llava_llama_2;
    # mistral_instruct: no system prompt, no <s> between rounds)
    "llama_2": (
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ (bos_token if not loop.first and ROUNDS_BOS else '') + '[INST] ' }}"
        "{%- if loop.first and system -%}{{ '<<SYS>>\n' + system + '\n<</SYS>>\n\n' }}{%- endif -%}"
        "{{ question(message) + ' [/INST]' }}"
        "{%- else -%}{{ ' ' + text(message) + ' ' + eos_token }}{%- endif -%}"
        "{%- endfor -%}"),
    # stage 1: "<image>" + caption + "\n"; the instruction text and any system message are dropped
    "plain": (
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}{{ '<image>' }}{%- else -%}{{ text(message) + '\n' }}{%- endif -%}"
        "{%- endfor -%}"),
}


def chat_template(name: str) -> str:
    """The jinja chat template for data.py's conversation template `name`, or a ValueError naming it."""
    if name not in TEMPLATES:
        raise ValueError(f"conversation template {name!r} is unknown (known: {', '.join(TEMPLATES)}); cannot write "
                         "its chat template")
    template = TEMPLATES[name]
    if template.style not in CHAT_TEMPLATES:
        raise ValueError(f"conversation template {name!r} (style {template.style!r}) has no chat template")
    default = "{%- set DEFAULT_SYSTEM = " + json.dumps(template.system) + " -%}{%- set ROUNDS_BOS = " + \
        json.dumps(template.rounds_bos) + " -%}"
    return default + CHAT_MESSAGE + CHAT_TEMPLATES[template.style]


def image_processor_config(image_size: int, do_pad: bool, grid_pinpoints=None) -> dict:
    """preprocessor_config.json: the CLIP processor settings LLaVA used; do_pad = image_aspect_ratio "pad". With
    grid_pinpoints (ours, (width, height)): LlavaNextImageProcessor's, whose do_pad pads tile counts for batching."""
    S, kind = image_size, "llava" if grid_pinpoints is None else "llava_next"
    _, processor, image_processor = LLAVA_HF_CLASSES[kind]
    extra = {} if grid_pinpoints is None else {"image_grid_pinpoints": [[h, w] for w, h in grid_pinpoints]}
    return {"image_processor_type": image_processor, "processor_class": processor, "do_pad": do_pad, **extra,
            "do_resize": True, "size": {"shortest_edge": S}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": S, "width": S}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True}


def tokenizer_configs(tokenizer: Tokenizer, image_token: int, max_length: int, processor="LlavaProcessor") -> dict:
    """{file name: content} for transformers' LlamaTokenizer over the same tokenizer.model, <image> added at
    `image_token`: the first id after the sentencepiece pieces, as in llava-1.5-hf (32000 for Vicuna)."""
    if image_token != tokenizer.vocab_size:
        raise ValueError(f"the image token id {image_token} must be the first id after the tokenizer's "
                         f"{tokenizer.vocab_size} pieces, where transformers adds {IMAGE_TOKEN}")
    sp = tokenizer.sp
    special = {sp.unk_id(): "unk_token", tokenizer.bos_id: "bos_token", tokenizer.eos_id: "eos_token"}
    pieces = {i: sp.id_to_piece(i) for i in special} | {image_token: IMAGE_TOKEN}
    added = {str(i): {"content": piece, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, piece in sorted(pieces.items())}
    tokens = {name: pieces[i] for i, name in special.items()} | {"pad_token": sp.id_to_piece(tokenizer.pad_id)}
    return {
        # legacy: every chunk between special tokens starts a new word ("\n" after <image> -> "▁", "<0x0A>"), as
        # the original's slow LlamaTokenizer did; not legacy: none after a special token (data.py does both)
        "tokenizer_config.json": {"tokenizer_class": "LlamaTokenizer", "processor_class": processor,
                                  "added_tokens_decoder": added, **tokens, "add_bos_token": tokenizer.add_bos,
                                  "add_eos_token": False, "legacy": tokenizer.legacy,
                                  "clean_up_tokenization_spaces": False,
                                  "extra_special_tokens": {"image_token": IMAGE_TOKEN},
                                  "model_max_length": max_length, "padding_side": "left"},
        "special_tokens_map.json": tokens}


def export_hf(model, path, tokenizer=None) -> None:
    """`model` (a LLaVA) as a llava-hf folder that transformers' AutoProcessor and LlavaForConditionalGeneration
    (LlavaNextForConditionalGeneration for an anyres model) load from the folder alone: config.json,
    model.safetensors (the published llava-1.5-*-hf names), preprocessor_config.json, processor_config.json,
    chat_template.json, and, from `tokenizer` (a tokenizer.model or its folder; default: the folder the model was
    loaded from), tokenizer.model with tokenizer_config.json and special_tokens_map.json. The image token id is the
    remembered one (a model loaded from llava-hf), else the first id after the vocabulary. The vocabulary is padded
    to a multiple of 64 with rows equal to the mean row: the mean row's logit is the mean logit, so greedy decoding
    never picks a padding id."""
    c = model.config
    if any(name.endswith("weight_int8") for name, _ in model.named_buffers()):  # quantize.py's layers
        raise ValueError("int8 weights are for answering, not for export: export the float model, quantize on load")
    if c.projector_type != "mlp2x_gelu":
        raise ValueError(f"llava-hf has only the mlp2x_gelu projector, this model has {c.projector_type!r}")
    anyres = c.image_aspect_ratio == "anyres"
    if anyres and c.patch_merge_type != "spatial_unpad":
        raise ValueError(f"llava-hf's LlavaNext merges tiles only as 'spatial_unpad', this model has "
                         f"patch_merge_type {c.patch_merge_type!r}")
    _, processor, _ = LLAVA_HF_CLASSES["llava_next" if anyres else "llava"]
    template = chat_template(c.template)  # checked before anything is written
    file = tokenizer or getattr(model, "source_path", None)
    file = os.path.join(file, "tokenizer.model") if file and os.path.isdir(file) else file
    tokenizer = Tokenizer(file) if file and os.path.isfile(file) else None  # checked before anything is written
    V = c.llm.vocab_size
    image_token = V if c.image_token_index is None else c.image_token_index
    files = tokenizer_configs(tokenizer, image_token, c.llm.max_position_embeddings, processor) if tokenizer else {}
    padded = -(-max(V, image_token + 1) // 64) * 64
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if c.llm.tie_word_embeddings:
        sd.pop("llm.lm_head.weight")  # stored once, as embed_tokens
    for key in ("llm.embed_tokens.weight", "llm.lm_head.weight"):
        if key in sd and padded > V:
            sd[key] = torch.cat([sd[key], sd[key].float().mean(0).to(sd[key].dtype).expand(padded - V, -1)])
    os.makedirs(path, exist_ok=True)
    save_tensors(os.path.join(path, "model.safetensors"), {k: v.contiguous() for k, v in llava_to_hf_keys(sd).items()})
    dtype = str(sd["llm.embed_tokens.weight"].dtype).removeprefix("torch.")
    files["config.json"] = llava_to_hf_config(c.to_dict(), padded, image_token, dtype)
    files["preprocessor_config.json"] = (image_processor_config(c.image_size, True, c.image_grid_pinpoints) if anyres
                                         else image_processor_config(c.image_size, c.image_aspect_ratio == "pad"))
    files["processor_config.json"] = {
        "processor_class": processor, "image_token": IMAGE_TOKEN, "patch_size": c.vision.patch_size,
        "num_additional_image_tokens": 1, "vision_feature_select_strategy": SELECT_STRATEGY[c.select_feature]}
    files["chat_template.json"] = {"chat_template": template}
    for name, content in files.items():
        write_json(os.path.join(path, name), content)
    if tokenizer:
        with open(file, "rb") as f:
            write_bytes(os.path.join(path, "tokenizer.model"), f.read())


def main(argv=None):
    p = argparse.ArgumentParser(description="Checkpoint layouts: apply the paper's released LLaVA delta to LLaMA.")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("apply-delta", help="base + delta (LLaVA-13b-delta-v0 and the like) -> a checkpoint folder")
    a.add_argument("--base", required=True, help="the LLaMA folder (transformers layout) the delta was made against")
    a.add_argument("--delta", required=True, help="the delta folder (config.json, pytorch_model*.bin, tokenizer)")
    a.add_argument("--out", required=True, help="the folder to write")
    a.add_argument("--vision-tower", help="local CLIP folder to name in the written config.json (default: the "
                                          "delta's mm_vision_tower, a hub id: then pass --vision-tower when loading)")
    args = p.parse_args(argv)
    try:
        apply_delta(args.base, args.delta, args.out, args.vision_tower)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
