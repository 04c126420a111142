"""LoRA (Hu et al., 2021): fine-tune a frozen linear layer through a trainable low-rank update.

    y = x W^T + (alpha / r) * dropout(x) A^T B^T      W (out, in) frozen; A (r, in) and B (out, r) trained

A starts as PyTorch initialises a Linear weight (kaiming_uniform_, a=sqrt(5)) and B at zero, so B A = 0 and step 0
is exactly the base model. Only r * (in + out) numbers per layer train, so only they need gradients and optimizer
state. Dropout touches the adapter's input only: the frozen path sees x unchanged. After training, `merge_lora`
folds W += (alpha / r) B A into the weight and the model is an ordinary Llama again (same keys, same speed).
LLaVA-1.5's LoRA recipe (finetune_lora.sh) adapts every linear layer of the LLM's decoder blocks with r=128,
alpha=256, dropout 0.05 and trains the projector in full; tower, embeddings and lm_head get no adapter.

Keys: a LoRALinear holds its base's own `weight` Parameter, so `layers.0.self_attn.q_proj.weight` saves and loads
as before, and adds `layers.0.self_attn.q_proj.lora_A` (r, in) and `...q_proj.lora_B` (out, r) (inside LLaVA with
the `llm.` prefix). Frozen and trained tensors in one block are fine for FSDP2's `fully_shard` per block.

    apply_lora(model.llm, r=128, alpha=256, dropout=0.05)  # freezes the LLM except the adapters
    ... train: the trainable tensors are the adapters (+ whatever else requires grad, e.g. the projector) ...
    save_adapters(model, out, {"base_model": name})          # adapter.safetensors + adapter_config.json: MBs
    merge_lora(model)                                        # a plain LLaVA for save_pretrained, chat, export
    load_adapters(base_model, out)                           # the trained model again from the base + the file

train.py (stage 2 with lora_r > 0, e.g. --recipe llava-v1.5-lora) writes the merged model to --out and, beside it,
adapter.safetensors (adapters + projector (+ image_newline with anyres), fp32 adapters) with adapter_config.json (r,
alpha, dropout, targets, base_model, vision_tower, projector_type, template, image_aspect_ratio, and with anyres
image_grid_pinpoints and patch_merge_type). To rebuild the output from the base:

    model = LLaVA.from_parts(Llama.from_pretrained(base_llm_dir), formats.load_clip(clip_dir))  # --model, tower
    # (anyres: from_parts(..., image_aspect_ratio="anyres", image_grid_pinpoints=..., patch_merge_type=...))
    load_adapters(model, "runs/stage2")   # adapters and the trained projector; merge_lora(model) to fold them in
"""
import hashlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from fileio import read_json, require, save_tensors, write_json

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # all linears of a block
ADAPTER_FILE, CONFIG_FILE, FORMAT = "adapter.safetensors", "adapter_config.json", "llava-minimal-lora"


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. Keeps the base's Parameters (no copy, same names)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)
        self.bias = base.bias if base.bias is None else base.bias.requires_grad_(False)
        self.r, self.alpha, self.dropout, self.scaling = r, alpha, dropout, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        like = dict(device=self.weight.device, dtype=self.weight.dtype)  # meta stays meta, bf16 stays bf16
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **like))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **like))  # (out, r)
        self.reset_parameters()
        self.train(base.training)  # added to a model in eval mode: no dropout until it is put in train mode

    def reset_parameters(self) -> None:  # also the way to initialise after to_empty() on a meta-built model
        init_adapter(self.lora_A, self.lora_B)

    def forward(self, x):  # (..., in) -> (..., out)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def delta_weight(self):  # (out, in) in fp32: what merging adds to W (bf16 would round a small update away)
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"dropout={self.dropout}")


def init_adapter(lora_A, lora_B) -> None:
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))  # nn.Linear's own init (fan_in = in_features)
    nn.init.zeros_(lora_B)  # B A = 0: the adapted model starts as the base model


def initial_adapters(model: nn.Module, device="cpu") -> dict:
    """{"...lora_A": (r, in), "...lora_B": (out, r)}: real initial values for the adapters of a model built on meta,
    drawn from the global RNG in the order apply_lora draws them on a real model: after the same seed and the same
    draws before it, they equal that model's adapters."""
    values = {}
    for name, module in model.named_modules():  # apply_lora's order: block by block, each block's linears in order
        if isinstance(module, LoRALinear):
            A, B = (torch.empty(p.shape, dtype=p.dtype, device=device) for p in (module.lora_A, module.lora_B))
            init_adapter(A, B)
            values.update({f"{name}.lora_A": A, f"{name}.lora_B": B})
    return values


def apply_lora(llm: nn.Module, r: int, alpha: float, dropout: float = 0.0, targets=TARGETS) -> int:
    """Adapters on the `targets` linears of every decoder block (llm.layers[i].self_attn.* and .mlp.*), nothing
    elsewhere; every other LLM tensor is frozen. Works on meta-built models. Returns the number of adapted layers."""
    if r < 1 or any(t not in TARGETS for t in targets):
        raise ValueError(f"LoRA needs r >= 1 (got {r}) and targets among {TARGETS} (got {tuple(targets)})")
    if any(isinstance(m, LoRALinear) for m in llm.modules()):
        raise ValueError("the model has LoRA adapters already")
    llm.requires_grad_(False)
    adapted = []
    for block in llm.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if name in targets and type(child) is nn.Linear:
                    widest = min(child.in_features, child.out_features)  # B A has at most this rank anyway
                    if r > widest:
                        raise ValueError(f"LoRA rank r={r} is wider than {name} ({child.out_features} x "
                                         f"{child.in_features}): r must be at most {widest}")
                    setattr(parent, name, LoRALinear(child, r, alpha, dropout))
                    adapted.append(name)
    missing = [t for t in targets if adapted.count(t) != len(llm.layers)]
    if missing:
        raise ValueError(f"targets {missing} are not a linear layer in every decoder block")
    return len(adapted)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its weight, W + (alpha / r) B A (fp32, then W's dtype), and put a plain
    nn.Linear back: the state_dict holds exactly the base keys again. Run it on a gathered, unsharded model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():  # a new tensor: one shared with others (a state_dict taken earlier) stays
                    merged = (child.weight.float() + child.delta_weight()).to(child.weight.dtype)
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                linear.weight = nn.Parameter(merged, requires_grad=child.weight.requires_grad)
                linear.bias = child.bias
                setattr(parent, name, linear.train(child.training))
    return model


def lora_state_dict(model: nn.Module) -> dict:
    """The adapters only: {"...q_proj.lora_A": (r, in), "...q_proj.lora_B": (out, r), ...}."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def adapter_state_dict(model: nn.Module) -> dict:
    """What a LoRA run trains: the adapters, plus in a LLaVA `projector.*` and LLaVA-1.6's `image_newline` (stage 2
    trains them in full)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B")) or
            k.startswith("projector.") or k == "image_newline"}


def lora_config(model: nn.Module) -> dict:
    """{"r", "alpha", "dropout", "targets"} read from the model's adapters (one setting for all of them)."""
    layers = [(name.rsplit(".", 1)[-1], m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    settings = {(m.r, m.alpha, m.dropout) for _, m in layers}
    if len(settings) != 1:
        raise ValueError(f"expected adapters with one (r, alpha, dropout) setting, found {sorted(settings)}")
    (r, alpha, dropout), names = settings.pop(), {name for name, _ in layers}
    return {"r": r, "alpha": alpha, "dropout": dropout, "targets": [t for t in TARGETS if t in names]}


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of the frozen LLM weights that adapters are trained on (the first values of every tensor, in bf16
    so that an fp32 and a bf16 load of one base agree): adapters belong to one base, not to any of its shape."""
    digest = hashlib.sha256()
    llm = getattr(model, "llm", model)
    for name, value in sorted(llm.state_dict().items()):
        if not name.endswith((".lora_A", ".lora_B")):
            digest.update(name.encode() + value.detach().flatten()[:256].to(torch.bfloat16).view(torch.int16).cpu()
                          .numpy().tobytes())
    return digest.hexdigest()[:16]


def save_adapters(model: nn.Module, path, info: dict | None = None) -> None:
    """Folder `path` gets adapter.safetensors (adapter_state_dict) and adapter_config.json (lora_config, the base's
    fingerprint and info, e.g. {"base_model": ...}). Beside a merged checkpoint's files, none of which it overwrites."""
    config = {"format": FORMAT, **lora_config(model), "base_fingerprint": base_fingerprint(model), **(info or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    os.makedirs(path, exist_ok=True)
    save_tensors(os.path.join(path, ADAPTER_FILE), tensors)
    write_json(os.path.join(path, CONFIG_FILE), config)


def load_adapters(model: nn.Module, path) -> dict:
    """Saved adapters (and projector, image_newline) onto a base LLaVA or Llama: apply_lora with the saved settings
    unless the model has adapters already (they must match), then a strict load into its tensors. Returns the saved
    config."""
    config_file, file = os.path.join(path, CONFIG_FILE), os.path.join(path, ADAPTER_FILE)
    config = read_json(config_file)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{config_file}: not a LoRA adapter config (no 'format': '{FORMAT}')")
    saved = {k: require(config, k, config_file) for k in ("r", "alpha", "dropout", "targets")}
    if config.get("base_fingerprint", base_fingerprint(model)) != base_fingerprint(model):
        raise ValueError(f"{config_file}: the adapters were trained on another base model than this one "
                         f"(base_model: {config.get('base_model')!r}); load that base first")
    if not any(isinstance(m, LoRALinear) for m in model.modules()):
        apply_lora(getattr(model, "llm", model), saved["r"], saved["alpha"], saved["dropout"], saved["targets"])
    elif lora_config(model) != saved:
        raise ValueError(f"{config_file}: adapters {saved}, the model has {lora_config(model)}")
    tensors, expected = load_file(file), adapter_state_dict(model)
    for key, shape in ((k, tuple(v.shape)) for k, v in expected.items()):
        if key not in tensors:
            raise KeyError(f"{file}: missing key {key!r} (expected shape {shape})")
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{file}: key {key!r} has shape {tuple(tensors[key].shape)}, expected {shape}")
    unexpected = sorted(tensors.keys() - expected.keys())
    if unexpected:
        raise KeyError(f"{file}: unexpected key {unexpected[0]!r}")
    with torch.no_grad():
        for key, value in tensors.items():
            model.get_parameter(key).copy_(value)
    return config
