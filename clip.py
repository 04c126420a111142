"""CLIP ViT vision tower (the eyes of LLaVA) and CLIP's image preprocessing, with pillow + numpy.

Module names are Hugging Face's CLIPVisionModel names, so a CLIPVisionModel folder loads by a prefix strip (a full
CLIPModel, such as openai/clip-vit-large-patch14-336, and `.bin` files: formats.load_clip). LLaVA reads the hidden
states of the penultimate layer (`select_layer=-2`) and drops the CLS token: the layers after the selected one are
never computed and `post_layernorm` is unused (kept so that checkpoints load strictly and save back unchanged).
LLaVA-1.6 ("anyres") sees an image as an overview plus tower-sized tiles of a larger grid: preprocess_anyres.
"""
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from checkpoint import load_checkpoint, load_strict, typed_fields
from fileio import read_json, save_tensors, write_json
from images import bounded, check_aspect_ratio, to_8bit

# OpenAI CLIP's training statistics; the pad colour is LLaVA's `tuple(int(x * 255) for x in image_mean)`.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(x * 255) for x in CLIP_MEAN)  # (122, 116, 104)


@dataclass
class CLIPVisionConfig:  # field names as in HF CLIPVisionConfig
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int  # input is image_size x image_size pixels
    patch_size: int  # a conv with kernel = stride = patch_size cuts the image into patches
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # OpenAI CLIP's x * sigmoid(1.702 x)
    num_channels: int = 3

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}")

    @property
    def num_patches(self) -> int:  # image tokens without CLS
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d: dict, source="config.json") -> "CLIPVisionConfig":
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if "vision_config" in d:
            raise ValueError(f"{source}: a full CLIPModel (vision_config + text_config), not a CLIPVisionModel: "
                             "formats.load_clip reads its vision tower")
        # missing fields take the defaults of transformers' CLIPVisionConfig, as transformers itself does
        defaults = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=32, layer_norm_eps=1e-5, hidden_act="quick_gelu", num_channels=3)
        return cls(**typed_fields(cls, {k: d.get(k, v) for k, v in defaults.items()}, source))

    def to_hf(self) -> dict:
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **fields}

    @classmethod
    def from_name(cls, name: str) -> "CLIPVisionConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown CLIP preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**PRESETS[name])


PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 image_size=64, patch_size=16),  # 16 image tokens: tests, bench.py (the demo has its own)
    "tiny-336": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     image_size=336, patch_size=14),  # 576 image tokens as LLaVA-1.5's, a narrow tower: bench.py
    "vit-l-14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14),  # openai/clip-vit-large-patch14, LLaVA v1: 256 tokens
    "vit-l-14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=336, patch_size=14),  # openai/clip-vit-large-patch14-336, LLaVA-1.5: 576 tokens
}

def quick_gelu(x):
    """OpenAI CLIP's x * sigmoid(1.702 x), the same bits in place where no gradient flows (LLaVA's frozen tower):
    on a CPU each fresh buffer of an anyres batch (5 x 577 x 4096 floats, 47 MB) is new pages from the OS, and
    two fewer of them per layer make the ViT-L tower ~7 % faster there (BENCHMARKS.md, anyres)."""
    return x * torch.sigmoid(1.702 * x) if x.requires_grad else torch.sigmoid_(x * 1.702).mul_(x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Embeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(config.hidden_size) * config.hidden_size**-0.5)
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, config.hidden_size)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, pixel_values):  # (B, 3, S, S), S = image_size: preprocess() makes them so
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, C, g, g)
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, C), row-major patch order
        cls = self.class_embedding.expand(len(patches), 1, -1)  # (B, 1, C)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, N+1, C): positions 0..N


class Attention(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        C, self.num_heads = config.hidden_size, config.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(C, C), nn.Linear(C, C)
        self.v_proj, self.out_proj = nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)  # (B, H, T, D)
        v = self.v_proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D), no mask: every token sees the whole image
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))  # (B, T, C)


class EncoderLayer(nn.Module):  # pre-LN transformer block
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))  # (B, T, C)
        return x + self.mlp(self.layer_norm2(x))  # (B, T, C)


class CLIPVisionTower(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: the HF/OpenAI name
        layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.encoder = nn.ModuleDict({"layers": layers})
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # unused, see top

    def forward(self, pixel_values, select_layer=-2, select_feature="patch"):
        """The hidden state after layer `select_layer` (HF's hidden_states[select_layer]: 0 is the embeddings, -1
        the last layer); "patch" drops CLS, "cls_patch" keeps it."""
        depth = select_layer % (len(self.encoder.layers) + 1)
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (B, N+1, C)
        for layer in self.encoder.layers[:depth]:
            x = layer(x)  # (B, N+1, C)
        return x[:, 1:] if select_feature == "patch" else x  # (B, N, C) or (B, N+1, C)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32) -> "CLIPVisionTower":
        """A CLIPVisionModel folder (config.json + safetensors), without old ones' position_ids buffer (0..N)."""
        config_file = os.path.join(path, "config.json")
        config = CLIPVisionConfig.from_hf(read_json(config_file), config_file)
        with torch.device("meta"):  # no memory until the checkpoint tensors are assigned
            model = cls(config)
        tensors, files = load_checkpoint(path, device, skip=lambda key: key.endswith("embeddings.position_ids"))
        return load_strict(model, tensors, files, clip_to_tower_keys, tower_to_clip_keys, device, dtype).eval()

    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tower_to_clip_keys(self.state_dict()).items()}
        save_tensors(os.path.join(path, "model.safetensors"), tensors)
        write_json(os.path.join(path, "config.json"), self.config.to_hf())


def clip_to_tower_keys(sd: dict) -> dict:  # published names ("vision_model.x") -> tower names ("x")
    return {k.removeprefix("vision_model."): v for k, v in sd.items()}


def tower_to_clip_keys(sd: dict) -> dict:
    return {f"vision_model.{k}": v for k, v in sd.items()}


# ---- preprocessing: transformers' slow (PIL) CLIPImageProcessor, which LLaVA used, step for step ----

def to_rgb(image: Image.Image) -> Image.Image:
    # as CLIPImageProcessor: transparency composited onto white, other modes (L, P, CMYK, 16-bit) plainly converted
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, to_8bit(image).convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else to_8bit(image).convert("RGB")


def expand_to_square(image: Image.Image, color=PAD_COLOR) -> Image.Image:
    """LLaVA's image_aspect_ratio="pad": centre the image on a square of `color` (the offset is rounded down)."""
    w, h = image.size
    if w == h:
        return image
    square = Image.new(image.mode, (max(w, h),) * 2, color)
    square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return square


def preprocess(images, image_size: int, pad_to_square=False) -> torch.Tensor:
    """One PIL image or a list -> (B, 3, S, S) float32: RGB, [pad], bicubic short edge -> S, centre crop, normalise.
    Bit-exact with CLIPImageProcessor up to images.EXACT_UP_TO times S (larger ones are reduced first:
    images.bounded); images beyond images.MAX_ASPECT_RATIO raise ValueError."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    S = image_size
    out = np.empty((len(images), S, S, 3), np.uint8)
    for i, image in enumerate(images):
        check_aspect_ratio(image.size, getattr(image, "filename", "") or f"image {i}")
        image = bounded(to_rgb(image), S, pad_to_square)
        if pad_to_square:
            image = expand_to_square(image)
        w, h = image.size
        long = int(S * max(w, h) / min(w, h))  # truncated, as transformers (and torchvision) compute it
        w, h = (S, long) if w <= h else (long, S)
        image = image.resize((w, h), Image.BICUBIC)
        top, left = (h - S) // 2, (w - S) // 2
        out[i] = np.asarray(image.crop((left, top, left + S, top + S)))  # (S, S, 3); crop first: no big copy
    return normalize(out)


def normalize(pixels: np.ndarray) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 with CLIP's statistics: rescaled in float64 then normalised in
    float32, the processor's exact order of rounding."""
    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
    out = ((pixels.astype(np.float64) * (1 / 255)).astype(np.float32) - mean) / std
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S)


# ---- LLaVA-1.6 "anyres": the image at the best grid resolution cut into tower-sized tiles, after an overview ----
# Sizes are (width, height) and so are grid_pinpoints, as the original's llava/mm_utils.py reads them (transformers'
# LlavaNext configs list (height, width): formats.py swaps them). Bit-exact with LlavaNextImageProcessor (PIL).

def select_best_resolution(size, resolutions) -> tuple:
    """The resolution that keeps the most of the image's pixels when it is fitted inside, ties to the least waste."""
    w, h = size
    best, best_kept, best_waste = None, 0, float("inf")
    for width, height in resolutions:
        scale = min(width / w, height / h)
        kept = min(int(w * scale) * int(h * scale), w * h)  # a resolution above the image's keeps only its pixels
        if kept > best_kept or kept == best_kept and width * height - kept < best_waste:
            best, best_kept, best_waste = (width, height), kept, width * height - kept
    return best


def anyres_grid(size, grid_pinpoints, tile: int) -> tuple:
    """(columns, rows) of tiles for an image of size (w, h): its best resolution cut into tile x tile squares."""
    width, height = select_best_resolution(size, grid_pinpoints)
    return width // tile, height // tile


def anyres_tiles(image: Image.Image, tile: int, grid_pinpoints) -> list:
    """[the whole image resized to tile x tile] + the tiles, row by row, of the image fitted (aspect kept, bicubic)
    and centred on black at the best of grid_pinpoints (each a multiple of `tile`)."""
    width, height = select_best_resolution(image.size, grid_pinpoints)
    w, h = image.size
    scale_w, scale_h = width / w, height / h
    if scale_w < scale_h:  # the side that fills its target first; the other rounded up, within the target
        size = (width, min(math.ceil(h * scale_w), height))
    else:
        size = (min(math.ceil(w * scale_h), width), height)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(image.resize(size, Image.BICUBIC), ((width - size[0]) // 2, (height - size[1]) // 2))
    tiles = [canvas.crop((x, y, x + tile, y + tile)) for y in range(0, height, tile) for x in range(0, width, tile)]
    return [image.resize((tile, tile), Image.BICUBIC)] + tiles


def preprocess_anyres(image: Image.Image, image_size: int, grid_pinpoints) -> torch.Tensor:
    """One PIL image -> (1 + rows * cols, 3, S, S) float32: the overview, then the tiles (anyres_tiles), normalised.
    No reduction of large images: memory is the input's plus about the target width times the input height."""
    check_aspect_ratio(image.size, getattr(image, "filename", "") or "image")
    tiles = anyres_tiles(to_rgb(image), image_size, grid_pinpoints)
    return normalize(np.stack([np.asarray(t) for t in tiles]))  # (1 + n, 3, S, S)
