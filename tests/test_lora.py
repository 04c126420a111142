"""lora.py on tiny random models (CPU, fp32): the adapted model starts as the base, merges into it, trains only the
adapters (+ projector), saves and loads strictly, and survives gradient checkpointing."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from clip import CLIPVisionConfig
from llama import Llama, LlamaConfig
from llava import IMAGE_TOKEN_INDEX, LLaVA, LLaVAConfig
from lora import (ADAPTER_FILE, CONFIG_FILE, TARGETS, LoRALinear, adapter_state_dict, apply_lora, initial_adapters,
                  load_adapters, lora_state_dict, merge_lora, save_adapters)

R, ALPHA = 4, 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return Llama(LlamaConfig.from_name("tiny"))


def tiny_llava(seed=0):
    torch.manual_seed(seed)
    return LLaVA(LLaVAConfig(llm=LlamaConfig.from_name("tiny"), vision=CLIPVisionConfig.from_name("tiny")))


def text_ids(batch=2, length=24):
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(1))


def llava_batch(model):
    """Two rows: one with an image (its placeholders, labels -100 there), one text only; one image."""
    P = model.config.num_image_tokens
    ids = text_ids(2, P + 12)
    ids[0, 2:2 + P] = IMAGE_TOKEN_INDEX
    labels = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, -100)
    pixel_values = torch.randn(1, 3, model.config.image_size, model.config.image_size,
                               generator=torch.Generator().manual_seed(2))
    return ids, pixel_values, labels


def randomize_adapters(model, seed=3):  # B = 0 hides every mistake in A, B or the scaling: give both values
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.05)
    return model


def adapted_names(n_layers):
    kinds = [("self_attn", t) for t in TARGETS[:4]] + [("mlp", t) for t in TARGETS[4:]]
    return {f"layers.{i}.{parent}.{name}" for i in range(n_layers) for parent, name in kinds}


def test_step_0_adapted_model_equals_base_model_exactly():
    model, ids = tiny_llama(), text_ids()
    with torch.no_grad():
        base = model(ids)
        apply_lora(model, R, ALPHA, dropout=0.1)
        model.train()  # dropout active: still exact, B = 0
        adapted = model(ids)
    assert torch.equal(adapted, base)


def test_adapters_sit_on_the_seven_linears_of_every_block_and_nowhere_else():
    model = tiny_llava()
    base_keys = set(model.state_dict())
    q_weight = model.llm.layers[0].self_attn.q_proj.weight
    assert apply_lora(model.llm, R, ALPHA) == 7 * model.config.llm.num_hidden_layers
    sd = model.state_dict()
    expected = {"llm." + name for name in adapted_names(model.config.llm.num_hidden_layers)}
    assert {n for n, m in model.named_modules() if isinstance(m, LoRALinear)} == expected
    assert set(sd) - base_keys == {f"{name}.{ab}" for name in expected for ab in ("lora_A", "lora_B")}
    assert base_keys <= set(sd)  # base weights keep their keys: checkpoints still load and save
    assert model.llm.layers[0].self_attn.q_proj.weight is q_weight  # the same tensor, no copy
    for name in expected:
        layer = model.get_submodule(name)
        assert layer.lora_A.shape == (R, layer.in_features) and layer.lora_B.shape == (layer.out_features, R)
    # the LLM is frozen but for its adapters; the projector (trainable in LLaVA's constructor) is left alone
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) | {k for k in sd if k.startswith("projector.")}


def test_apply_lora_refuses_twice_unknown_targets_and_r_0():
    model = tiny_llama()
    with pytest.raises(ValueError, match="lm_head"):
        apply_lora(model, R, ALPHA, targets=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="r >= 1"):
        apply_lora(model, 0, ALPHA)
    apply_lora(model, R, ALPHA)
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, R, ALPHA)


def test_merged_model_equals_adapted_model_and_has_the_base_keys():
    model, ids = tiny_llama(), text_ids()
    base_keys = list(model.state_dict())
    apply_lora(model, R, ALPHA, dropout=0.1)
    randomize_adapters(model).eval()
    with torch.no_grad():
        adapted = model(ids)
        merge_lora(model)
        merged = model(ids)
    assert list(model.state_dict()) == base_keys
    assert all(type(model.get_submodule(name)) is nn.Linear for name in adapted_names(2))
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)  # W x + s B A x reordered: rounding only


@pytest.fixture(scope="module")
def trained():
    """A LoRA stage 2 in miniature: projector + adapters trainable, 4 AdamW steps on the LLaVA loss."""
    model = tiny_llava()
    model.requires_grad_(False)
    model.projector.requires_grad_(True)  # train.py's set_stage(model, 2), then apply_lora freezes the LLM
    apply_lora(model.llm, R, ALPHA, dropout=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, pixel_values, labels = llava_batch(model)
    model.train()
    for _ in range(4):
        loss = model(ids, pixel_values, labels)[1].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return before, model.eval()


def test_training_changes_only_adapters_and_projector(trained):
    before, model = trained
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(adapter_state_dict(model))  # every adapter (A and B) and projector tensor moved...
    assert any(k.startswith("projector.") for k in changed) and any(k.endswith(".lora_A") for k in changed)
    # ...and the base weights, norms, embeddings, lm_head and tower are bit-identical (the torch.equal above)


def test_merged_update_of_each_weight_has_rank_at_most_r(trained):
    before, model = trained
    merged = merge_lora(copy.deepcopy(model)).state_dict()
    for name in adapted_names(2):
        key = f"llm.{name}.weight"
        delta = merged[key] - before[key]  # (out, in); fp32, so matrix_rank ignores fp32 rounding noise
        assert 1 <= torch.linalg.matrix_rank(delta) <= R, key


def test_merged_llava_saves_and_loads_as_a_plain_checkpoint(trained, tmp_path):
    _, model = trained
    ids, pixel_values, _ = llava_batch(model)
    merged = merge_lora(copy.deepcopy(model))
    merged.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(ids, pixel_values)[0]
        got = LLaVA.from_pretrained(tmp_path)(ids, pixel_values)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_dropout_is_applied_to_the_adapter_input_only_in_train_mode():
    torch.manual_seed(0)
    layer = randomize_adapters(LoRALinear(nn.Linear(16, 8, bias=False), R, ALPHA, dropout=0.5))
    W, A, B, scale = layer.weight, layer.lora_A, layer.lora_B, ALPHA / R
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.manual_seed(1)
        y = layer(x)
        torch.manual_seed(1)
        x_dropped = F.dropout(x, 0.5, training=True)
        torch.testing.assert_close(y, x @ W.T + scale * x_dropped @ A.T @ B.T)  # W sees x, the adapter x_dropped
        assert not torch.equal(layer(x), y)  # a fresh mask each call
        layer.eval()
        assert torch.equal(layer(x), layer(x))
        torch.testing.assert_close(layer(x), x @ W.T + scale * x @ A.T @ B.T)
    # added to a model already in eval mode (chat, evaluate): no dropout until train() is called
    assert not LoRALinear(nn.Linear(16, 8).eval(), R, ALPHA, dropout=0.5).lora_dropout.training


def test_save_then_load_onto_a_fresh_base_model_gives_the_same_logits(trained, tmp_path):
    _, model = trained
    save_adapters(model, tmp_path, {"base_model": "tiny"})
    assert set(load_file(tmp_path / ADAPTER_FILE)) == set(adapter_state_dict(model))  # no base weight: small
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert {k: config[k] for k in ("r", "alpha", "dropout", "targets", "base_model")} == {
        "r": R, "alpha": ALPHA, "dropout": 0.05, "targets": list(TARGETS), "base_model": "tiny"}
    fresh = tiny_llava().eval()  # the same seed: the base model the adapters were trained on
    load_adapters(fresh, tmp_path)
    ids, pixel_values, _ = llava_batch(model)
    with torch.no_grad():
        assert torch.equal(fresh(ids, pixel_values)[0], model(ids, pixel_values)[0])


def test_image_newline_is_saved_and_loaded_with_the_adapters_as_the_projector(tmp_path):
    def anyres_llava():  # LLaVA-1.6's layout: its image_newline trains in stage 2, LoRA or not
        torch.manual_seed(0)
        return LLaVA(LLaVAConfig(llm=LlamaConfig.from_name("tiny"), vision=CLIPVisionConfig.from_name("tiny"),
                                 image_aspect_ratio="anyres", image_grid_pinpoints=[[64, 128], [128, 64]],
                                 patch_merge_type="spatial_unpad"))
    model = anyres_llava()
    apply_lora(model.llm, R, ALPHA)
    with torch.no_grad():
        model.image_newline.add_(1.0)  # as training would have moved it
    save_adapters(model, tmp_path)
    assert "image_newline" in load_file(tmp_path / ADAPTER_FILE)
    fresh = anyres_llava()
    load_adapters(fresh, tmp_path)
    assert torch.equal(fresh.image_newline, model.image_newline)


@pytest.mark.parametrize("fault", ["missing", "unexpected", "shape"])
def test_load_adapters_is_strict_and_names_key_and_file(trained, tmp_path, fault):
    _, model = trained
    save_adapters(model, tmp_path)
    file = os.path.join(tmp_path, ADAPTER_FILE)
    tensors = load_file(file)
    key = "llm.layers.1.mlp.down_proj.lora_A"
    if fault == "missing":
        del tensors[key]
    elif fault == "unexpected":
        key = "llm.layers.1.mlp.down_proj.lora_C"
        tensors[key] = torch.zeros(1)
    else:
        tensors[key] = tensors[key][:-1]
    save_file(tensors, file)
    with pytest.raises((KeyError, ValueError)) as error:
        load_adapters(tiny_llava(), tmp_path)
    assert key in str(error.value) and file in str(error.value) and fault in str(error.value)


def test_load_adapters_refuses_a_model_with_other_adapters(trained, tmp_path):
    _, model = trained
    save_adapters(model, tmp_path)
    other = tiny_llava()
    apply_lora(other.llm, R, 2 * ALPHA, dropout=0.05)  # same shapes, another scaling: must not load silently
    with pytest.raises(ValueError, match=CONFIG_FILE):
        load_adapters(other, tmp_path)


def test_gradient_checkpointing_gives_the_same_loss_and_grads():
    model, ids = tiny_llama(), text_ids()
    apply_lora(model, R, ALPHA, dropout=0.1)
    randomize_adapters(model).train()
    checkpointed = copy.deepcopy(model)
    for block in checkpointed.layers:  # as train.py --grad-checkpointing: recompute each block in backward
        block.forward = lambda *a, _f=block.forward, **kw: checkpoint(_f, *a, use_reentrant=False, **kw)

    def loss_and_grads(m):
        torch.manual_seed(5)  # the same dropout masks; checkpoint replays them in the recompute
        loss = F.cross_entropy(m(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads(model)
    loss_ckpt, grads_ckpt = loss_and_grads(checkpointed)
    assert set(grads) == set(lora_state_dict(model)) and all(g is not None for g in grads_ckpt.values())
    torch.testing.assert_close(loss_ckpt, loss, atol=0, rtol=0)
    torch.testing.assert_close(grads_ckpt, grads, atol=1e-7, rtol=0)


def test_adapters_follow_the_base_weights_device_and_dtype():
    with torch.device("meta"):
        meta = Llama(LlamaConfig.from_name("tiny"))
    apply_lora(meta, R, ALPHA)
    assert {p.device.type for p in lora_state_dict(meta).values()} == {"meta"}
    bf16 = tiny_llama().to(torch.bfloat16)
    apply_lora(bf16, R, ALPHA)
    assert {p.dtype for p in lora_state_dict(bf16).values()} == {torch.bfloat16}
    model = tiny_llama()
    apply_lora(model, R, ALPHA)
    model.to(torch.float64)  # moved later: the adapters go along
    assert {p.dtype for p in lora_state_dict(model).values()} == {torch.float64}
    assert model(text_ids()).dtype == torch.float64


def test_initial_adapters_of_a_meta_model_equal_those_apply_lora_draws_on_a_real_one():
    """train.py's rank-sharded loading: adapters added on meta get the values a real model would draw."""
    model = tiny_llama(seed=5)
    apply_lora(model, R, ALPHA)
    with torch.device("meta"):
        meta = Llama(LlamaConfig.from_name("tiny"))
    apply_lora(meta, R, ALPHA)
    torch.manual_seed(5)
    Llama(LlamaConfig.from_name("tiny"))  # the same draws before the adapters
    values = initial_adapters(meta)
    expected = lora_state_dict(model)
    assert values.keys() == expected.keys() and all(torch.equal(v, expected[k]) for k, v in values.items())
    assert all(v.device.type == "cpu" for v in values.values()) and expected["layers.1.mlp.down_proj.lora_A"].any()


def test_meta_built_model_filled_with_assign_equals_the_adapted_model():
    """train.py's save_output path: a plain model on meta, adapters added, the gathered state assigned, merged."""
    model, ids = tiny_llama(), text_ids()
    apply_lora(model, R, ALPHA)
    randomize_adapters(model).eval()
    with torch.device("meta"):
        plain = Llama(LlamaConfig.from_name("tiny"))
    apply_lora(plain, R, ALPHA)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    plain.eval()
    assert not plain.layers[0].mlp.up_proj.weight.requires_grad and plain.layers[0].mlp.up_proj.lora_A.requires_grad
    with torch.no_grad():
        assert torch.equal(plain(ids), model(ids))
        torch.testing.assert_close(merge_lora(plain)(ids), model(ids), atol=1e-5, rtol=0)


FSDP_SCRIPT = """
import gc, sys, torch, torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
import test_lora
dist.init_process_group("gloo", init_method="file://" + sys.argv[1] + "/rendezvous", rank=0, world_size=1)
model, losses = test_lora.train_tiny_llama(shard=lambda m: [fully_shard(b) for b in m.layers] + [fully_shard(m)])
trained = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))
save_file({**trained, "losses": torch.stack(losses)}, sys.argv[1] + "/trained.safetensors")
del model  # a sharded model goes before its process group (distributed.process_group)
gc.collect()
dist.destroy_process_group()
"""


def train_tiny_llama(shard=lambda model: None, steps=3):
    """Adapters on a tiny Llama, `shard` (FSDP2 in a subprocess), a few AdamW steps on next-token loss."""
    model, ids = tiny_llama(), text_ids()
    apply_lora(model, R, ALPHA)
    shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return model, losses


@pytest.mark.slow
def test_fsdp2_per_block_with_frozen_base_and_trained_adapters_matches_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
    subprocess.run([sys.executable, "-c", FSDP_SCRIPT, str(tmp_path)], check=True, env=env, timeout=300)
    sharded = load_file(tmp_path / "trained.safetensors")
    model, losses = train_tiny_llama()
    expected = {**lora_state_dict(model), "losses": torch.stack(losses)}
    assert set(sharded) == set(expected)  # the trained tensors FSDP2 reports are exactly the adapters
    torch.testing.assert_close(sharded, expected, atol=1e-6, rtol=0)


def test_adapters_refuse_a_base_of_the_same_shape_with_other_weights(trained, tmp_path):
    _, model = trained
    save_adapters(model, tmp_path, {"base_model": "tiny, seed 0"})
    with pytest.raises(ValueError, match=r"adapter_config\.json: the adapters were trained on another base model .*"
                                         r"'tiny, seed 0'"):
        load_adapters(tiny_llava(seed=1), tmp_path)


def test_the_base_fingerprint_holds_for_a_bf16_load_of_the_same_base(trained, tmp_path):
    _, model = trained
    save_adapters(model, tmp_path)
    load_adapters(tiny_llava().to(torch.bfloat16), tmp_path)  # no error: the same base, in another dtype


def test_a_rank_wider_than_a_layer_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"LoRA rank r=65 is wider than q_proj \(64 x 64\): r must be at most 64"):
        apply_lora(tiny_llama(), r=65, alpha=1.0)
