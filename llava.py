"""LLaVA, Figure 1 of the paper: a frozen CLIP vision tower, a projector and a LLaMA decoder. An image becomes
`num_image_tokens` patch features (CLIP layer `select_layer`, CLS dropped), the projector maps them to the LLM width,
and they replace the embeddings of the placeholder ids (IMAGE_TOKEN_INDEX) that the prompt renderer wrote, one per
feature; then it is an ordinary causal LM, trained on the answer tokens only. Own checkpoints: config.json
{"format": "llava-minimal", "llm": ..., "vision": ...} + model.safetensors; formats.py reads every other layout."""
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import load_checkpoint, load_strict, typed_fields
from clip import CLIPVisionConfig, CLIPVisionTower
from fileio import read_json, save_tensors, write_json
from llama import Llama, LlamaConfig
from projector import PROJECTORS, build_projector

IMAGE_TOKEN_INDEX = -200  # the original release's placeholder id for an image feature: never a vocabulary id
IGNORE_INDEX = -100  # the label of a position without loss (cross_entropy's default ignore_index)
FORMAT = "llava-minimal"  # the "format" field of our config.json


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
    mm_use_im_start_end: bool = False  # v0 (the paper's release): features between <im_start> and <im_end> ids

    def __post_init__(self):
        for name, allowed in [("projector_type", PROJECTORS), ("select_feature", ("patch", "cls_patch")),
                              ("image_aspect_ratio", ("pad", "square"))]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; known: {', '.join(allowed)}")
        if not -self.vision.num_hidden_layers - 1 <= self.select_layer <= self.vision.num_hidden_layers:
            raise ValueError(f"select_layer {self.select_layer} is out of range for {self.vision.num_hidden_layers} "
                             "CLIP layers")

    num_image_tokens = property(lambda self: self.vision.num_patches + (self.select_feature == "cls_patch"))
    image_size = property(lambda self: self.vision.image_size)

    def to_dict(self) -> dict:
        rest = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("llm", "vision")}
        return {"format": FORMAT, "llm": self.llm.to_hf(), "vision": self.vision.to_hf(), **rest}

    @classmethod
    def from_dict(cls, d: dict, source="config.json") -> "LLaVAConfig":
        if d.get("format") != FORMAT or not all(isinstance(d.get(k), dict) for k in ("llm", "vision")):
            raise ValueError(f"{source}: not a {FORMAT} config ('format', 'llm' and 'vision' expected); "
                             "formats.load_llava reads the original release and llava-hf")
        values = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        values.update(llm=LlamaConfig.from_hf(d["llm"], f"{source} 'llm'"),
                      vision=CLIPVisionConfig.from_hf(d["vision"], f"{source} 'vision'"))
        return cls(**typed_fields(cls, values, source))


class LLaVA(nn.Module):
    def __init__(self, config: LLaVAConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config.vision).requires_grad_(False)  # frozen in both stages
        self.projector = build_projector(config.projector_type, config.vision.hidden_size, config.llm.hidden_size)
        self.llm = Llama(config.llm)

    def encode_images(self, pixel_values):  # (N, 3, S, S) -> (N, P, D)
        with torch.no_grad():  # the tower is frozen: no activations kept for backward
            features = self.vision_tower(pixel_values, self.config.select_layer, self.config.select_feature)
        return self.projector(features.to(next(self.projector.parameters()).dtype))

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with image features written over the placeholders, images in row-major order."""
        is_image = input_ids == IMAGE_TOKEN_INDEX  # (B, T)
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        n_slots, n_features = int(is_image.sum()), n_images * self.config.num_image_tokens
        if n_slots != n_features:
            raise ValueError(f"{n_slots} image placeholders in input_ids, {n_features} features from {n_images} images")
        embeds = self.llm.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, D), placeholder rows overwritten
        if n_images:
            features = self.encode_images(pixel_values)  # (N, P, D)
            embeds[is_image] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)  # (N*P, D) in order
        return embeds

    def forward(self, input_ids, pixel_values=None, labels=None):
        """No labels: (logits (B, T, V), None). Labels: (logits of the N labelled positions (N, V), N losses)."""
        hidden = self.llm(inputs_embeds=self.embed(input_ids, pixel_values), head=labels is None)  # (B, T, V or D)
        if labels is None:
            return hidden, None
        # token t predicts label t+1: shift the labels, not the logits, and run the head only where a label is
        # (image tokens and prompts have none: ~95 % of stage-1 positions), never on full (B, T, V) logits
        targets, keep = labels[:, 1:], labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
        logits = self.llm.lm_head(hidden[:, :-1][keep])  # (N, V)
        return logits, F.cross_entropy(logits.float(), targets[keep], reduction="none")

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32) -> "LLaVA":
        """Our own layout only (formats.load_llava reads them all); device="meta" reads nothing yet (load_strict)."""
        config_file = os.path.join(path, "config.json")
        with torch.device("meta"):  # no memory until the checkpoint tensors are assigned
            model = cls(LLaVAConfig.from_dict(read_json(config_file), config_file))
        return load_strict(model, *load_checkpoint(path, device), device=device, dtype=dtype).eval()

    @classmethod
    def from_parts(cls, llm: Llama, tower: CLIPVisionTower, projector_type="mlp2x_gelu", **settings) -> "LLaVA":
        """Two pretrained halves and a fresh projector: the start of stage 1."""
        with torch.device("meta"):  # nothing is allocated: every part is replaced below
            model = cls(LLaVAConfig(llm=llm.config, vision=tower.config, projector_type=projector_type, **settings))
        model.llm, model.vision_tower = llm, tower.requires_grad_(False)
        # PyTorch's default Linear init, as the original builds mm_projector after loading the LLM
        weight = llm.norm.weight
        model.projector = build_projector(projector_type, tower.config.hidden_size, llm.config.hidden_size).to(
            "cpu" if weight.is_meta else weight.device, weight.dtype)
        return model.eval()

    def save_pretrained(self, path, file="model.safetensors", prefix=""):  # the caller copies the tokenizer
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k.startswith(prefix)}
        if any(k.endswith("weight_int8") for k in sd):  # quantize.py's layers: from_pretrained reads float weights
            raise ValueError("int8 weights are for answering, not for saving: save the float model, quantize on load")
        if self.config.llm.tie_word_embeddings:
            sd.pop("llm.lm_head.weight", None)  # safetensors stores a shared tensor once
        os.makedirs(path, exist_ok=True)
        save_tensors(os.path.join(path, file), sd)
        write_json(os.path.join(path, "config.json"), self.config.to_dict())

    def save_projector(self, path):  # stage 1's output, projector.safetensors: read by formats.load_projector
        self.save_pretrained(path, "projector.safetensors", "projector.")
