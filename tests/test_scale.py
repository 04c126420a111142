"""train.py at scale, on CPU with gloo: a training state written by 2 ranks (DCP shards) resumes in 1 and in 2
processes to the weights of an uninterrupted run; rank-sharded memory-mapped loading gives single-process loading's
parameters; precision=bf16 (the GPU path: FSDP2 mixed precision, flash attention) tracks fp32 and saves bf16;
micro-batches whose images are all corrupt are skipped, counted once and still take part in the collectives.
Tiny demo models, a few steps each; the torchrun tests are slow."""
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
from safetensors import safe_open

import train
from checkpoint import latest_state
from formats import export_hf
from llava import LLaVA
from test_train import REPO, base_parts, demo, flags, losses, records, torchrun  # noqa: F401 (demo: the fixture)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_torchrun(*args, script="train.py"):
    command = torchrun(*args)
    command[command.index("train.py")] = script
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def weights_close(a, b, tol):
    return all((v.float() - b[k].float()).abs().max() <= tol for k, v in a.items())


@pytest.mark.slow
def test_a_state_of_2_ranks_resumes_in_1_and_in_2(demo, tmp_path):
    args = ("lr=1e-3", "micro_batch_size=2")
    one = train.main(flags(demo, tmp_path / "one", 2, *args)).state_dict()  # uninterrupted, one process
    run_torchrun(*flags(demo, tmp_path / "two", 2, *args, "stop_after=2"))
    shards = sorted(p.name for p in latest_state(tmp_path / "two").glob("*.distcp"))
    assert len(shards) == 2  # each rank wrote its own
    shutil.copytree(tmp_path / "two", tmp_path / "two_then_one")
    resumed_in_1 = train.main(flags(demo, tmp_path / "two_then_one", 2, *args, "--resume")).state_dict()
    run_torchrun(*flags(demo, tmp_path / "two", 2, *args, "--resume"))
    resumed_in_2 = LLaVA.from_pretrained(str(tmp_path / "two")).state_dict()
    assert weights_close(one, resumed_in_1, 1e-4) and weights_close(one, resumed_in_2, 1e-4)
    for out in ("two_then_one", "two"):
        assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(losses(tmp_path / "one"), losses(tmp_path / out)))


SHARDED_LOAD = """
import gc, sys, torch, torch.distributed as dist
import distributed, train
from torch.distributed.tensor import DTensor
rank, world, device = distributed.setup(timeout_s=60)
config = train.make_config("demo", 2, ["num_workers=0", *sys.argv[4:]], model=sys.argv[1], vision_tower=sys.argv[2],
                           projector=sys.argv[3] or None, data="unused", image_folder="unused")
model = train.build_model(config, lazy=True)
assert next(model.llm.parameters()).is_meta
model = distributed.parallelize(model, device)
full = {n: p.full_tensor() if isinstance(p, DTensor) else p.detach() for n, p in model.named_parameters()}
if rank == 0:
    reference = dict(train.build_model(config).named_parameters())
    assert full.keys() == reference.keys(), set(full) ^ set(reference)
    assert sum(name.endswith(".lora_A") for name in full) == (14 if sys.argv[4:] else 0)  # 7 linears x 2 blocks
    for name, value in full.items():
        assert torch.equal(value, reference[name]), name
    print("same parameters:", len(full))
del model, full  # a sharded model goes before its process group (distributed.process_group)
gc.collect()
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("start", ["base", "llava", "llava-hf", "lora"])
def test_rank_sharded_loading_gives_the_parameters_of_one_process(demo, tmp_path, start):
    script = tmp_path / "sharded_load.py"
    script.write_text(SHARDED_LOAD)
    sets = ["lora_r=4"] if start == "lora" else []  # adapters: A drawn after the projector, B zeros, on every rank
    if start in ("base", "lora"):  # a base LLM (HF names, mapped first) + CLIP + the stage-1 projector
        model, tower, projector = demo / "base" / "llm", demo / "base" / "clip", demo / "projector"
    else:  # a LLaVA checkpoint, ours or llava-hf's: every part from one file
        model, tower, projector = tmp_path / "llava", "", ""
        base_parts(demo).save_pretrained(str(model)) if start == "llava" else export_hf(base_parts(demo), model)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(model), str(tower), str(projector), *sets]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240,
                            env={**ENV, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same parameters" in result.stdout


@pytest.mark.slow
def test_bf16_tracks_fp32_and_saves_bf16(demo, tmp_path):
    args = ("lr=1e-3", "micro_batch_size=2")
    train.main(flags(demo, tmp_path / "fp32", 2, *args, "precision=fp32"))
    # 2 ranks: exactly the GPU path (FSDP2 MixedPrecisionPolicy(bf16, fp32), flash attention), on CPU tensors
    run_torchrun(*flags(demo, tmp_path / "bf16", 2, *args, "precision=bf16"))
    train.main(flags(demo, tmp_path / "bf16_one", 2, *args, "precision=bf16"))  # one process: bf16 autocast
    fp32 = losses(tmp_path / "fp32")
    for out in ("bf16", "bf16_one"):
        bf16 = losses(tmp_path / out)
        assert len(bf16) == len(fp32) == 4
        assert all(abs(a - b) <= 2e-2 * abs(a) for a, b in zip(fp32, bf16)), (fp32, bf16)  # bf16: 8 mantissa bits
        assert bf16 != fp32  # it did compute in bf16
        with safe_open(tmp_path / out / "model.safetensors", "pt") as f:  # docs: saved in the precision it trained
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    with safe_open(tmp_path / "fp32" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def corrupt_data(demo, folder):
    """small1.json with its first sample's image cut in half: the header reads, the pixels do not."""
    shutil.copytree(demo / "data" / "images", folder / "images")
    rows = json.loads((demo / "small1.json").read_text())
    image = folder / "images" / rows[0]["image"]
    image.write_bytes(image.read_bytes()[:len(image.read_bytes()) // 2])
    return rows[0]


def skip_flags(demo, tmp_path, out):
    corrupt_data(demo, tmp_path)
    args = flags(demo, tmp_path / out, 1, "skip_bad=true", "micro_batch_size=1")
    args[args.index("--image-folder") + 1] = str(tmp_path / "images")
    return args


def test_a_micro_batch_of_corrupt_images_is_skipped_and_counted_once(demo, tmp_path, capsys):
    train.main(skip_flags(demo, tmp_path, "out"))
    summary = capsys.readouterr().out
    assert "samples skipped: 1 image unreadable while training\n" in summary, summary
    assert [r["step"] for r in records(tmp_path / "out")] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] for r in records(tmp_path / "out"))  # no NaN from the stand-in


@pytest.mark.slow
def test_a_rank_whose_micro_batch_is_skipped_still_takes_part(demo, tmp_path):
    stdout = run_torchrun(*skip_flags(demo, tmp_path, "out"))
    assert re.search(r"samples skipped: 1 image unreadable while training$", stdout, re.M), stdout
    assert len(records(tmp_path / "out")) == 4


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must not run",))


def test_a_state_whose_metadata_would_run_code_is_refused(demo, tmp_path):
    train.main(flags(demo, tmp_path, 1, "stop_after=2"))
    (latest_state(tmp_path) / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    with pytest.raises(SystemExit, match=r"\.metadata is not a training state's index: .* may not build posix.system"):
        train.main(flags(demo, tmp_path, 1, "--resume"))


def text(value):  # SHORT_BINUNICODE: a short str on the pickle stack
    data = value.encode()
    return b"\x8c" + bytes([len(data)]) + data


def call(module, name, *args):  # module.name(*args), name found the way protocol 4 looks up dotted names
    return text(module) + text(name) + b"\x93" + b"".join(args) + {1: b"\x85", 2: b"\x86"}[len(args)] + b"R"


def dotted_name_chain(command):
    """A .metadata pickle that reaches os.system through operator classes named as attributes of a DCP module
    ("torch.distributed.checkpoint.planner", "operator.attrgetter"): DCP's FileSystemReader.__init__.__globals__
    holds os."""
    planner, filesystem = "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint.filesystem"
    getter = text(planner) + text("operator.attrgetter") + b"\x93" + text("__init__.__globals__") + b"\x85R"
    module_globals = getter + text(filesystem) + text("FileSystemReader") + b"\x93" + b"\x85R"
    os_module = text(planner) + text("operator.itemgetter") + b"\x93" + text("os") + b"\x85R" + module_globals + b"\x85R"
    system = text(planner) + text("operator.methodcaller") + b"\x93" + text("system") + text(command) + b"\x86R"
    return b"\x80\x04" + system + os_module + b"\x85R" + b"."


def test_a_metadata_of_dotted_names_runs_nothing(demo, tmp_path):
    marker = tmp_path / "ran"
    payload = dotted_name_chain(f"touch {marker}")
    pickle.loads(payload)  # the chain works on an unrestricted unpickler...
    assert marker.exists()
    marker.unlink()
    train.main(flags(demo, tmp_path / "out", 1, "stop_after=2"))
    (latest_state(tmp_path / "out") / ".metadata").write_bytes(payload)
    with pytest.raises(SystemExit, match=r"\.metadata is not a training state's index: .* may not build "
                                         r"torch\.distributed\.checkpoint\.planner\.operator\.methodcaller"):
        train.main(flags(demo, tmp_path / "out", 1, "--resume"))
    assert not marker.exists()  # ...and never runs on resume


class WritesMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_state_entry_that_is_not_a_tensor_is_refused_before_it_is_read(demo, tmp_path):
    # DCP's own classes only, but one optimizer entry declared "bytes" and stored as a torch.save pickle, which DCP's
    # loader would read with weights_only=False
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
    import torch
    train.main(flags(demo, tmp_path / "out", 1, "stop_after=2"))
    state, marker = latest_state(tmp_path / "out"), tmp_path / "ran"
    metadata = train.checkpoint.StateReader(state).read_metadata()
    key = next(k for k in metadata.state_dict_metadata if k.startswith("optimizer.") and k.endswith(".step"))
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    torch.save(WritesMarker(marker), state / "evil.distcp")
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo("evil.distcp", 0, (state / "evil.distcp").stat().st_size)
    (state / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(SystemExit, match=f"entry '{key}' is BytesStorageMetadata, not a tensor"):
        train.main(flags(demo, tmp_path / "out", 1, "--resume"))
    assert not marker.exists()
