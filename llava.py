"""LLaVA: a frozen CLIP vision tower, a projector and a LLaMA decoder, joined through the token embeddings.

An image becomes `num_image_tokens` patch features (CLIP layer `select_layer`, CLS dropped), the projector maps
them to the LLM width, and they replace the embeddings of the placeholder ids (IMAGE_TOKEN_INDEX = -200) that the
prompt renderer wrote, one placeholder per feature. Everything after that is an ordinary causal LM.

Checkpoint layouts read by `LLaVA.from_pretrained` (detected from config.json):
  own          {"format": "llava-minimal", "llm": ..., "vision": ...}; keys == LLaVA.state_dict() keys
  original     haotian-liu/LLaVA release (liuhaotian/llava-v1.5-7b): "mm_*" fields in a LLaMA config.json, keys
               model.* / lm_head.weight / model.mm_projector.*; the CLIP tower comes from `vision_tower=`
  llava-hf     transformers' LlavaForConditionalGeneration (llava-hf/llava-1.5-7b-hf), old and new key names
`export_hf` writes the llava-hf layout with the published llava-1.5-*-hf key names.
"""
import json
import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clip import CLIP_MEAN, CLIP_STD, CLIPVisionConfig, CLIPVisionTower
from llama import Llama, LlamaConfig, _atomic_write, _load_checkpoint, check_state_dict, generate as llama_generate
from projector import PROJECTORS, build_projector

IMAGE_TOKEN_INDEX = -200  # the original release's placeholder id: never a real vocabulary id
FORMAT = "llava-minimal"
# transformers fills fields missing from a sub-config with its class defaults; llava-1.5-7b-hf relies on that
LLAMA_HF_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6)
SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}  # ours -> llava-hf vision_feature_select_strategy
IGNORED = ("rotary_emb.inv_freq",)  # recomputable buffer that transformers 4.31 (the original release) saved


@dataclass
class LLaVAConfig:
    llm: LlamaConfig
    vision: CLIPVisionConfig
    projector_type: str = "mlp2x_gelu"  # "linear": the paper; "mlp2x_gelu": LLaVA-1.5
    select_layer: int = -2  # CLIP hidden state fed to the projector: the penultimate layer
    select_feature: str = "patch"  # "patch" drops CLS, "cls_patch" keeps it
    image_aspect_ratio: str = "pad"  # "pad": pad to a square with the mean colour first (LLaVA-1.5); "square"
    template: str = "vicuna_v1"  # conversation template (data.py) the model was trained with
    image_token_index: int | None = None  # llava-hf vocabulary id of <image>, kept for export_hf

    def __post_init__(self):
        for name, value, allowed in [("projector_type", self.projector_type, PROJECTORS),
                                     ("select_feature", self.select_feature, tuple(SELECT_STRATEGY)),
                                     ("image_aspect_ratio", self.image_aspect_ratio, ("pad", "square"))]:
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; known: {', '.join(allowed)}")

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches + (self.select_feature == "cls_patch")

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def pad_to_square(self) -> bool:
        return self.image_aspect_ratio == "pad"

    def to_dict(self) -> dict:
        rest = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("llm", "vision")}
        return {"format": FORMAT, "llm": self.llm.to_hf(), "vision": self.vision.to_hf(), **rest}

    @classmethod
    def from_dict(cls, d: dict) -> "LLaVAConfig":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} config (format={d.get('format')!r})")
        rest = {f.name: d[f.name] for f in fields(cls) if f.name in d and f.name not in ("llm", "vision")}
        return cls(llm=LlamaConfig.from_hf(d["llm"]), vision=CLIPVisionConfig.from_hf(d["vision"]), **rest)


class LLaVA(nn.Module):
    def __init__(self, config: LLaVAConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config.vision).requires_grad_(False)  # frozen in both stages
        self.projector = build_projector(config.projector_type, config.vision.hidden_size, config.llm.hidden_size)
        self.llm = Llama(config.llm)

    def encode_images(self, pixel_values):
        with torch.no_grad():  # the tower is frozen: no activations kept for backward
            features = self.vision_tower(pixel_values, self.config.select_layer, self.config.select_feature)  # (N, P, Cv)
        return self.projector(features.to(next(self.projector.parameters()).dtype))  # (N, P, D)

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with image features written over the -200 placeholders, images in row-major order."""
        is_image = input_ids == IMAGE_TOKEN_INDEX  # (B, T)
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        n_slots, n_features = int(is_image.sum()), n_images * self.config.num_image_tokens
        if n_slots != n_features:
            raise ValueError(f"input_ids hold {n_slots} image placeholders ({IMAGE_TOKEN_INDEX}) but {n_images} "
                             f"images give {n_features} features ({self.config.num_image_tokens} per image)")
        embeds = self.llm.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, D), placeholder rows overwritten
        if n_images:
            features = self.encode_images(pixel_values)  # (N, P, D)
            embeds[is_image] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)  # (N*P, D) in order
        return embeds

    def forward(self, input_ids, pixel_values=None, labels=None):
        logits = self.llm(inputs_embeds=self.embed(input_ids, pixel_values))  # (B, T, V)
        if labels is None:
            return logits, None
        # token t predicts label t+1 (labels are aligned with input_ids, as in transformers)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return logits, loss

    def generate(self, input_ids, pixel_values=None, **kwargs):
        """Yields token ids (batch 1). The caller runs model.llm.setup_cache first; kwargs as llama.generate."""
        with torch.inference_mode():  # images are encoded once, then prefilled into the KV cache with the text
            embeds = self.embed(input_ids, pixel_values)  # (1, T, D)
        return llama_generate(self.llm, inputs_embeds=embeds, **kwargs)

    # ---------------------------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, path, vision_tower=None, device="cpu", dtype=torch.float32) -> "LLaVA":
        d = _read_json(os.path.join(path, "config.json"))
        tensors, files = _load_checkpoint(path, device)  # files: key -> the file (shard) it came from
        if d.get("format") == FORMAT:
            config = LLaVAConfig.from_dict(d)
        elif "text_config" in d or "LlavaForConditionalGeneration" in d.get("architectures", []):
            config, tensors, files = llava_hf_config(d, path), hf_to_llava_keys(tensors), hf_to_llava_keys(files)
        elif "mm_vision_tower" in d or "mm_projector_type" in d:
            vision_tower = vision_tower or d.get("mm_vision_tower")  # a hub id in released configs, or a folder
            config = original_config(d, path, vision_tower)
            tensors, files = original_to_llava_keys(tensors), original_to_llava_keys(files)
            if not any(k.startswith("vision_tower.") for k in tensors):  # the release ships no tower weights
                tower = CLIPVisionTower.from_pretrained(vision_tower, device, dtype).state_dict()
                tensors.update({"vision_tower." + k: v for k, v in tower.items()})
                files.update({"vision_tower." + k: vision_tower for k in tower})
        else:
            raise ValueError(f"{path}/config.json: not a LLaVA checkpoint (no 'format': '{FORMAT}', no "
                             f"'text_config', no 'mm_vision_tower')")
        model = cls._from_state(config, tensors, files, device, dtype)
        model.source_path = path  # export_hf copies the tokenizer from here
        return model

    @classmethod
    def _from_state(cls, config, state, files, device, dtype):
        with torch.device("meta"):  # no memory until the checkpoint tensors are assigned
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        tied = config.llm.tie_word_embeddings
        if tied:  # one tensor in memory, stored once (as embed_tokens)
            expected.pop("llm.lm_head.weight")
        for key in [k for k in state if any(p in k for p in IGNORED)]:
            del state[key]
        check_state_dict(expected, state, files)
        for key, value in state.items():  # in place: each file tensor is freed as soon as it is converted
            state[key] = value.to(device=device, dtype=dtype) if value.is_floating_point() else value
        if tied:
            state["llm.lm_head.weight"] = state["llm.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if tied:  # assign=True replaced the shared Parameter: share it again
            model.llm.lm_head.weight = model.llm.embed_tokens.weight
        return model.eval()

    @classmethod
    def from_parts(cls, llm_path, vision_path, projector_type="mlp2x_gelu", device="cpu", dtype=torch.float32,
                   **config_overrides) -> "LLaVA":
        """Base HF checkpoints (LLaMA/Vicuna + CLIP) and a fresh projector: the start of stage 1."""
        llm = Llama.from_pretrained(llm_path, device, dtype)
        tower = CLIPVisionTower.from_pretrained(vision_path, device, dtype)
        config = LLaVAConfig(llm=llm.config, vision=tower.config, projector_type=projector_type, **config_overrides)
        with torch.device("meta"):
            model = cls(config)
        model.llm, model.vision_tower = llm, tower.requires_grad_(False)
        # PyTorch's default Linear init, as the original builds mm_projector after loading the LLM
        model.projector = build_projector(projector_type, tower.config.hidden_size, llm.config.hidden_size)
        model.projector.to(device=device, dtype=dtype)
        model.source_path = llm_path
        return model.eval()

    def _tensors(self, prefix=""):
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k.startswith(prefix)}
        if self.config.llm.tie_word_embeddings:
            sd.pop("llm.lm_head.weight", None)  # safetensors stores a shared tensor once
        return sd

    def save_pretrained(self, path):
        """Own layout: config.json + model.safetensors (the tokenizer is copied by the caller)."""
        os.makedirs(path, exist_ok=True)
        _save_tensors(os.path.join(path, "model.safetensors"), self._tensors())
        _save_json(os.path.join(path, "config.json"), self.config.to_dict())

    def save_projector(self, path):
        """Stage-1 output: config.json + projector.safetensors (keys "projector.*")."""
        os.makedirs(path, exist_ok=True)
        _save_tensors(os.path.join(path, "projector.safetensors"), self._tensors("projector."))
        _save_json(os.path.join(path, "config.json"), self.config.to_dict())

    def load_projector(self, path):
        """Our projector.safetensors, or the original release's stage-1 mm_projector.bin; strict."""
        file = os.path.join(path, "projector.safetensors")
        if os.path.exists(file):
            tensors = load_file(file)
            saved = _read_json(os.path.join(path, "config.json")).get("projector_type")
            if saved != self.config.projector_type:
                raise ValueError(f"{path}/config.json: projector_type {saved!r}, the model has "
                                 f"{self.config.projector_type!r}")
        elif os.path.exists(os.path.join(path, "mm_projector.bin")):
            file = os.path.join(path, "mm_projector.bin")
            tensors = original_to_llava_keys(torch.load(file, map_location="cpu", weights_only=True))
        else:
            raise FileNotFoundError(f"{path}: no projector.safetensors or mm_projector.bin")
        check_state_dict({"projector." + k: v.shape for k, v in self.projector.state_dict().items()}, tensors, file)
        self.projector.load_state_dict({k.removeprefix("projector."): v for k, v in tensors.items()}, strict=True)

    def export_hf(self, path, tokenizer=None):
        """llava-hf layout (LlavaForConditionalGeneration): config.json, preprocessor_config.json,
        model.safetensors with the published llava-1.5-*-hf key names, and tokenizer.model copied from
        `tokenizer` (a file or folder; default: the folder the model was loaded from) when there is one.
        The image token id is the remembered one (a model loaded from llava-hf), else the first id after the
        vocabulary, as in llava-1.5-hf (32000 for Vicuna). The vocabulary is padded to a multiple of 64 with rows
        equal to the mean row: the mean row's logit is the mean logit, so greedy decoding never picks a new id."""
        c = self.config
        if c.projector_type != "mlp2x_gelu":
            raise ValueError(f"llava-hf has only the mlp2x_gelu projector, this model has {c.projector_type!r}")
        sd = self._tensors()
        V = c.llm.vocab_size
        image_token = V if c.image_token_index is None else c.image_token_index
        padded = -(-max(V, image_token + 1) // 64) * 64
        for key in ("llm.embed_tokens.weight", "llm.lm_head.weight"):
            if key in sd and padded > V:
                sd[key] = torch.cat([sd[key], sd[key].float().mean(0).to(sd[key].dtype).expand(padded - V, -1)])
        os.makedirs(path, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in llava_to_hf_keys(sd).items()}
        _save_tensors(os.path.join(path, "model.safetensors"), tensors)
        text = {**c.llm.to_hf(), "vocab_size": padded}
        vision = {k: v for k, v in c.vision.to_hf().items() if k != "architectures"}
        config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "text_config": text,
                  "vision_config": vision, "image_token_index": image_token,
                  "image_seq_length": c.num_image_tokens, "projector_hidden_act": "gelu",
                  "vision_feature_layer": c.select_layer,
                  "vision_feature_select_strategy": SELECT_STRATEGY[c.select_feature],
                  "multimodal_projector_bias": True, "tie_word_embeddings": c.llm.tie_word_embeddings,
                  "torch_dtype": str(sd["llm.embed_tokens.weight"].dtype).removeprefix("torch.")}
        _save_json(os.path.join(path, "config.json"), config)
        S = c.image_size  # the CLIP processor settings LLaVA used; do_pad = image_aspect_ratio "pad"
        processor = {"image_processor_type": "LlavaImageProcessor", "do_pad": c.pad_to_square, "do_resize": True,
                     "size": {"shortest_edge": S}, "resample": 3, "do_center_crop": True,
                     "crop_size": {"height": S, "width": S}, "do_rescale": True, "rescale_factor": 1 / 255,
                     "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
                     "do_convert_rgb": True}
        _save_json(os.path.join(path, "preprocessor_config.json"), processor)
        tokenizer = tokenizer or getattr(self, "source_path", None)
        if tokenizer and os.path.isdir(tokenizer):
            tokenizer = os.path.join(tokenizer, "tokenizer.model")
        if tokenizer and os.path.isfile(tokenizer):
            shutil.copyfile(tokenizer, os.path.join(path, "tokenizer.model"))


# ------------------------------------------------------------------------------------------- layouts and keys

def llava_hf_config(d: dict, path) -> LLaVAConfig:
    for key, allowed in [("projector_hidden_act", "gelu"), ("multimodal_projector_bias", True)]:
        if d.get(key, allowed) != allowed:
            raise ValueError(f"{path}/config.json: {key}={d[key]!r} is not supported (only {allowed!r})")
    layer, strategy = d.get("vision_feature_layer", -2), d.get("vision_feature_select_strategy", "default")
    if not isinstance(layer, int) or strategy not in SELECT_STRATEGY.values():
        raise ValueError(f"{path}/config.json: vision_feature_layer={layer!r} / select strategy {strategy!r} "
                         f"not supported (one layer; 'default' or 'full')")
    vision = d.get("vision_config") or CLIPVisionConfig.from_name("vit-l-14-336").to_hf()  # LlavaConfig's default
    processor = os.path.join(path, "preprocessor_config.json")
    pad = _read_json(processor).get("do_pad", True) if os.path.exists(processor) else True
    return LLaVAConfig(llm=LlamaConfig.from_hf({**LLAMA_HF_DEFAULTS, **d.get("text_config", {})}),
                       vision=CLIPVisionConfig.from_hf(vision), projector_type="mlp2x_gelu", select_layer=layer,
                       select_feature={v: k for k, v in SELECT_STRATEGY.items()}[strategy],
                       image_aspect_ratio="pad" if pad else "square",
                       image_token_index=d.get("image_token_index", 32000))


def original_config(d: dict, path, vision_tower) -> LLaVAConfig:
    for key, allowed in [("mm_use_im_start_end", False), ("mm_patch_merge_type", "flat")]:
        if d.get(key, allowed) != allowed:
            raise ValueError(f"{path}/config.json: {key}={d[key]!r} is not supported (only {allowed!r})")
    if not vision_tower or not os.path.exists(os.path.join(vision_tower, "config.json")):
        raise FileNotFoundError(f"{path}: the original LLaVA release has no vision tower weights; pass "
                                f"vision_tower=<local folder of {d.get('mm_vision_tower')}> (a CLIP checkpoint)")
    vision = CLIPVisionConfig.from_hf(_read_json(os.path.join(vision_tower, "config.json")))
    if d.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ValueError(f"{path}/config.json: mm_hidden_size {d['mm_hidden_size']} != hidden_size "
                         f"{vision.hidden_size} of the vision tower {vision_tower}")
    return LLaVAConfig(llm=LlamaConfig.from_hf({**d, "model_type": "llama"}), vision=vision,
                       projector_type=d.get("mm_projector_type", "linear"),
                       select_layer=d.get("mm_vision_select_layer", -2),
                       select_feature=d.get("mm_vision_select_feature", "patch"),
                       image_aspect_ratio=d.get("image_aspect_ratio", "square"))


# (file prefix, our prefix); first match wins. transformers >= 4.52 adds "model." before the first three parts
# and writes "lm_head." at the top; transformers 5 drops "vision_model." from the tower.
HF_PREFIXES = [("language_model.model.", "llm."), ("language_model.lm_head.", "llm.lm_head."),
               ("language_model.", "llm."), ("lm_head.", "llm.lm_head."),
               ("vision_tower.vision_model.", "vision_tower."), ("vision_tower.", "vision_tower."),
               ("multi_modal_projector.linear_1.", "projector.0."),
               ("multi_modal_projector.linear_2.", "projector.2.")]
ORIGINAL_PREFIXES = [("model.mm_projector.", "projector."),
                     ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
                     ("model.", "llm."), ("lm_head.", "llm.lm_head.")]


def _rename(key, prefixes):
    for old, new in prefixes:
        if key.startswith(old):
            return new + key[len(old):]
    return key  # unknown: left as is, so the strict check reports it by its own name


def hf_to_llava_keys(sd: dict) -> dict:
    new = ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.")
    return {_rename(k.removeprefix("model.") if k.startswith(new) else k, HF_PREFIXES): v for k, v in sd.items()}


def llava_to_hf_keys(sd: dict) -> dict:  # the published llava-1.5-*-hf names
    back = [("llm.lm_head.", "language_model.lm_head."), ("llm.", "language_model.model."),
            ("vision_tower.", "vision_tower.vision_model."), ("projector.0.", "multi_modal_projector.linear_1."),
            ("projector.2.", "multi_modal_projector.linear_2.")]
    return {_rename(k, back): v for k, v in sd.items()}


def original_to_llava_keys(sd: dict) -> dict:
    return {_rename(k, ORIGINAL_PREFIXES): v for k, v in sd.items()}


def llava_to_original_keys(sd: dict) -> dict:
    back = [("projector.", "model.mm_projector."), ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
            ("llm.lm_head.", "lm_head."), ("llm.", "model.")]
    return {_rename(k, back): v for k, v in sd.items()}


def _read_json(file) -> dict:
    with open(file) as f:  # a missing file raises FileNotFoundError naming it
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: invalid JSON ({e})") from e


def _save_json(file, d):
    _atomic_write(file, lambda tmp: Path(tmp).write_text(json.dumps(d, indent=2)))


def _save_tensors(file, tensors):
    _atomic_write(file, lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
