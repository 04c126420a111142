"""LLaMA decoder in plain PyTorch: RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU, and a static
KV cache indexed by token positions, so that prefill and decode share one forward. Module names are Hugging Face's
LlamaForCausalLM names without "model.": LLaMA-2, Vicuna, TinyLlama and SmolLM folders load by renaming keys.

    model = Llama.from_pretrained("vicuna-7b-v1.5", device="cuda", dtype=torch.bfloat16)
    model.setup_cache(1, 512)
    ids = torch.tensor([Tokenizer("vicuna-7b-v1.5").encode("Hello")], device="cuda")
    new_ids = list(generate(model, ids, max_new_tokens=20))   # one prompt; batches of prompts: inference.py

Mistral (model_type "mistral") is this architecture with a sliding attention window: every token attends to at
most `sliding_window` earlier tokens, which changes nothing while a sequence fits in the window, so such a model
runs sequences up to the window and a longer KV cache is refused.
Refused when a config asks for them: attention/MLP biases, activations but SiLU, RoPE scaling but "linear".
"""
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checkpoint import load_checkpoint, load_strict, typed_fields
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
    sliding_window: int | None = None  # Mistral: attention spans this many tokens; None: the whole sequence

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
        if d.get("model_type") not in (None, "llama", "mistral"):
            raise ValueError(f"{source}: model_type={d['model_type']!r} is not supported (only 'llama', 'mistral')")
        for key, allowed in [("attention_bias", False), ("mlp_bias", False),
                             ("hidden_act", "silu")]:
            if key in d and d[key] != allowed:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported (only {allowed!r})")
        # transformers < 5 writes rope_theta + rope_scaling at top level; >= 5 writes one rope_parameters dict
        rope = dict(d.get("rope_parameters") or {})
        rope.update(d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise ValueError(f"{source}: rope scaling type {rope_type!r} is not supported (only 'default', 'linear')")
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        values = {k: d[k] for k in sizes if k in d}  # required: a missing one is named by typed_fields
        get = lambda key, default: default if d.get(key) is None else d[key]  # noqa: E731  (null = not given)
        values.update(num_key_value_heads=get("num_key_value_heads", d.get("num_attention_heads")),
                      rms_norm_eps=get("rms_norm_eps", 1e-6), rope_theta=get("rope_theta", rope.get("rope_theta", 1e4)),
                      max_position_embeddings=get("max_position_embeddings", 2048),
                      tie_word_embeddings=get("tie_word_embeddings", False), bos_token_id=get("bos_token_id", 1),
                      eos_token_id=get("eos_token_id", 2), pad_token_id=get("pad_token_id", 0),
                      rope_scaling_factor=rope.get("factor", 1.0) if rope_type == "linear" else 1.0,
                      head_dim=get("head_dim", 0), sliding_window=d.get("sliding_window"))
        return cls(**typed_fields(cls, values, source))

    def to_hf(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "rope_scaling_factor"}
        scaling = {"type": "linear", "rope_type": "linear", "factor": self.rope_scaling_factor}
        kind = ("MistralForCausalLM", "mistral") if self.sliding_window else ("LlamaForCausalLM", "llama")
        if not self.sliding_window:
            d.pop("sliding_window")
        return {"architectures": [kind[0]], "model_type": kind[1], "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02, "use_cache": True,
                "rope_scaling": scaling if self.rope_scaling_factor != 1.0 else None, **d}

    @property
    def context_len(self) -> int:
        """The longest sequence the model runs exactly: its positions, and a sliding window's span."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

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


# ---------------------------------------------------------------------------------------------------- the model

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # normalise in fp32 (bf16 squares overflow), cast back, then scale: the order HF uses
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(config: LlamaConfig, positions, dtype):
    """cos/sin tables for the given positions, computed on the fly (cheap) so no buffer survives meta-device init."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
    inv_freq = inv_freq / config.rope_scaling_factor  # (hd/2,)
    freqs = positions.float()[..., None] * inv_freq  # (T, hd/2), or (B, T, hd/2) for per-row positions
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, hd): rotate_half layout, pairs (i, i + hd/2)
    emb = emb[:, None] if emb.dim() == 3 else emb  # (B, 1, T, hd) for per-row positions: the same for every head
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x (B, H, T, hd), cos/sin (T, hd) or (B, 1, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # rotate_half: HF's layout, Q/K weights load unpermuted


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.k_cache = self.v_cache = None  # (B, n_kv, L, hd) once Llama.setup_cache ran; plain tensors, not state

    def forward(self, x, cos, sin, input_pos=None, kv_len=None, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:  # write this step's keys/values, attend over the filled prefix of the cache
            self.k_cache.index_copy_(2, input_pos, k)
            self.v_cache.index_copy_(2, input_pos, v)
            k, v = self.k_cache[:, :, :kv_len], self.v_cache[:, :, :kv_len]  # (B, Hkv, L, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_heads < self.n_heads)  # (B, H, T, hd)
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

    def forward(self, x, cos, sin, input_pos=None, kv_len=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, kv_len, mask)
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
        self.cache_len = 0  # positions of the KV cache, 0 when there is none
        self.gradient_checkpointing = False  # training: recompute each block in backward instead of storing it
        for module in self.modules():  # HF's initializer_range 0.02 (PyTorch's default init is for other nets)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        self.tie_weights()

    def tie_weights(self) -> None:  # again after to_empty() or load_state_dict(assign=True), which break sharing
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def check_cache_len(self, max_seq_len: int) -> None:
        c = self.config
        if not 0 < max_seq_len <= c.context_len:
            limit = f"sliding_window={c.sliding_window} (longer sequences need windowed attention, which this model " \
                    "does not implement)" if c.context_len < c.max_position_embeddings else \
                    f"max_position_embeddings={c.max_position_embeddings}"
            raise ValueError(f"KV cache length {max_seq_len} is not in 1..{c.context_len}: {limit}")

    def setup_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None) -> None:
        """Preallocate the KV cache: forward(..., input_pos) then writes and reads positions < max_seq_len."""
        self.check_cache_len(max_seq_len)
        shape = (batch_size, self.config.num_key_value_heads, max_seq_len, self.config.head_dim)
        like = dict(device=device or self.norm.weight.device, dtype=dtype or self.norm.weight.dtype)  # never int8
        with torch.inference_mode(False):  # usable later outside inference mode too
            for attn in (layer.self_attn for layer in self.layers):
                attn.k_cache, attn.v_cache = torch.zeros(shape, **like), torch.zeros(shape, **like)
        self.cache_len = max_seq_len

    def grow_cache(self, max_seq_len: int) -> None:
        """A longer KV cache keeping its entries (chat sizes it to the conversation, not to the longest context up
        front), one layer at a time: at most one layer's old copy is alive beside the new cache."""
        self.check_cache_len(max_seq_len)
        with torch.inference_mode(False):
            for attn in (layer.self_attn for layer in self.layers):
                for name in ("k_cache", "v_cache"):
                    old = getattr(attn, name)  # (B, n_kv, L_old, hd) -> (B, n_kv, L, hd), zeros after the old entries
                    setattr(attn, name, F.pad(old, (0, 0, 0, max(0, max_seq_len - old.shape[2]))))
        self.cache_len = max(max_seq_len, self.cache_len)

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = None
        self.cache_len = 0

    def forward(self, input_ids=None, inputs_embeds=None, input_pos=None, mask=None, positions=None, last_only=False,
                head=True):
        """Logits (B, T, vocab) of token ids (B, T) or embeddings (B, T, C). input_pos (T,): the tokens' KV-cache slots
        (setup_cache first; None: no cache). Token i sits at RoPE position input_pos[i] and sees slots <= input_pos[i]
        unless the caller gives its own mask (B, 1, T, L) and positions (B, T) (inference.py's left padding).
        last_only: the last position's logits only (B, 1, vocab). head=False: the final hidden states (B, T, C)."""
        assert (input_ids is None) != (inputs_embeds is None), "pass exactly one of input_ids and inputs_embeds"
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        T, kv_len = x.shape[1], None
        if input_pos is not None:
            kv_len = int(input_pos[-1]) + 1  # the last token sees the longest prefix
            assert kv_len <= self.cache_len, f"position {kv_len - 1} is past the KV cache ({self.cache_len} slots)"
            if mask is None and T > 1 and kv_len != T:  # prefill after earlier positions: the causal mask is shifted
                mask = torch.arange(kv_len, device=x.device) <= input_pos[:, None]  # (T, L)
        if positions is None:
            positions = torch.arange(T, device=x.device) if input_pos is None else input_pos  # (T,)
        cos, sin = rope_cos_sin(self.config, positions, x.dtype)  # (T, hd), or (B, 1, T, hd) for per-row positions
        args, recompute = (cos, sin, input_pos, kv_len, mask), self.gradient_checkpointing and self.training
        for layer in self.layers:  # recompute: a block's activations are recomputed in backward instead of stored
            x = checkpoint(layer, x, *args, use_reentrant=False) if recompute else layer(x, *args)
        x = self.norm(x[:, -1:] if last_only else x)  # (B, T, C), or (B, 1, C)
        return self.lm_head(x) if head else x

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32) -> "Llama":
        """An HF LlamaForCausalLM folder (config.json + safetensors), without old ones' buffer rotary_emb.inv_freq."""
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


def hf_to_llama_keys(sd: dict) -> dict:
    return {k.removeprefix("model."): v for k, v in sd.items()}


def llama_to_hf_keys(sd: dict) -> dict:
    return {k if k.startswith("lm_head.") else "model." + k: v for k, v in sd.items()}


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
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: Llama, input_ids=None, inputs_embeds=None, *, max_new_tokens: int, temperature=0.0, top_p=1.0,
             eos_id=None, start_pos=0, generator=None):
    """Yield new token ids of one prompt (1, T): prefill it into the KV cache from slot start_pos (earlier slots are
    reused: a chat's previous turns), then one token at a time. The caller runs model.setup_cache first."""
    prompt = input_ids if input_ids is not None else inputs_embeds
    if prompt.shape[0] != 1:
        raise ValueError("generate takes one prompt: input_ids (1, T) or inputs_embeds (1, T, C)")
    T = prompt.shape[1]
    if start_pos + T + max_new_tokens > model.cache_len:
        raise ValueError(f"start_pos {start_pos} + prompt {T} + max_new_tokens {max_new_tokens} > KV cache length "
                         f"{model.cache_len}: call model.setup_cache(1, L) with a larger L")
    positions = torch.arange(start_pos, start_pos + T + max_new_tokens, device=prompt.device)
    logits = model(input_ids=input_ids, inputs_embeds=inputs_embeds, input_pos=positions[:T], last_only=True)[:, -1]
    for i in range(max_new_tokens):
        token = sample(logits.float(), temperature, top_p, generator)  # (1,)
        yield int(token)
        if int(token) == eos_id or i == max_new_tokens - 1:
            return
        logits = model(input_ids=token.view(1, 1), input_pos=positions[T + i:T + i + 1], last_only=True)[:, -1]
