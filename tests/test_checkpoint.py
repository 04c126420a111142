"""checkpoint.py's reading: every shard of an index read with the file each tensor came from, strict loading that
ignores nothing, and loading on the meta device, which reads nothing until a parameter's rows are asked for. (Its
errors through the model loaders: test_llama.py and test_clip.py; training states: test_train.py, test_scale.py.)"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint import FileSlice, fingerprint, load_checkpoint, load_strict
from llama import Llama

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
GQA = os.path.join(FIXTURES, "llama_gqa", "model")


def test_sharded_checkpoint_is_read_from_every_shard():
    with open(os.path.join(GQA, "model.safetensors.index.json")) as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) > 1
    tensors, files = load_checkpoint(GQA)
    for shard in shards:  # every tensor of every shard arrives unchanged, with the file it came from
        for key, value in load_file(os.path.join(GQA, shard)).items():
            assert torch.equal(tensors[key], value) and files[key] == os.path.join(GQA, shard)


def test_one_shard_file_reads_alone():
    tensors, _ = load_checkpoint(GQA)
    shard = sorted(json.load(open(os.path.join(GQA, "model.safetensors.index.json")))["weight_map"].values())[0]
    assert set(load_checkpoint(os.path.join(GQA, shard))[0]) < set(tensors)


def test_strict_loading_ignores_nothing_else():
    with torch.device("meta"):
        layer = torch.nn.Linear(2, 1, bias=False)
    with pytest.raises(KeyError, match="f.safetensors: unexpected key 'extra'"):
        load_strict(layer, {"weight": torch.zeros(1, 2), "extra": torch.zeros(1)},
                    {"weight": "f.safetensors", "extra": "f.safetensors"})


def test_loading_on_the_meta_device_reads_nothing_and_keeps_each_parameters_source():
    model = Llama.from_pretrained(GQA, device="meta")
    tensors, _ = load_checkpoint(GQA)
    assert all(p.is_meta and isinstance(p.source, FileSlice) for p in model.parameters())
    source = model.layers[1].mlp.down_proj.weight.source
    assert torch.equal(source[3:7], tensors["model.layers.1.mlp.down_proj.weight"][3:7])  # only the rows asked for


def test_loading_on_the_meta_device_passes_the_same_checks(tmp_path):
    shutil.copytree(os.path.join(FIXTURES, "llama_tied", "model"), tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    save_file({**tensors, "model.norm.weight": torch.ones(7)}, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: key 'model\.norm\.weight' has shape \(7,\)"):
        Llama.from_pretrained(tmp_path / "ckpt", device="meta")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(KeyError, match=r"missing key 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        Llama.from_pretrained(tmp_path / "ckpt", device="meta")


def test_a_fingerprint_tells_other_weights_apart_and_not_a_copy(tmp_path):
    shutil.copytree(GQA, tmp_path / "copy")
    assert fingerprint(GQA) == fingerprint(tmp_path / "copy")
    shard = tmp_path / "copy" / "model-00003-of-00004.safetensors"
    tensors = load_file(shard)
    save_file({k: v + 1e-3 * torch.randn_like(v) for k, v in tensors.items()}, shard)  # as a fine-tune changes them
    assert fingerprint(GQA) != fingerprint(tmp_path / "copy")
