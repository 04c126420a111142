"""LLaMA decoder in plain PyTorch: RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU.

Loads and saves Hugging Face `LlamaForCausalLM` folders (config.json + safetensors, single file or sharded) with the
same tensor names minus the "model." prefix, so LLaMA-2, Vicuna, TinyLlama and SmolLM checkpoints load unchanged.
The checkpoint readers here (`load_checkpoint`, `load_strict`) are shared by clip.py, llava.py and formats.py, which
maps every other layout (pickle `.bin` shards, the original LLaVA release, llava-hf) onto these names.
Also here: a static KV cache indexed by token positions (prefill and decode share one forward), the sentencepiece
tokenizer with a streaming decoder, and sampling / generation, one prompt (`generate`, streaming) or a batch of
prompts of different lengths (`generate_batch`, left-padded).

    model = Llama.from_pretrained("path/to/vicuna-7b-v1.5", device="cuda", dtype=torch.bfloat16)
    tok = Tokenizer("path/to/vicuna-7b-v1.5")
    model.setup_cache(1, 512)
    ids = torch.tensor([tok.encode("Hello")], device="cuda")
    print(tok.decode(list(generate(model, ids, max_new_tokens=20))))

Not implemented (refused when a config asks for it): biases in attention/MLP, activations other than SiLU,
RoPE scaling other than "linear" (e.g. Llama-3's "llama3", "dynamic", "yarn").
"""
import os
import typing
from dataclasses import MISSING, asdict, dataclass, fields

import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch.utils.checkpoint import checkpoint

from fileio import read_json, save_tensors, write_json


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # SwiGLU width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # < num_attention_heads: grouped-query attention (TinyLlama, SmolLM)
    rms_norm_eps: float = 1e-5  # LLaMA-2 uses 1e-5, LLaMA-1 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens' weight (small models)
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0  # LLaMA has no pad token; LLaVA pads with unk (id 0)
    rope_scaling_factor: float = 1.0  # "linear" RoPE scaling: positions divided by this factor
    head_dim: int = 0  # 0: hidden_size // num_attention_heads

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, d: dict, source="config.json") -> "LlamaConfig":
        """An HF LlamaConfig dict; `source` (the file) is named in every error."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"{source}: model_type {d['model_type']!r} is not supported (only 'llama')")
        for key, allowed in [("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")]:
            if key in d and d[key] != allowed:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported (only {allowed!r})")
        # transformers < 5 writes rope_theta + rope_scaling at top level; >= 5 writes one rope_parameters dict
        rope = dict(d.get("rope_parameters") or {})
        rope.update(d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise ValueError(f"{source}: rope scaling type {rope_type!r} is not supported (only 'default', 'linear')")
        if isinstance(d.get("eos_token_id"), list):
            raise ValueError(f"{source}: several eos_token_id {d['eos_token_id']} are not supported (one id expected)")
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        values = {k: d[k] for k in sizes if k in d}  # required: a missing one is named by typed_fields
        get = lambda key, default: default if d.get(key) is None else d[key]  # noqa: E731  (null = not given)
        values.update(num_key_value_heads=get("num_key_value_heads", d.get("num_attention_heads")),
                      rms_norm_eps=get("rms_norm_eps", 1e-6), rope_theta=get("rope_theta", rope.get("rope_theta", 1e4)),
                      max_position_embeddings=get("max_position_embeddings", 2048),
                      tie_word_embeddings=get("tie_word_embeddings", False), bos_token_id=get("bos_token_id", 1),
                      eos_token_id=get("eos_token_id", 2), pad_token_id=get("pad_token_id", 0),
                      rope_scaling_factor=rope.get("factor", 1.0) if rope_type == "linear" else 1.0,
                      head_dim=get("head_dim", 0))
        return cls(**typed_fields(cls, values, source))

    def to_hf(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "rope_scaling_factor"}
        scaling = {"type": "linear", "rope_type": "linear", "factor": self.rope_scaling_factor}
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02, "use_cache": True,
                "rope_scaling": scaling if self.rope_scaling_factor != 1.0 else None, **d}

    @classmethod
    def from_name(cls, name: str) -> "LlamaConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])


PRESETS = {  # sizes from the published config.json files
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024),
    "smollm-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                        bos_token_id=0, eos_token_id=0),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "llama-2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096),
}
PRESETS["vicuna-7b"] = PRESETS["llama-2-7b"]  # Vicuna-7B v1.5 (LLaVA-1.5's LLM) is a LLaMA-2-7B fine-tune


def typed_fields(cls, values: dict, source) -> dict:
    """`values` checked against the dataclass `cls`'s field types where config input enters: JSON holds "64" or 4.0
    as easily as 64, and either would otherwise fail deep inside the model. ints stay ints (4.0 is refused), an int
    is a fine float; a missing field without a default is named."""
    out = {}
    for f in fields(cls):
        if f.name not in values:
            if f.default is MISSING:
                raise ValueError(f"{source}: missing {f.name!r}")
            continue
        value, kinds = values[f.name], typing.get_args(f.type) or (f.type,)  # `int | None` -> (int, NoneType)
        if type(value) not in kinds and not (float in kinds and type(value) is int):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise ValueError(f"{source}: {f.name} is {value!r}, expected {names}")
        out[f.name] = float(value) if float in kinds and type(value) is int else value
    return out


# ---------------------------------------------------------------------------------------------------- the model

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32 (bf16 squares overflow/lose precision), cast back, then scale: the order HF uses
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(config: LlamaConfig, positions, dtype):
    """cos/sin tables for the given positions, computed on the fly (cheap) so no buffer survives meta-device init."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
    inv_freq = inv_freq / config.rope_scaling_factor  # (hd/2,)
    freqs = positions.float()[..., None] * inv_freq  # (T, hd/2), or (B, T, hd/2) for per-row positions
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, hd): rotate_half layout, pairs (i, i + hd/2)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):  # x (B, H, T, hd), cos/sin (T, hd) or (B, 1, T, hd)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.k_cache = self.v_cache = None  # (B, n_kv, L, hd) once Llama.setup_cache ran; plain tensors, not state

    def forward(self, x, cos, sin, input_pos=None, kv_len=None, mask=None, rows=slice(None)):
        """rows: the KV-cache rows of the batch's rows (a slice; Llama.forward's cache_row)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is None:  # plain causal forward, no cache
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads < self.n_heads)
        else:
            self.k_cache[rows].index_copy_(2, input_pos, k)
            self.v_cache[rows].index_copy_(2, input_pos, v)
            # attend over the filled prefix only, not the whole preallocated buffer
            k, v = self.k_cache[rows, :, :kv_len], self.v_cache[rows, :, :kv_len]  # (B, Hkv, L, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=self.n_kv_heads < self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):  # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, input_pos=None, kv_len=None, mask=None, rows=slice(None)):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, kv_len, mask, rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """LlamaForCausalLM. state_dict keys == the HF keys without the "model." prefix (lm_head.weight unchanged)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.cache_len = 0  # max_seq_len of the KV cache, 0 when there is none
        self.gradient_checkpointing = False  # training: recompute each block in backward instead of storing it
        self.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share lm_head's weight with embed_tokens when the config says so. Call it again after to_empty() or
        load_state_dict(assign=True): both replace Parameters and so break the sharing."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @staticmethod
    def _init_weights(module):  # HF's initializer_range 0.02 (PyTorch's default Linear init is for other nets)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def check_cache_len(self, max_seq_len: int) -> None:
        if not 0 < max_seq_len <= self.config.max_position_embeddings:
            raise ValueError(f"KV cache length {max_seq_len} is not in 1..max_position_embeddings="
                             f"{self.config.max_position_embeddings}")

    def setup_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None) -> None:
        """Preallocate the KV cache: forward(..., input_pos) then writes and reads positions < max_seq_len."""
        self.check_cache_len(max_seq_len)
        device = device or self.norm.weight.device  # norm weights: never quantized (quantize.py)
        dtype = dtype or self.norm.weight.dtype
        c = self.config
        shape = (batch_size, c.num_key_value_heads, max_seq_len, c.head_dim)
        with torch.inference_mode(False):  # usable later outside inference mode too
            for layer in self.layers:
                layer.self_attn.k_cache = torch.zeros(shape, device=device, dtype=dtype)
                layer.self_attn.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_len = max_seq_len

    def grow_cache(self, max_seq_len: int) -> None:
        """Re-allocate the KV cache longer, keeping what it holds (chat sizes it to the conversation, not to the
        longest context up front). One layer at a time: at most one layer's old copy is alive with the new cache."""
        assert self.cache_len, "grow_cache needs a cache: setup_cache first"
        self.check_cache_len(max_seq_len)
        if max_seq_len <= self.cache_len:
            return
        with torch.inference_mode(False):
            for attn in (layer.self_attn for layer in self.layers):
                for name in ("k_cache", "v_cache"):
                    old = getattr(attn, name)  # (B, n_kv, L_old, hd)
                    new = old.new_zeros(*old.shape[:2], max_seq_len, old.shape[3])  # (B, n_kv, L, hd)
                    new[:, :, :old.shape[2]] = old
                    setattr(attn, name, new)
        self.cache_len = max_seq_len

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = None
        self.cache_len = 0

    def forward(self, input_ids=None, inputs_embeds=None, input_pos=None, left_pad=None, last_only=False,
                cache_row=0, head=True):
        """input_pos (T,): increasing KV-cache slots of the tokens (setup_cache first); None: positions 0..T-1.
        left_pad (B,): generate_batch's left padding, row b's first real token is in slot left_pad[b]: its RoPE
        positions count from 0 there and no token attends to a padding slot. last_only: logits of the last
        position only (all generation needs; a prompt's (B, T, vocab) would be large). cache_row: batch row b uses
        KV-cache row cache_row + b (generate_batch prefills a batch in groups of rows)."""
        assert (input_ids is None) != (inputs_embeds is None), "pass exactly one of input_ids and inputs_embeds"
        assert left_pad is None or input_pos is not None, "left_pad needs the KV cache (input_pos)"
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T = x.shape[:2]
        kv_len, mask, rows = None, None, slice(cache_row, cache_row + B)  # no cache: plain causal attention
        positions = torch.arange(T, device=x.device) if input_pos is None else input_pos  # (T,)
        if input_pos is not None:
            kv_len = int(input_pos[-1]) + 1  # the last token sees the longest prefix
            assert kv_len <= self.cache_len, f"position {kv_len - 1} is past the KV cache ({self.cache_len} slots)"
            slots = torch.arange(kv_len, device=x.device)  # (L,)
            if left_pad is not None:  # token i of row b sees slots left_pad[b]..input_pos[i]; a padding token only
                # itself: a query without keys gives NaN, and a NaN key spoils every query (NaN x 0 weight = NaN)
                mask = ((slots <= input_pos[:, None]) & (slots >= left_pad[:, None, None])
                        | (slots == input_pos[:, None]))[:, None]  # (B, 1, T, L): the same for every head
                positions = (input_pos - left_pad[:, None]).clamp(min=0)  # (B, T)
            elif T > 1 and kv_len != T:  # prefill after earlier positions: token i sees cache slots <= input_pos[i]
                mask = slots[None, :] <= input_pos[:, None]  # (T, L)
        cos, sin = rope_cos_sin(self.config, positions, x.dtype)  # (T, hd), or (B, T, hd) with left_pad
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): the same for every head
        for layer in self.layers:
            args = (x, cos, sin, input_pos, kv_len, mask, rows)
            x = (checkpoint(layer, *args, use_reentrant=False) if self.gradient_checkpointing and self.training
                 else layer(*args))
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        x = self.norm(x)  # head=False: these hidden states (B, T, C), for a loss that runs lm_head where labels are
        return self.lm_head(x) if head else x  # (B, T, vocab), (B, 1, vocab) when last_only

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32) -> "Llama":
        """An HF LlamaForCausalLM folder: config.json + model.safetensors or a sharded model.safetensors index."""
        config_file = os.path.join(path, "config.json")
        config = LlamaConfig.from_hf(read_json(config_file), config_file)
        with torch.device("meta"):  # no memory until the checkpoint tensors are assigned
            model = cls(config)
        tensors, files = load_checkpoint(path, device, skip=lambda key: "rotary_emb.inv_freq" in key)
        return load_strict(model, tensors, files, hf_to_llama_keys, llama_to_hf_keys, device, dtype).eval()

    def save_pretrained(self, path) -> None:
        os.makedirs(path, exist_ok=True)
        sd = llama_to_hf_keys(self.state_dict())
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight")  # HF layout: the tied head is not stored
        save_tensors(os.path.join(path, "model.safetensors"), {k: v.detach().contiguous().cpu() for k, v in sd.items()})
        write_json(os.path.join(path, "config.json"), self.config.to_hf())


# ------------------------------------------------------------------------------------------------- checkpoints
# Shared by every loader (clip.py, llava.py, formats.py): read tensors and the file each came from, then fill a
# meta-device model strictly. Old HF checkpoints also stored "rotary_emb.inv_freq", a recomputable buffer: skipped.

def hf_to_llama_keys(sd: dict) -> dict:
    return {k.removeprefix("model."): v for k, v in sd.items()}


def llama_to_hf_keys(sd: dict) -> dict:
    return {k if k.startswith("lm_head.") else "model." + k: v for k, v in sd.items()}


def read_index(index) -> dict:
    """A shard index (NAME.index.json) as {tensor name: shard file}; every shard must lie inside the index's folder."""
    content = read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: no 'weight_map' {{tensor name: shard file}}")
    folder = os.path.dirname(os.path.abspath(index))
    files = {}
    for key, shard in weight_map.items():
        # lexical check (not realpath): the HF hub cache links every file to a blob outside the folder
        file = os.path.normpath(os.path.join(folder, shard))
        if os.path.commonpath([folder, file]) != folder:
            raise ValueError(f"{index}: shard {shard!r} of {key!r} lies outside the checkpoint folder")
        files[key] = file
    return files


def read_safetensors(file, device="cpu", skip=lambda key: False) -> dict:
    try:
        with safe_open(file, framework="pt", device=str(device)) as f:  # reads only the tensors asked for
            return {k: f.get_tensor(k) for k in f.keys() if not skip(k)}
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def load_checkpoint(path, device="cpu", skip=lambda key: False, single="model.safetensors", read=read_safetensors):
    """(tensors, {key: the file it came from}) from one file, or from a folder holding `single` or its shard index
    `single`.index.json. Skipped keys are never read. formats.py passes single="pytorch_model.bin", read=read_bin."""
    path = os.fspath(path)
    index = os.path.join(path, single + ".index.json")
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, single)):
        weight_map = None
        shards = [path if os.path.isfile(path) else os.path.join(path, single)]
    elif os.path.isfile(index):
        weight_map = read_index(index)
        shards = sorted(set(weight_map.values()))
    else:
        raise FileNotFoundError(f"{path}: no {single} or {single}.index.json")
    tensors, files = {}, {}
    for shard in shards:
        if not os.path.isfile(shard):
            raise FileNotFoundError(f"{index} lists shard {shard}, which does not exist")
        part = read(shard, device, skip)
        for key in [k for k, s in (weight_map or {}).items() if s == shard and not skip(k) and k not in part]:
            raise KeyError(f"{shard}: key {key!r} listed in {index} is not in the shard")
        files.update(dict.fromkeys(part, shard))
        tensors.update(part)
    return tensors, files


def load_strict(model, tensors: dict, files: dict, to_model=None, to_file=None, device="cpu", dtype=torch.float32):
    """Fill a (meta-device) `model` from checkpoint `tensors` (file names; `files`: name -> file) renamed by `to_model`
    (its inverse `to_file` names what is missing), strictly: every parameter present with its shape and, where a
    weight is expected, a floating dtype; nothing unexpected. Errors name the key and the file. A tied parameter (one
    Parameter under two names) is read once, under its first name. `tensors` is emptied as it is converted: each
    file tensor is freed once converted to `dtype`, so there is never a second copy of the whole model."""
    to_model, to_file = to_model or (lambda sd: sd), to_file or (lambda sd: sd)
    sources = sorted(set(files.values()))  # named for a missing key: the one file, or the folder of the shards
    folder = sources[0] if len(sources) == 1 else os.path.commonpath([os.path.dirname(s) for s in sources] or ["."])
    names = to_model({k: k for k in tensors})  # model key -> key in the file
    if len(names) < len(tensors):
        raise KeyError(f"{folder}: several tensors map to one key: {sorted(set(tensors) - set(names.values()))}")
    state = dict(to_model(tensors))  # a new dict even for the identity map: the caller's is emptied
    tensors.clear()
    params, first, tied = model.state_dict(keep_vars=True), {}, {}
    for key, p in params.items():
        tied[key] = first.setdefault(id(p), key)
    tied = {k: v for k, v in tied.items() if k != v}  # alias -> the name it is stored under
    for key, p in params.items():
        if key in tied:
            continue
        where = f"{files[names[key]]}: key {names[key]!r}" if key in state else ""
        if key not in state:
            name = next(iter(to_file({key: 0})))
            raise KeyError(f"{folder}: missing key {name!r}{f' ({key})' if name != key else ''} "
                           f"(expected shape {tuple(p.shape)})")
        if tuple(state[key].shape) != tuple(p.shape):
            raise ValueError(f"{where} has shape {tuple(state[key].shape)}, expected {tuple(p.shape)}")
        if p.is_floating_point() and not state[key].is_floating_point():
            raise ValueError(f"{where} holds {state[key].dtype}, expected a floating-point weight")
    for key in state:
        if key not in params or key in tied:
            raise KeyError(f"{files[names[key]]}: unexpected key {names[key]!r}")
    for key, value in state.items():  # in place: each file tensor is freed as soon as it is converted
        state[key] = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
    state.update({alias: state[key] for alias, key in tied.items()})
    model.load_state_dict(state, strict=True, assign=True)
    for alias, key in tied.items():  # assign=True made two Parameters of the shared one: share it again
        module, _, name = alias.rpartition(".")
        setattr(model.get_submodule(module), name, model.get_parameter(key))
    return model


# ---------------------------------------------------------------------------------------------------- tokenizer

class Tokenizer:
    def __init__(self, path):
        file = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else os.fspath(path)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no sentencepiece tokenizer at {file}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=file)
        except (RuntimeError, OSError) as e:  # sentencepiece's own message names neither the file nor the cause
            raise ValueError(f"{file}: not a sentencepiece model ({e})") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()  # LLaVA pads with unk
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str, bos=True, eos=False) -> list:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:  # ids past the vocabulary (llava-hf pads its 32000 to 32064 rows) decode to ""
        return self.sp.decode([i for i in map(int, ids) if 0 <= i < self.vocab_size])

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental decoding: push ids one by one, get the new text. Decoding the whole sequence every time (not
    piece by piece) keeps sentencepiece's leading-space rule and byte-fallback characters exactly as decode()."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token_id) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete: wait for its next byte
            return ""
        new, self.text = text[len(self.text):], text
        return new

    def flush(self) -> str:  # what push held back if the ids end inside a character (decode shows U+FFFD)
        text = self.tokenizer.decode(self.ids)
        new, self.text = text[len(self.text):], text
        return new


# --------------------------------------------------------------------------------------------------- generation

def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """logits (B, V) -> token ids (B,). temperature 0: greedy; top_p < 1: nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop[..., 0] = False  # top_p <= 0 would drop every token
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: Llama, input_ids=None, inputs_embeds=None, *, max_new_tokens: int, temperature=0.0, top_p=1.0,
             eos_id=None, start_pos=0, generator=None):
    """Yield new token ids (batch 1). The caller runs model.setup_cache first; positions < start_pos are reused."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("generate takes exactly one of input_ids and inputs_embeds")
    prompt = input_ids if input_ids is not None else inputs_embeds
    if prompt.shape[0] != 1:
        raise ValueError("generate takes one prompt: input_ids (1, T) or inputs_embeds (1, T, C)")
    T = prompt.shape[1]
    if start_pos + T + max_new_tokens > model.cache_len:
        raise ValueError(f"start_pos {start_pos} + prompt {T} + max_new_tokens {max_new_tokens} > KV cache length "
                         f"{model.cache_len}: call model.setup_cache(1, L) with a larger L")
    device = prompt.device
    positions = torch.arange(start_pos, start_pos + T + max_new_tokens, device=device)
    logits = model(input_ids=input_ids, inputs_embeds=inputs_embeds, input_pos=positions[:T], last_only=True)[:, -1]
    for i in range(max_new_tokens):
        token = sample(logits.float(), temperature, top_p, generator)  # (1,)
        token_id = int(token)
        yield token_id
        if token_id == eos_id or i == max_new_tokens - 1:
            return
        logits = model(input_ids=token.view(1, 1), input_pos=positions[T + i:T + i + 1], last_only=True)[:, -1]


@torch.inference_mode()
def generate_batch(model: Llama, prompts, *, max_new_tokens: int, temperature=0.0, top_p=1.0, eos_id=None,
                   generator=None) -> list:
    """New token ids for each prompt, a list per prompt; an EOS ends its row and is included, as generate yields it.
    prompts: token-id lists (or 1-D tensors) of any lengths, or embedding tensors (T_i, C) (LLaVA's prompts).

    Left padding: the prompts are right-aligned (T = the longest), so every row's next token goes into the same
    cache slot T + i and one forward decodes all rows, with the batch-1 KV cache code. The padding slots are masked
    out and each row's RoPE positions start at 0 at its first real token (Llama.forward's left_pad), so a row
    computes what it computes alone: greedy output equals generate's for the prompt alone (fp32; batched matmuls
    round differently in the last bits). Padding would cost prefill compute (a third of it for lengths drawn from
    16..64), so the rows are sorted longest first and prefilled in groups whose lengths are within 3/4 of the
    group's first, each group from its own longest prompt's first slot. Finished rows are dropped from the batch,
    their cache rows compacted, once they are a quarter of it. The KV cache is set up here (B rows, T +
    max_new_tokens slots) unless the model's is large enough, and kept for the next call; model.reset_cache()
    frees it. Cache slots before a group's first slot are not written, only masked: setup_cache zero-fills them."""
    if not prompts:
        return []
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty: generation needs at least one token")
    device = model.norm.weight.device
    B, T = len(prompts), max(lengths)
    rows = sorted(range(B), key=lambda b: -lengths[b])  # rows[j]: the prompt batch row j decodes, None once done
    embeds = torch.is_tensor(prompts[0]) and prompts[0].is_floating_point()
    x = (prompts[0].new_zeros(B, T, prompts[0].shape[-1]) if embeds  # (B, T, C): padding is never attended
         else torch.full((B, T), model.config.pad_token_id, dtype=torch.long, device=device))  # (B, T)
    for j, b in enumerate(rows):
        x[j, T - lengths[b]:] = torch.as_tensor(prompts[b], device=device)  # right-aligned
    left_pad = torch.tensor([T - lengths[b] for b in rows], device=device)  # (B,)
    cache = model.layers[0].self_attn.k_cache
    if cache is None or cache.shape[0] < B or model.cache_len < T + max_new_tokens:
        model.setup_cache(B, T + max_new_tokens)
    slots = torch.arange(T + max_new_tokens, device=device)
    logits, start = [], 0
    while start < B:  # prefill, a group of rows of similar lengths at a time
        end, first = start + 1, T - lengths[rows[start]]  # first: the slot of the group's first real token
        while end < B and 4 * lengths[rows[end]] >= 3 * lengths[rows[start]]:
            end += 1
        logits.append(model(**{"inputs_embeds" if embeds else "input_ids": x[start:end, first:]},
                            input_pos=slots[first:T], left_pad=left_pad[start:end], last_only=True,
                            cache_row=start)[:, -1])  # (rows, V)
        start = end
    logits, out = torch.cat(logits), [[] for _ in prompts]  # (B, V)
    for i in range(max_new_tokens):
        tokens = sample(logits.float(), temperature, top_p, generator)  # (B',)
        for row, token in zip(rows, tokens.tolist()):
            if row is not None:
                out[row].append(token)
        rows = [None if row is None or out[row][-1] == eos_id else row for row in rows]
        live = [j for j, row in enumerate(rows) if row is not None]
        if not live or i == max_new_tokens - 1:
            break
        if len(live) <= 3 * len(rows) // 4:  # a quarter has finished: move the live rows up, decode only those
            index = torch.tensor(live, device=device)
            for layer in model.layers:
                for cache in (layer.self_attn.k_cache, layer.self_attn.v_cache):  # (B, n_kv, L, hd)
                    cache[:len(live), :, :T + i] = cache[index, :, :T + i]  # slots filled so far
            rows, tokens, left_pad = [rows[j] for j in live], tokens[index], left_pad[index]
        logits = model(tokens[:, None], input_pos=slots[T + i:T + i + 1], left_pad=left_pad, last_only=True)[:, -1]
    return out
