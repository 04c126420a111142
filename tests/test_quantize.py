import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from clip import CLIPVisionConfig
from llama import Llama, LlamaConfig, generate
from llava import LLaVA, LLaVAConfig
from quantize import KERNEL_MAX_ROWS, Int8Embedding, Int8Linear, quantize_int8, quantize_weight

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def load(name):
    model = Llama.from_pretrained(os.path.join(FIXTURES, name, "model"))
    return model, load_file(os.path.join(FIXTURES, name, "reference.safetensors"))


def reference(layer, x):
    """(x @ q.T) * scale + bias in float64: the dequantized-weight matmul, exact."""
    y = (x.double() @ layer.weight_int8.double().T) * layer.scale.double()
    return y + layer.bias.double()


def distinct_bytes(model):
    """Bytes of the model's tensors, a shared one counted once."""
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}.values())


def weight_bytes(modules):
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


# ------------------------------------------------------------------------------------------------- the layer

def test_scales_are_row_max_over_127_and_a_zero_row_gives_zeros():
    torch.manual_seed(0)
    weight = torch.randn(6, 32)
    weight[2] = 0.0
    q, scale = quantize_weight(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    nonzero = [0, 1, 3, 4, 5]
    torch.testing.assert_close(scale[nonzero], weight[nonzero].abs().amax(dim=1) / 127)
    assert (q[nonzero].abs().amax(dim=1) == 127).all()  # each row's largest weight uses the full range
    assert (q[2] == 0).all() and torch.isfinite(scale).all()
    assert ((q * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7).all()  # round to nearest
    layer = Int8Linear(q, scale, torch.zeros(6))
    assert torch.isfinite(layer(torch.randn(3, 32))).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, KERNEL_MAX_ROWS + 8])  # decode (the int8 kernel) and a prompt (dequantize)
def test_matmul_equals_dequantized_weight_matmul(dtype, rows):
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(64, 48).to(dtype))
    x = torch.randn(1, rows, 64, dtype=dtype)
    assert layer.uses_kernel(x) == (rows <= KERNEL_MAX_ROWS)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (1, rows, 48)
    ref = reference(layer, x)
    # fp32 without the kernel: fp32 rounding only; the kernel runs in bf16 and any bf16 result is rounded to 8 bits
    tolerance = 1e-4 if dtype == torch.float32 and not layer.uses_kernel(x) else 2 ** -7
    assert (y.double() - ref).abs().max() <= tolerance * ref.abs().max()


def test_kernel_path_takes_an_unaligned_view():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(64, 32).to(torch.bfloat16))
    buffer = torch.randn(200, dtype=torch.bfloat16)
    x = buffer[8:72].view(1, 64)  # 16 bytes past an aligned start: the kernel's aligned loads would fault on it
    assert layer.uses_kernel(x) and x.data_ptr() % 32
    assert torch.equal(layer(x), layer(x.clone()))


def test_width_not_a_multiple_of_16_uses_the_fallback():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(24, 8).to(torch.bfloat16))  # the kernel reads 16 values at a time
    x = torch.randn(1, 24, dtype=torch.bfloat16)
    assert not layer.uses_kernel(x)
    assert (layer(x).double() - reference(layer, x)).abs().max() <= 2 ** -7 * reference(layer, x).abs().max()


# --------------------------------------------------------------------------------------------- the models

def test_quantize_int8_replaces_llm_and_projector_linears_only():
    torch.manual_seed(0)
    model = LLaVA(LLaVAConfig(llm=LlamaConfig.from_name("tiny"), vision=CLIPVisionConfig.from_name("tiny")))
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = {n for n in linears if n.startswith(("llm.", "projector."))}
    assert quantize_int8(model) is model
    assert {name for name, m in model.named_modules() if isinstance(m, Int8Linear)} == expected
    assert {name for name, m in model.named_modules() if type(m) is nn.Linear} == linears - expected
    assert "llm.lm_head" in expected and all(name.startswith("vision_tower.") for name in linears - expected)
    assert not any(n.endswith(".weight") and n.startswith(tuple(expected)) for n in model.state_dict())


def test_quantize_int8_replaces_the_llm_embedding_but_not_the_towers():
    torch.manual_seed(0)
    model = LLaVA(LLaVAConfig(llm=LlamaConfig.from_name("tiny"), vision=CLIPVisionConfig.from_name("tiny")))
    quantize_int8(model)
    assert {name for name, m in model.named_modules() if isinstance(m, Int8Embedding)} == {"llm.embed_tokens"}
    assert all(name.startswith("vision_tower.") for name, m in model.named_modules() if type(m) is nn.Embedding)


def test_embedding_lookup_is_the_dequantized_row():
    torch.manual_seed(0)
    table = nn.Embedding(50, 32)
    layer = quantize_int8(nn.Sequential(table))[0]
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    q, scale = quantize_weight(table.weight.detach())
    assert isinstance(layer, Int8Embedding)
    torch.testing.assert_close(layer(ids), q[ids].float() * scale[ids][..., None], rtol=0, atol=0)
    assert (layer(ids) - table(ids)).abs().max() <= table.weight.abs().max() / 254 + 1e-7


def test_a_tied_head_and_its_table_share_one_int8_tensor():
    model, _ = load("llama_tied")
    quantize_int8(model)
    assert model.embed_tokens.weight_int8 is model.lm_head.weight_int8 and model.embed_tokens.scale is model.lm_head.scale


def test_a_tied_model_quantized_whole_takes_under_0_3x_of_fp32():
    model, _ = load("llama_tied")
    before = distinct_bytes(model)
    assert distinct_bytes(quantize_int8(model)) <= 0.3 * before


def test_skipping_embed_tokens_keeps_the_float_table_for_lookups():
    model, ref = load("llama_tied")
    quantize_int8(model, skip=("embed_tokens",))
    assert type(model.embed_tokens) is nn.Embedding and isinstance(model.lm_head, Int8Linear)
    assert torch.equal(model.embed_tokens.weight, load("llama_tied")[0].embed_tokens.weight)


def test_skip_names_match_at_any_depth():
    model, _ = load("llama_tied")
    quantize_int8(model, skip=("mlp", "lm_head"))  # every block's mlp and the head stay float
    assert type(model.lm_head) is nn.Linear and isinstance(model.embed_tokens, Int8Embedding)
    assert all(type(block.mlp.up_proj) is nn.Linear and isinstance(block.self_attn.q_proj, Int8Linear)
               for block in model.layers)


def test_quantized_llava_logits_stay_close():
    torch.manual_seed(0)
    config = LLaVAConfig(llm=LlamaConfig.from_name("tiny"), vision=CLIPVisionConfig.from_name("tiny"))
    model = LLaVA(config).eval()
    ids = torch.tensor([[1] + [-200] * config.num_image_tokens + [5, 6, 7]])
    pixels = torch.randn(1, 3, config.image_size, config.image_size)
    with torch.no_grad():
        before, _ = model(ids, pixels)
        after, _ = quantize_int8(model)(ids, pixels)
    assert (after - before).abs().max() <= 0.05 * before.abs().max()


@pytest.mark.parametrize("name", ["llama_gqa", "llama_tied"])
def test_quantized_fixture_logits_stay_close(name):
    model, ref = load(name)
    with torch.no_grad():
        logits = quantize_int8(model)(ref["input_ids"])  # (B, T, V)
    # measured: 1.6% (gqa) and 1.3% (tied) of the largest logit
    assert (logits - ref["logits"]).abs().max() <= 0.05 * ref["logits"].abs().max()


def test_quantized_greedy_tokens_equal_fp32():
    # llama_tied's greedy path has top-2 margins >= 6.4 logits, 15x the largest change quantization makes (0.43),
    # so all 20 tokens must agree. (llama_gqa also matches 20/20, but its margins drop to 0.025: luck, not tested.)
    model, ref = load("llama_tied")
    quantize_int8(model).setup_cache(1, 32)
    assert list(generate(model, ref["prompt"], max_new_tokens=20)) == ref["greedy"][0].tolist()


def test_quantized_linear_weights_take_under_0_3x_of_fp32():
    model, _ = load("llama_gqa")
    before = weight_bytes(m for block in model.layers for m in block.modules() if isinstance(m, nn.Linear))
    quantize_int8(model)
    after = weight_bytes(m for block in model.layers for m in block.modules() if isinstance(m, Int8Linear))
    assert after <= 0.3 * before  # (1 + 4 / in_features) / 4: 0.27 at in_features 64


def int8_llava():
    torch.manual_seed(0)
    return quantize_int8(LLaVA(LLaVAConfig(llm=LlamaConfig.from_name("tiny"), vision=CLIPVisionConfig.from_name("tiny"))))


def test_an_int8_model_is_not_saved_as_a_checkpoint_that_would_not_load(tmp_path):
    with pytest.raises(ValueError, match="int8 weights are for answering, not for saving: save the float model"):
        int8_llava().save_pretrained(tmp_path)
    assert not os.listdir(tmp_path)


def test_an_int8_model_is_not_exported(tmp_path):
    import formats
    with pytest.raises(ValueError, match="int8 weights are for answering, not for export: export the float model"):
        formats.export_hf(int8_llava(), tmp_path)
