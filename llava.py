"""LLaVA, Figure 1 of the paper: a frozen CLIP vision tower, a projector and a LLaMA decoder. An image becomes
`num_image_tokens` patch features (CLIP layer `select_layer`, CLS dropped), the projector maps them to the LLM width,
and they replace the embeddings of the placeholder ids (IMAGE_TOKEN_INDEX) that the prompt renderer wrote, one per
feature; then it is an ordinary causal LM, trained on the answer tokens only. LLaVA-1.6 ("anyres") sees an image as an
overview plus tiles of its best grid resolution (clip.preprocess_anyres), all through the tower in one batch;
merge_tiles lays them back on their grid, so the count depends on the image's size (LLaVAConfig.image_tokens).
Own checkpoints: config.json {"format": "llava-minimal", "llm": ..., "vision": ...} + model.safetensors; formats.py
reads every other layout."""
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import load_checkpoint, load_strict, typed_fields
from clip import CLIPVisionConfig, CLIPVisionTower, anyres_grid
from fileio import read_json, save_tensors, write_json
from llama import Llama, LlamaConfig
from projector import PROJECTORS, build_projector

IMAGE_TOKEN_INDEX = -200  # the original release's placeholder id for an image feature: never a vocabulary id
IGNORE_INDEX = -100  # the label of a position without loss (cross_entropy's default ignore_index)
FORMAT = "llava-minimal"  # the "format" field of our config.json
MERGE_TYPES = ("flat", "spatial", "spatial_unpad")  # the original's mm_patch_merge_type: merge_tiles


@dataclass
class LLaVAConfig:
    llm: LlamaConfig
    vision: CLIPVisionConfig
    projector_type: str = "mlp2x_gelu"  # "linear": the paper; "mlp2x_gelu": LLaVA-1.5
    select_layer: int = -2  # CLIP hidden state fed to the projector: the penultimate layer
    select_feature: str = "patch"  # "patch" drops CLS, "cls_patch" keeps it
    image_aspect_ratio: str = "pad"  # "pad": pad to a square with the mean colour first (LLaVA-1.5); "square";
    # "anyres" (LLaVA-1.6): an overview + the tiles of the best of image_grid_pinpoints, merged by patch_merge_type
    image_grid_pinpoints: list | None = None  # anyres: [[width, height], ...], multiples of the tower's image_size
    patch_merge_type: str = "flat"  # anyres: one of MERGE_TYPES; the 1.6 releases: "spatial_unpad" (image_newline)
    template: str = "vicuna_v1"  # conversation template (data.py) the model was trained with
    image_token_index: int | None = None  # llava-hf vocabulary id of <image>, kept for export_hf
    mm_use_im_start_end: bool = False  # v0 (the paper's release): features between <im_start> and <im_end> ids

    def __post_init__(self):
        for name, allowed in [("projector_type", PROJECTORS), ("select_feature", ("patch", "cls_patch")),
                              ("image_aspect_ratio", ("pad", "square", "anyres")),
                              ("patch_merge_type", MERGE_TYPES)]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; known: {', '.join(allowed)}")
        if not -self.vision.num_hidden_layers - 1 <= self.select_layer <= self.vision.num_hidden_layers:
            raise ValueError(f"select_layer {self.select_layer} is out of range for {self.vision.num_hidden_layers} "
                             "CLIP layers")
        if self.image_aspect_ratio == "anyres":
            S, pinpoints = self.vision.image_size, self.image_grid_pinpoints
            if not (isinstance(pinpoints, list) and pinpoints and all(
                    isinstance(p, list) and len(p) == 2 and all(type(x) is int and 0 < x <= 64 * S and x % S == 0
                                                                 for x in p) for p in pinpoints)):
                raise ValueError(f"image_grid_pinpoints={pinpoints!r}: anyres needs a list of [width, height], each "
                                 f"a multiple of the tower's image_size {S}, at most 64 tiles a side")
            if self.patch_merge_type != "flat" and self.select_feature != "patch":
                raise ValueError(f"patch_merge_type={self.patch_merge_type!r} lays patches on a grid: it needs "
                                 f"select_feature 'patch', not {self.select_feature!r}")

    tile_tokens = property(lambda self: self.vision.num_patches + (self.select_feature == "cls_patch"))  # per tile
    image_size = property(lambda self: self.vision.image_size)

    @property
    def num_image_tokens(self) -> int:
        """Placeholders per image, for fixed-size images; anyres counts depend on each image's size: image_tokens."""
        if self.image_aspect_ratio == "anyres":
            raise ValueError("image_aspect_ratio 'anyres': the number of image tokens depends on each image's size "
                             "(LLaVAConfig.image_tokens); this path supports fixed-size images only")
        return self.tile_tokens

    def image_tokens(self, size) -> int:
        """Placeholders for one image of size (width, height): as many as merge_tiles makes of its features."""
        if self.image_aspect_ratio != "anyres":
            return self.tile_tokens
        cols, rows = anyres_grid(size, self.image_grid_pinpoints, self.image_size)
        if self.patch_merge_type != "spatial_unpad":
            return (1 + cols * rows) * self.tile_tokens
        side = self.image_size // self.vision.patch_size  # patches along a tile's side
        _, _, height, width = unpad_box(size, rows * side, cols * side)
        return side * side + height * (width + 1)  # the overview, then each kept row and its image_newline

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


def unpad_box(size, height, width) -> tuple:
    """(top, left, rows, columns) of the part of a height x width feature map that covers an image of size (w, h)
    fitted and centred in it (clip.anyres_tiles): the original's unpad_image. Its int() truncation of the scaled
    side is kept, as the released 1.6 weights were trained with it; transformers rounds to 7 decimals first, which
    for some sizes keeps a row or column more on each side (an 88x55 image with LLaVA-1.6's 336 px tower and grid:
    55 * (24 / 88) = 14.999..., 14 of 48 rows kept here and in the original, 16 in transformers)."""
    w, h = size
    if w / h > width / height:  # relatively wider than the map: padding above and below
        pad = (height - int(h * (width / w))) // 2
        return pad, 0, height - 2 * pad, width
    pad = (width - int(w * (height / h))) // 2
    return 0, pad, height, width - 2 * pad


def merge_tiles(features, grid, size, merge_type, image_newline=None):
    """One anyres image's features (1 + rows * cols, P, D), overview first -> (N, D) in prompt order. "flat": tile
    after tile; "spatial": the overview, then the tiles laid back on their grid (cols, rows) and read as one feature
    map, row by row; "spatial_unpad": that map without the padding's rows or columns, image_newline after each row."""
    if merge_type == "flat":
        return features.flatten(0, 1)  # (N, D)
    cols, rows = grid
    side, D = math.isqrt(features.shape[1]), features.shape[-1]
    tiles = features[1:].view(rows, cols, side, side, D).permute(0, 2, 1, 3, 4)  # (rows, side, cols, side, D)
    feature_map = tiles.reshape(rows * side, cols * side, D)  # (H, W, D)
    if merge_type == "spatial_unpad":
        top, left, height, width = unpad_box(size, rows * side, cols * side)
        feature_map = feature_map[top:top + height, left:left + width]  # (height, width, D)
        newline = image_newline.to(feature_map.dtype).expand(height, 1, D)
        feature_map = torch.cat([feature_map, newline], dim=1)  # (height, width + 1, D)
    return torch.cat([features[0], feature_map.flatten(0, 1)])  # (N, D)


class LLaVA(nn.Module):
    def __init__(self, config: LLaVAConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config.vision).requires_grad_(False)  # frozen in both stages
        self.projector = build_projector(config.projector_type, config.vision.hidden_size, config.llm.hidden_size)
        self.llm = Llama(config.llm)
        if config.patch_merge_type == "spatial_unpad":  # LLaVA-1.6's learned end-of-row vector, std 1/sqrt(D)
            self.image_newline = nn.Parameter(torch.randn(config.llm.hidden_size) * config.llm.hidden_size**-0.5)

    def encode_images(self, pixel_values, image_sizes=None):
        """(N, 3, S, S) -> [(P_i, D)], one per image: N images, or with anyres the tiles of len(image_sizes) images
        (clip.preprocess_anyres's, concatenated), all through the tower in one batch."""
        c = self.config
        with torch.no_grad():  # the tower is frozen: no activations kept for backward
            features = self.vision_tower(pixel_values, c.select_layer, c.select_feature)
        features = self.projector(features.to(next(self.projector.parameters()).dtype))  # (N, P, D)
        if c.image_aspect_ratio != "anyres":
            return list(features)
        grids = [anyres_grid(size, c.image_grid_pinpoints, c.image_size) for size in image_sizes or []]
        tiles = [1 + cols * rows for cols, rows in grids]
        if sum(tiles) != len(features):
            raise ValueError(f"{len(features)} tiles in pixel_values, {sum(tiles)} for image_sizes {image_sizes}")
        return [merge_tiles(f, grid, size, c.patch_merge_type, getattr(self, "image_newline", None))
                for f, grid, size in zip(features.split(tiles), grids, image_sizes)]

    def embed(self, input_ids, pixel_values=None, image_sizes=None, image_features=None):
        """Token embeddings with image features written over the placeholders, images in row-major order.
        image_features: encode_images' output of an earlier call, instead of pixel_values."""
        is_image = input_ids == IMAGE_TOKEN_INDEX  # (B, T)
        features = image_features if image_features is not None else \
            [] if pixel_values is None else self.encode_images(pixel_values, image_sizes)  # [(P_i, D)]
        n_slots, n_features = int(is_image.sum()), sum(len(f) for f in features)
        if n_slots != n_features:
            raise ValueError(f"{n_slots} image placeholders in input_ids, {n_features} features from "
                             f"{len(features)} images")
        embeds = self.llm.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, D), placeholder rows overwritten
        if features:
            embeds[is_image] = torch.cat(features).to(embeds.dtype)  # (sum P_i, D) in order
        return embeds

    def forward(self, input_ids, pixel_values=None, labels=None, image_sizes=None):
        """No labels: (logits (B, T, V), None). Labels: (logits of the N labelled positions (N, V), N losses).
        image_sizes: with anyres, each image's (w, h), in order (embed)."""
        hidden = self.llm(inputs_embeds=self.embed(input_ids, pixel_values, image_sizes), head=labels is None)
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
        device = "cpu" if weight.is_meta else weight.device
        model.projector = build_projector(projector_type, tower.config.hidden_size, llm.config.hidden_size).to(
            device, weight.dtype)
        if hasattr(model, "image_newline"):  # as the original initialises it beside mm_projector
            model.init_image_newline()
        return model.eval()

    def init_image_newline(self):
        """A fresh image_newline (std 1/sqrt(D), the original's), on the LLM's device and dtype (the CPU for meta)."""
        weight, D = self.llm.norm.weight, self.config.llm.hidden_size
        device = "cpu" if weight.is_meta else weight.device
        self.image_newline = nn.Parameter((torch.randn(D) * D**-0.5).to(device, weight.dtype))

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
