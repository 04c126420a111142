"""Int8 weight-only quantization of linear layers, so that LLaVA fits and decodes faster on small machines.

Per output channel o (one row of the (out, in) weight), symmetric, no zero point:
    scale[o] = max_k |W[o, k]| / 127            (an all-zero row gets scale 1: q = 0, never 0/0)
    q[o, k]  = round(W[o, k] / scale[o])  clamped to [-127, 127], stored as int8
and the layer computes y = x @ (q * scale[:, None]).T + b = (x @ q.T) * scale + b: the scale factors out of the sum
over k, so only the weights are 8-bit and activations stay floating point. Rounding error per weight is at most
scale[o] / 2 = max|W[o, :]| / 254.

Memory: one byte per weight plus one scale per row, (1 + bytes(dtype) / in_features) bytes per weight instead of 4
(fp32) or 2 (bf16): ~0.25x of fp32, ~0.5x of bf16 for the quantized layers. `quantize_int8` quantizes the loaded
float weights (no new file format) and drops them. The token embedding table gets the same per-row int8 form
(Int8Embedding: a lookup dequantizes only the rows it reads); a table tied to lm_head is quantized once and the two
share it, which is what brings a small model to ~0.25x (its table is a fifth of the weights). Norms and the vision
tower stay as loaded.

Kernels, chosen per call in Int8Linear.forward:
  CPU, up to KERNEL_MAX_ROWS rows (decode)   torch.ops.aten._weight_int8pack_mm: streams the int8 weights and widens
                                             them in registers (AVX2 / AVX-512 / NEON), fp32 accumulation. On x86 it
                                             vectorizes bf16 only (its fp32 path is a scalar loop, ~10x slower than
                                             an fp32 F.linear), so x is rounded to bf16 for it (relative error 2^-9,
                                             below the int8 weight error) and the result is returned in x's dtype.
                                             With AVX2 only, widening is the bottleneck, not the reads.
  everything else (CUDA, prompts)            dequantize then matmul: F.linear(x, q.to(x.dtype)) * scale, in x's
                                             dtype. Correct everywhere; it saves memory, not time.
Not used: the op's CUDA kernel (one thread per output, fp32 copies of x) and `torch._int_mm`, which needs int8
activations (W8A8, a lossier scheme). On CUDA, torch.compile of the decode step (a script's choice) fuses the
dequantization into the matmul.

    model, tokenizer = inference.load_model(path, quantize="int8")  # or quantize_int8(model) after loading
    # the LLM's linears (blocks and lm_head) and the projector become Int8Linear, its embed_tokens an Int8Embedding
"""
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

# kept in float: the tower runs once per image. skip=("vision_tower", "lm_head", "embed_tokens") also keeps the head
# and the table float: closer to fp32's predictions for more memory (BENCHMARKS.md has both, from bench.py quality)
SKIP = ("vision_tower",)
QUANTIZE = ("int8",)  # the choices of inference.load_model(..., quantize=) and the --quantize flags
KERNEL_MAX_ROWS = 32  # the kernel is a GEMV-style loop: from ~32-64 rows on (a prompt) dequantize + GEMM is faster
ROW_BLOCK = 4096  # rows quantized at a time: no float temporary the size of a whole large matrix


@torch.no_grad()
def quantize_weight(weight):
    """(out, in) float weight -> (int8 (out, in), scale (out,) in the weight's dtype)."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device)
    for start in range(0, weight.shape[0], ROW_BLOCK):
        rows = weight[start:start + ROW_BLOCK].float()  # (R, in)
        s = (rows.abs().amax(dim=1) / 127).to(weight.dtype)  # rounded to the stored dtype first: q uses this scale
        s = torch.where(s > 0, s, torch.ones_like(s))  # all-zero row (or an underflow): q = 0
        q[start:start + ROW_BLOCK] = (rows / s.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        scale[start:start + ROW_BLOCK] = s
    return q, scale


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and one scale per output channel: y = (x @ weight_int8.T) * scale + bias."""

    def __init__(self, weight_int8, scale, bias=None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        # buffers, not parameters: frozen, moved by .to(device), cast by .to(dtype) (the int8 weight stays int8)
        self.register_buffer("weight_int8", weight_int8)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) in the compute dtype
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # (out,)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(*quantize_weight(linear.weight.detach()), bias)

    def uses_kernel(self, x) -> bool:
        # the kernel loads 16 values at a time (in_features % 16) from 32-byte aligned rows: the weight's are checked
        # here (quantize_weight's are), x's are made so in forward
        return (x.device.type == "cpu" and self.in_features % 16 == 0
                and x.numel() <= KERNEL_MAX_ROWS * self.in_features
                and self.weight_int8.is_contiguous() and self.weight_int8.data_ptr() % 64 == 0)

    def forward(self, x):  # (..., in) -> (..., out)
        if self.uses_kernel(x):
            rows = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, in)
            if not rows.is_contiguous() or rows.data_ptr() % 64:  # a view into another tensor: fresh, aligned copy
                rows = rows.clone(memory_format=torch.contiguous_format)
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scale.to(torch.bfloat16))
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)  # (..., out)
        else:
            y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)  # (..., out)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """nn.Embedding with int8 rows and one scale per row: embedding(ids) = weight_int8[ids] * scale[ids]. The rows of
    an (out, in) Int8Linear are exactly this form, so a tied lm_head and its table share one weight_int8 and scale."""

    def __init__(self, weight_int8, scale):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)  # (vocab, dim) int8
        self.register_buffer("scale", scale)  # (vocab,) in the compute dtype

    def forward(self, ids):  # (...) -> (..., dim)
        return self.weight_int8[ids].to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def quantize_int8(model: nn.Module, skip=SKIP) -> nn.Module:
    """Replace every nn.Linear in `model` by an Int8Linear and every nn.Embedding by an Int8Embedding, except inside
    modules named in `skip` (a name matches at any depth: "lm_head" is lm_head in a Llama and llm.lm_head in a
    LLaVA). Default: all of a LLaVA but the vision tower (the LLM's embed_tokens, blocks and lm_head, the projector),
    all of a Llama. One layer at a time, so the float weights are freed as it goes; a weight shared by a Linear and
    an Embedding (a tied head) is quantized once and shared again; a float weight still used by a skipped module
    stays. Returns the model, changed in place."""
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    if type(model) is nn.Linear:  # nothing to replace it in: its quantized copy
        return Int8Linear.from_linear(model)
    parents = [module for name, module in model.named_modules()  # no reference to a layer kept: each is freed
               if type(module) not in (nn.Linear, nn.Embedding) and not any(part in skip for part in name.split("."))]
    counts = Counter(id(m.weight) for m in model.modules() if type(m) in (nn.Linear, nn.Embedding))
    # id -> (weight, int8, scale) of a weight two layers share (a tied head), quantized once; the weight is held so
    # that its id cannot pass to another tensor meanwhile. Weights used once are not held: each is freed in turn
    done = {}
    for parent in parents:
        for child_name, child in list(parent.named_children()):
            if type(child) in (nn.Linear, nn.Embedding) and child_name not in skip:
                key = id(child.weight)
                weight, q, scale = done.get(key) or (child.weight, *quantize_weight(child.weight.detach()))
                if counts[key] > 1:
                    done[key] = (weight, q, scale)
                bias = getattr(child, "bias", None)
                setattr(parent, child_name, Int8Embedding(q, scale) if type(child) is nn.Embedding else
                        Int8Linear(q, scale, None if bias is None else bias.detach()))
    return model
