"""train.py: what trains in each stage, resume == uninterrupted, 2-process FSDP == 1 process, the demo learns,
bad input stops before training. Tiny random-init models on a small slice of the demo data, a few steps each."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from demo import build_demo_inputs
from clip import CLIPVisionTower
from llama import Llama
from llava import LLaVA

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared CPU


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's data and base checkpoints, 32-sample slices of its stage-1/2 data, and a stage-1 projector."""
    root = tmp_path_factory.mktemp("demo")
    build_demo_inputs(root, rank=0)
    for stage in (1, 2):
        rows = json.loads((root / "data" / f"stage{stage}.json").read_text())
        (root / f"small{stage}.json").write_text(json.dumps(rows[:32]))
    train.main(flags(root, root / "projector", 1))
    return root


def flags(demo, out, stage, *extra):
    """A 4-step run (32 samples, batch 8) on the demo's base checkpoints; stage 2 starts from demo/projector."""
    projector = ["--projector", str(demo / "projector")] if stage == 2 else []
    return ["--stage", str(stage), "--model", str(demo / "base" / "llm"), "--vision-tower", str(demo / "base" / "clip"),
            "--data", str(demo / f"small{stage}.json"), "--image-folder", str(demo / "data" / "images"),
            "--out", str(out), "--batch-size", "8", "--epochs", "1", "--lr", "1e-2", "--num-workers", "0",
            *projector, *extra]


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_demo_run_lowers_the_loss(demo):
    train.main(["--stage", "1", "--demo-dir", str(demo), "--stop-after", "8"])
    curve = losses(demo / "stage1")
    assert len(curve) == 8 and sum(curve[-3:]) / 3 < curve[0] - 0.1, curve
    assert (demo / "stage1" / "checkpoints" / "step_0000008" / "state.json").is_file()  # --stop-after saves


def test_no_stage_runs_the_whole_demo(demo, tmp_path, capsys):
    root = tmp_path / "demo"
    for part in ("data", "base"):  # the fixture's demo inputs, so that only the two stages run here
        shutil.copytree(demo / part, root / part)
    model = train.main(["--demo-dir", str(root), "--epochs", "0.02", "--eval-limit", "8"])
    assert (root / "stage1" / "projector.safetensors").is_file() and (root / "stage2" / "model.safetensors").is_file()
    assert model is not None and model.llm.embed_tokens.weight.requires_grad  # the model of stage 2
    out = capsys.readouterr().out
    assert out.index("stage 1:") < out.index("stage 2:") < out.index("demo accuracy:")
    assert re.search(r"demo accuracy: \d+\.\d% \(\d+/8\)", out)
    with pytest.raises(SystemExit, match="--stage 1 or --stage 2 is required"):
        train.main(["--data", "x.json", "--model", "m"])


def test_stage1_trains_only_the_projector(demo, tmp_path):
    torch.manual_seed(0)  # train.py draws the projector with --seed 0 the same way
    initial = LLaVA.from_parts(str(demo / "base" / "llm"), str(demo / "base" / "clip")).projector.state_dict()
    model = train.main(flags(demo, tmp_path / "s1", 1))
    base_llm = Llama.from_pretrained(str(demo / "base" / "llm")).state_dict()
    base_tower = CLIPVisionTower.from_pretrained(str(demo / "base" / "clip")).state_dict()
    assert all(torch.equal(v, base_llm[k]) for k, v in model.llm.state_dict().items())
    assert all(torch.equal(v, base_tower[k]) for k, v in model.vision_tower.state_dict().items())
    saved = load_file(tmp_path / "s1" / "projector.safetensors")
    assert saved.keys() == {"projector." + k for k in initial}
    assert all(not torch.equal(saved["projector." + k], v) for k, v in initial.items())
    assert all(torch.equal(saved["projector." + k], v) for k, v in model.projector.state_dict().items())


def test_stage2_trains_llm_and_projector_not_the_tower(demo, tmp_path):
    model = train.main(flags(demo, tmp_path / "s2", 2, "--lr", "1e-3"))
    base_tower = CLIPVisionTower.from_pretrained(str(demo / "base" / "clip")).state_dict()
    assert all(torch.equal(v, base_tower[k]) for k, v in model.vision_tower.state_dict().items())
    base_llm = Llama.from_pretrained(str(demo / "base" / "llm")).state_dict()
    assert not torch.equal(model.llm.layers[0].mlp.up_proj.weight, base_llm["layers.0.mlp.up_proj.weight"])
    # the output is a complete checkpoint: it loads as LLaVA with the stage-2 template, beside its tokenizer
    loaded = LLaVA.from_pretrained(str(tmp_path / "s2"))
    assert loaded.config.template == "vicuna_v1" and (tmp_path / "s2" / "tokenizer.model").is_file()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_resume_continues_exactly(demo, tmp_path):
    full = train.main(flags(demo, tmp_path / "full", 2, "--lr", "1e-3"))
    train.main(flags(demo, tmp_path / "cut", 2, "--lr", "1e-3", "--stop-after", "2"))
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # stopped: a training state, no final model
    resumed = train.main(flags(demo, tmp_path / "cut", 2, "--lr", "1e-3", "--resume"))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert (a - b).abs().max() <= 1e-6, name
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), rel=1e-6)


def test_sigterm_writes_a_training_state_and_resume_finishes(demo, tmp_path):
    args = flags(demo, tmp_path / "sig", 2, "--epochs", "50")
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    states = list((tmp_path / "sig" / "checkpoints").glob("step_*"))
    assert len(states) == 1 and (states[0] / "optimizer.safetensors").is_file()
    step = json.loads((states[0] / "state.json").read_text())["step"]
    assert 2 <= step < 200 and len(losses(tmp_path / "sig")) == step


def test_two_processes_match_one(demo, tmp_path):
    one = train.main(flags(demo, tmp_path / "one", 2, "--lr", "1e-3"))
    # 2 ranks x 2 micro-batches of 2 with recomputed blocks vs 1 rank with one batch of 8: the same global batches;
    # the FSDP run also stops after 2 steps and resumes from its gathered training state
    args = flags(demo, tmp_path / "two", 2, "--lr", "1e-3", "--micro-batch-size", "2", "--grad-checkpointing")
    for extra in (["--stop-after", "2"], ["--resume"]):
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "train.py", *args, *extra], cwd=REPO, capture_output=True, text=True,
                                timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        assert "2 process(es)" in result.stdout
    single, fsdp = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(single) == len(fsdp) == 4
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(single, fsdp)), (single, fsdp)
    two = LLaVA.from_pretrained(str(tmp_path / "two")).state_dict()
    assert all((v - two[k]).abs().max() <= 1e-4 for k, v in one.state_dict().items())


@pytest.mark.parametrize("flag, value, message", [
    ("--data", "missing.json", "--data: no such file"),
    ("--image-folder", "no_images", "--image-folder: no such directory"),
    ("--projector", "no_stage1", "--projector: no such directory"),
    ("--projector", None, "stage 2 from a base LLM needs the stage-1 projector"),
])
def test_bad_input_stops_before_training(demo, tmp_path, flag, value, message):
    args = flags(demo, tmp_path / "bad", 2)
    i = args.index(flag)
    args[i:i + 2] = [flag, str(tmp_path / value)] if value else []
    with pytest.raises(SystemExit, match=message):
        train.main(args)
    assert not (tmp_path / "bad").exists()  # nothing written: it stopped before training
