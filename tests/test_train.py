"""train.py: what trains in each stage, resume == uninterrupted, 2-process FSDP == 1 process, the demo learns,
bad input stops before training; and the hard cases: signals to the whole process group, a stalled rank, a full
disk, a resume with other settings. Tiny random-init models on a small slice of the demo data, a few steps each.
Tests that start processes (the CLI, torchrun) are marked slow."""
import contextlib
import errno
import io
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
import torch.distributed.checkpoint as dcp
from PIL import Image
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

import checkpoint
import data
import distributed
import formats
import inference
import train
import train_cli
from checkpoint import latest_state
from clip import CLIPVisionTower
from demo import build_demo_inputs
from llama import Llama
from llava import LLaVA
from tokenizer import Tokenizer

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
    """A 4-step run (32 samples, batch 8) of the demo recipe on the demo's base checkpoints; stage 2 starts from
    demo/projector. `extra` may hold more --set items: the last value of a key wins."""
    projector = ["--projector", str(demo / "projector")] if stage == 2 else []
    return ["--recipe", "demo", "--stage", str(stage), "--model", str(demo / "base" / "llm"),
            "--vision-tower", str(demo / "base" / "clip"), "--data", str(demo / f"small{stage}.json"),
            "--image-folder", str(demo / "data" / "images"), "--out", str(out), *projector,
            "--set", "batch_size=8", "epochs=1", "lr=1e-2", "num_workers=0", *extra]


def base_parts(demo):
    """The demo's base LLM and tower with a fresh projector (seeded as the caller's RNG is)."""
    return LLaVA.from_parts(Llama.from_pretrained(demo / "base" / "llm"), formats.load_clip(demo / "base" / "clip"))


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return [r["loss"] for r in records(out)]


def leftovers(folder):
    """Temporary files or directories anywhere under folder."""
    return [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- what trains


@pytest.fixture(scope="module")
def eight_demo_steps(demo):
    train.main(["--stage", "1", "--set", f"demo_dir={demo}", "stop_after=8"])
    return demo / "stage1"


def test_demo_run_lowers_the_loss(eight_demo_steps):
    curve = losses(eight_demo_steps)
    assert len(curve) == 8 and sum(curve[-3:]) / 3 < curve[0] - 0.1, curve


def test_stop_after_writes_a_training_state(eight_demo_steps):
    assert (eight_demo_steps / "checkpoints" / "step_0000008" / "state.json").is_file()
    assert not (eight_demo_steps / "projector.safetensors").exists()  # stopped: no output


@pytest.fixture(scope="module")
def whole_demo(demo, tmp_path_factory):
    """`python train.py` with nothing but a short run set: (demo root, returned model, what it printed)."""
    root = tmp_path_factory.mktemp("whole") / "demo"
    for part in ("data", "base"):  # the fixture's demo inputs, so that only the two stages run here
        shutil.copytree(demo / part, root / part)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        model = train.main(["--set", f"demo_dir={root}", "epochs=0.02", "eval_limit=8"])
    return root, model, printed.getvalue()


def test_no_stage_runs_stage_1_then_stage_2(whole_demo):
    root, model, _ = whole_demo
    assert (root / "stage1" / "projector.safetensors").is_file() and (root / "stage2" / "model.safetensors").is_file()
    assert model is not None and model.llm.embed_tokens.weight.requires_grad  # the model of stage 2


def test_no_stage_prints_the_demo_accuracy_last(whole_demo):
    _, _, out = whole_demo
    assert out.index("stage 1 (demo):") < out.index("stage 2 (demo):") < out.index("demo accuracy:")
    assert re.search(r"demo accuracy: \d+\.\d% \(\d+/8\)", out)


@pytest.fixture(scope="module")
def stage1_run(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("s1")
    torch.manual_seed(0)  # train.py draws the projector with seed 0 the same way
    initial = base_parts(demo).projector.state_dict()
    return initial, train.main(flags(demo, out, 1)), out


def test_stage1_leaves_the_llm_and_the_tower(demo, stage1_run):
    _, model, _ = stage1_run
    base_llm = Llama.from_pretrained(str(demo / "base" / "llm")).state_dict()
    base_tower = CLIPVisionTower.from_pretrained(str(demo / "base" / "clip")).state_dict()
    assert all(torch.equal(v, base_llm[k]) for k, v in model.llm.state_dict().items())
    assert all(torch.equal(v, base_tower[k]) for k, v in model.vision_tower.state_dict().items())


def test_stage1_trains_and_saves_only_the_projector(stage1_run):
    initial, model, out = stage1_run
    saved = load_file(out / "projector.safetensors")
    assert saved.keys() == {"projector." + k for k in initial}
    assert all(not torch.equal(saved["projector." + k], v) for k, v in initial.items())
    assert all(torch.equal(saved["projector." + k], v) for k, v in model.projector.state_dict().items())


@pytest.fixture(scope="module")
def stage2_run(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("s2")
    return train.main(flags(demo, out, 2, "lr=1e-3")), out


def test_stage2_trains_llm_and_projector_not_the_tower(demo, stage2_run):
    model, _ = stage2_run
    base_tower = CLIPVisionTower.from_pretrained(str(demo / "base" / "clip")).state_dict()
    assert all(torch.equal(v, base_tower[k]) for k, v in model.vision_tower.state_dict().items())
    base_llm = Llama.from_pretrained(str(demo / "base" / "llm")).state_dict()
    assert not torch.equal(model.llm.layers[0].mlp.up_proj.weight, base_llm["layers.0.mlp.up_proj.weight"])


def test_stage2_output_is_a_complete_checkpoint(stage2_run):
    # it loads as LLaVA with the stage-2 template, beside its tokenizer, and holds the trained weights
    model, out = stage2_run
    loaded = LLaVA.from_pretrained(str(out))
    assert loaded.config.template == "vicuna_v1" and (out / "tokenizer.model").is_file()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="compile on a CPU needs a C++ compiler")
def test_compiled_blocks_train_to_the_same_losses_and_weights(demo, stage2_run, tmp_path):
    # compile=true: each decoder block through torch.compile (fused element-wise ops), the same math as eager
    model, out = stage2_run
    compiled = train.main(flags(demo, tmp_path / "compiled", 2, "lr=1e-3", "compile=true"))
    assert compiled.llm.layers[0]._compiled_call_impl is not None
    eager, fused = losses(out), losses(tmp_path / "compiled")
    assert len(fused) == 4 and all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(eager, fused)), (eager, fused)
    weights = compiled.state_dict()
    assert all((v - weights[k]).abs().max() <= 1e-5 for k, v in model.state_dict().items())


def test_a_run_ends_with_a_training_state_then_the_output(stage2_run):
    _, out = stage2_run
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000004"] and not leftovers(out)


# ---------------------------------------------------------------------------------------------- anyres

ANYRES_SIZES = ((48, 48), (96, 40), (40, 80))  # square, wide and tall: 78, 114 and 120 image tokens with the demo's


@pytest.fixture(scope="module")
def anyres_run(demo, tmp_path_factory):
    """A 2-step anyres stage 2 (16 rows, batch 8) on the demo's images resized square, wide and tall, every fourth
    row asking about two images in one turn: (settings, the returned model, out, the images folder)."""
    root = tmp_path_factory.mktemp("anyres")
    (root / "images").mkdir()
    rows = json.loads((demo / "small2.json").read_text())[:16]
    for i, row in enumerate(rows):
        image = Image.open(demo / "data" / "images" / row["image"])
        image.resize(ANYRES_SIZES[i % 3]).save(root / "images" / f"{i}.png")
        row["image"] = f"{i}.png"
    for i, row in list(enumerate(rows))[::4]:
        human = row["conversations"][0]
        human["value"] = "Compare <image> with <image>. " + human["value"].replace("<image>", "").strip()
        row["image"] = [row["image"], rows[i + 1]["image"]]
    (root / "rows.json").write_text(json.dumps(rows))
    paths = ["--data", str(root / "rows.json"), "--image-folder", str(root / "images")]
    settings = ["image_aspect_ratio=anyres", "batch_size=8", "lr=1e-3", "peak_tflops=1"]
    model = train.main(flags(demo, root / "out", 2, *settings) + paths)
    return settings, model, root / "out", root / "images"


def test_anyres_stage_2_trains_image_newline_and_counts_flops_per_tile(demo, anyres_run):
    settings, model, out, images = anyres_run
    config = train.make_config("demo", 2, settings, model=str(demo / "base" / "llm"), projector=str(demo / "projector"),
                               vision_tower=str(demo / "base" / "clip"))
    initial = train.build_model(config).image_newline  # the same seed draws the same first value
    assert not torch.equal(model.image_newline, initial)
    assert [r["step"] for r in records(out)] == [1, 2] and all(r["mfu"] > 0 for r in records(out))


def test_anyres_output_carries_its_settings_and_answers_as_the_trained_model(anyres_run):
    _, model, out, images = anyres_run
    loaded, tokenizer = inference.load_model(str(out), "cpu", "float32")
    c = loaded.config
    assert (c.image_aspect_ratio, c.patch_merge_type) == ("anyres", "spatial_unpad")
    assert c.image_grid_pinpoints == [[48, 96], [96, 48], [96, 96], [144, 48], [48, 144]]  # LLaVA-1.6's, 48 px tiles
    for image in ("0.png", "1.png"):  # 48 x 48 and 96 x 40
        question = "What color is the shape?"
        assert inference.answer(loaded, tokenizer, question, str(images / image)) == inference.answer(
            model.eval(), tokenizer, question, str(images / image))


# ---------------------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def resumed(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    full = train.main(flags(demo, root / "full", 2, "lr=1e-3"))
    train.main(flags(demo, root / "cut", 2, "lr=1e-3", "stop_after=2"))
    assert not (root / "cut" / "model.safetensors").exists()  # stopped: a training state, no final model
    return full, train.main(flags(demo, root / "cut", 2, "lr=1e-3", "--resume")), root


def test_resume_continues_to_the_same_weights(resumed):
    full, resumed_model, _ = resumed
    for (name, a), b in zip(full.state_dict().items(), resumed_model.state_dict().values()):
        assert (a - b).abs().max() <= 1e-6, name


def test_resume_continues_with_the_same_losses(resumed):
    _, _, root = resumed
    assert losses(root / "cut") == pytest.approx(losses(root / "full"), rel=1e-6)


@pytest.fixture(scope="module")
def cut(demo, tmp_path_factory):
    """A stage-1 run stopped after 2 of its 4 steps (a training state at step 2)."""
    out = tmp_path_factory.mktemp("cut")
    train.main(flags(demo, out, 1, "stop_after=2"))
    return out


@pytest.mark.parametrize("setting, message", [
    ("template=vicuna_v1", "template='plain', this run has 'vicuna_v1'"),
    ("seed=1", "seed=0, this run has 1"),
    ("max_length=1024", "max_length=2048, this run has 1024"),
    ("batch_size=4", "batch_size=8, this run has 4"),
])
def test_resume_refuses_a_state_trained_otherwise(demo, cut, setting, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.main(flags(demo, cut, 1, setting, "--resume"))


def test_resume_names_a_width_mismatch(demo, cut, tmp_path):
    state = tmp_path / "other_width"  # as if written by a model with a 64-wide LLM
    weights = load_file(demo / "projector" / "projector.safetensors")
    weights["projector.2.weight"] = torch.zeros(64, 128)
    dcp.save({"model": weights}, checkpoint_id=state, no_dist=True)
    shutil.copy(latest_state(cut) / "state.json", state)
    with pytest.raises(SystemExit, match=r"projector.2.weight is \[64, 128\], this model's is \[128, 128\]"):
        train.main(flags(demo, tmp_path / "out", 1, "--resume", str(state)))


def test_metrics_hold_each_step_once_after_a_resume(demo, tmp_path):
    train.main(flags(demo, tmp_path, 1, "stop_after=2"))
    # the run went on to log step 3, then died before its next training state
    (tmp_path / "metrics.jsonl").open("a").write(json.dumps({"step": 3, "loss": 0.0}) + "\n")
    train.main(flags(demo, tmp_path, 1, "--resume"))
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------- a full disk


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_at_the_final_save_keeps_the_training_state(demo, tmp_path, monkeypatch):
    def save_projector(self, path):  # a partial file, then the disk is full
        (Path(path) / "projector.safetensors").write_bytes(b"\0" * 100)
        full_disk()
    monkeypatch.setattr(LLaVA, "save_projector", save_projector)
    with pytest.raises(SystemExit) as error:
        train.main(flags(demo, tmp_path, 1))
    message = str(error.value)
    assert f"could not write {tmp_path}: No space left on device" in message
    assert re.search(r"needs about [\d.]+ MiB, [\d,.]+ MiB are free", message)
    assert str(tmp_path / "checkpoints" / "step_0000004") in message
    assert not (tmp_path / "projector.safetensors").exists() and not leftovers(tmp_path)
    assert json.loads((tmp_path / "checkpoints" / "step_0000004" / "state.json").read_text())["step"] == 4


def test_resume_after_a_full_disk_writes_the_output(demo, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(LLaVA, "save_projector", full_disk)
        with pytest.raises(SystemExit):
            train.main(flags(demo, tmp_path, 1))
    model = train.main(flags(demo, tmp_path, 1, "--resume"))
    saved = load_file(tmp_path / "projector.safetensors")
    assert all(torch.equal(saved["projector." + k], v) for k, v in model.projector.state_dict().items())
    assert len(records(tmp_path)) == 4


def test_full_disk_at_a_training_state_keeps_the_previous_one(demo, tmp_path, monkeypatch):
    train.main(flags(demo, tmp_path, 1, "stop_after=2"))
    class FullDisk(FileSystemWriter):
        def write_data(self, *args, **kwargs):
            full_disk()
    monkeypatch.setattr(checkpoint, "FileSystemWriter", FullDisk)
    with pytest.raises(SystemExit, match=re.escape(f"could not write {tmp_path / 'checkpoints' / 'step_0000003'}")):
        train.main(flags(demo, tmp_path, 1, "save_every=1", "--resume"))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000002"] and not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------- bad input


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


def test_a_tower_of_another_size_than_the_recipes_stops_before_training(demo, tmp_path):
    with pytest.raises(SystemExit, match="image_size 48, recipe demo has 336: --set image_size=48"):
        train.main(flags(demo, tmp_path / "bad", 1, "image_size=336"))
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------- processes


def wait_for_steps(out, n, proc, seconds=120):
    metrics, deadline = Path(out) / "metrics.jsonl", time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} steps logged in {seconds} s (exit code {proc.poll()})")


def check_state_and_log_agree(out):
    states = list((Path(out) / "checkpoints").glob("step_*"))
    assert len(states) == 1 and (states[0] / "state.json").is_file(), states
    step = json.loads((states[0] / "state.json").read_text())["step"]
    assert 2 <= step < 200 and len(losses(out)) == step


@pytest.mark.slow
def test_sigterm_writes_a_training_state(demo, tmp_path):
    proc = subprocess.Popen([sys.executable, "train.py", *flags(demo, tmp_path / "sig", 2, "epochs=50")], cwd=REPO,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_steps(tmp_path / "sig", 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    check_state_and_log_agree(tmp_path / "sig")


@pytest.mark.slow
def test_sigterm_to_the_process_group_spares_the_loader_workers(demo, tmp_path):
    # Slurm signals every process of the job: the loader workers must not die under the main process
    args = flags(demo, tmp_path / "sig", 2, "epochs=50", "num_workers=2")
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    wait_for_steps(tmp_path / "sig", 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    check_state_and_log_agree(tmp_path / "sig")


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *args]


@pytest.mark.slow
def test_two_processes_match_one(demo, tmp_path):
    one = train.main(flags(demo, tmp_path / "one", 2, "lr=1e-3"))
    # 2 ranks x 2 micro-batches of 2 with recomputed blocks vs 1 rank with one batch of 8: the same global batches;
    # the FSDP run also stops after 2 steps and resumes from its gathered training state
    args = flags(demo, tmp_path / "two", 2, "lr=1e-3", "micro_batch_size=2", "grad_checkpointing=true")
    for extra in (["stop_after=2"], ["--resume"]):
        result = subprocess.run(torchrun(*args, *extra), cwd=REPO, capture_output=True, text=True, timeout=180,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        assert "2 process(es)" in result.stdout
    single, fsdp = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(single) == len(fsdp) == 4
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(single, fsdp)), (single, fsdp)
    two = LLaVA.from_pretrained(str(tmp_path / "two")).state_dict()
    assert all((v - two[k]).abs().max() <= 1e-4 for k, v in one.state_dict().items())


def children(pid):
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:  # field 4: the parent's pid
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):  # a process that ended meanwhile
            pass
    return found


@pytest.mark.slow
def test_a_stalled_rank_ends_the_job_and_keeps_the_last_state(demo, tmp_path):
    out, log = tmp_path / "stall", tmp_path / "log.txt"
    args = flags(demo, out, 1, "epochs=50", "save_every=2", "dist_timeout=15")
    with log.open("w") as sink:
        proc = subprocess.Popen(torchrun(*args), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for_steps(out, 3, proc)
        rank1 = next(p for p in children(proc.pid) if b"RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes())
        os.kill(rank1, signal.SIGSTOP)  # hung: alive, but never answers a collective again
        deadline = time.time() + 120
        while time.time() < deadline and "continue with --resume" not in log.read_text():
            time.sleep(0.5)
        os.kill(rank1, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode != 0 and "within dist_timeout=15 s" in text, text[-3000:]
    state = latest_state(out)
    assert f"the last good training state: {state}" in text
    assert json.loads((state / "state.json").read_text())["step"] % 2 == 0 and not leftovers(out)


# ---------------------------------------------------------------------------------------------- LoRA (lora_r > 0)


def base_llava(demo):
    """The model a LoRA run starts from: the base LLM and tower with the stage-1 projector, fp32, eval mode."""
    model = base_parts(demo)
    formats.load_projector(model, str(demo / "projector"))
    return model


def image_batch(model):
    """(input_ids, pixel_values): one row with an image's placeholders, one text only."""
    P, generator = model.config.num_image_tokens, torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.llm.vocab_size, (2, P + 12), generator=generator)
    ids[0, 2:2 + P] = -200
    pixels = torch.randn(1, 3, model.config.image_size, model.config.image_size, generator=generator)
    return ids, pixels


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(*batch)[0]


def is_adapter(key):
    return key.endswith((".lora_A", ".lora_B"))


def test_lora_at_step_0_gives_the_base_models_logits(demo):
    # train.py's own model for a LoRA stage 2: adapters on, B = 0, so exactly the base model
    config = train.make_config("demo", 2, ["lora_r=4"], model=str(demo / "base" / "llm"),
                               vision_tower=str(demo / "base" / "clip"), projector=str(demo / "projector"))
    adapted, base = train.build_model(config), base_llava(demo)
    assert any(is_adapter(k) for k in adapted.state_dict())
    batch = image_batch(base)
    assert torch.equal(logits(adapted, batch), logits(base, batch))


def test_lora_flops_count_the_frozen_base_at_4n_and_the_adapters_at_6n(demo):
    base = base_llava(demo)
    full, frozen = distributed.flops_per_step(train.set_stage(base, 2), 2)(1, 0, 0), distributed.flops_per_step(base, 1)(1, 0, 0)
    train.set_stage(base, 2, lora_r=4)
    adapters = sum(v.numel() for k, v in base.state_dict().items() if is_adapter(k))
    assert full == 6 * frozen // 4 and distributed.flops_per_step(base, 2)(1, 0, 0) == frozen + 6 * adapters


@pytest.fixture(scope="module")
def lora_run(demo, tmp_path_factory):
    """A 4-step LoRA stage 2 (r 4, dropout 0.05) through train.main: (the returned adapted model, its output dir)."""
    out = tmp_path_factory.mktemp("lora")
    return train.main(flags(demo, out, 2, "lora_r=4")), out


def test_lora_trains_only_adapters_and_projector(demo, lora_run):
    model, _ = lora_run
    base = base_llava(demo).state_dict()
    trained = model.state_dict()
    assert trained.keys() - base.keys() and all(is_adapter(k) for k in trained.keys() - base.keys())
    changed = {k for k in base if not torch.equal(trained[k], base[k])}  # base tensors bit for bit until the merge
    assert changed == {k for k in base if k.startswith("projector.")}
    assert all(trained[k].abs().max() > 0 for k in trained if k.endswith(".lora_B"))  # B left 0: the LLM learned


def test_lora_output_is_a_plain_checkpoint_that_equals_the_adapted_model(demo, lora_run):
    model, out = lora_run
    loaded = LLaVA.from_pretrained(str(out))  # what chat.py and evaluate.py load: no adapter keys, merged weights
    assert loaded.state_dict().keys() == base_llava(demo).state_dict().keys() and (out / "tokenizer.model").is_file()
    batch = image_batch(loaded)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_lora_merged_change_of_each_adapted_weight_has_rank_at_most_r(demo, lora_run):
    _, out = lora_run
    base, merged = base_llava(demo).state_dict(), LLaVA.from_pretrained(str(out)).state_dict()
    adapted = [k for k in base if k.startswith("llm.layers.") and k.endswith("_proj.weight")]
    assert len(adapted) == 7 * 2  # q k v o gate up down in each of the demo's 2 blocks
    for key in adapted:
        delta = (merged[key] - base[key]).double()
        assert 1 <= torch.linalg.matrix_rank(delta, rtol=1e-5) <= 4, key
    assert all(torch.equal(merged[k], base[k]) for k in base if k not in adapted and not k.startswith("projector."))


def test_lora_adapter_file_on_the_base_model_gives_the_output(demo, lora_run):
    _, out = lora_run
    from lora import load_adapters, merge_lora
    assert (out / "adapter.safetensors").stat().st_size < (out / "model.safetensors").stat().st_size / 4
    model = base_parts(demo)  # any projector: the file's wins
    config = load_adapters(model, out)
    assert config["r"] == 4 and config["base_model"] == str(demo / "base" / "llm")
    output = LLaVA.from_pretrained(str(out)).state_dict()
    assert all(torch.equal(v, output[k]) for k, v in merge_lora(model).state_dict().items())


@pytest.fixture(scope="module")
def lora_resumed(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_resume")
    train.main(flags(demo, root / "full", 2, "lora_r=4"))
    train.main(flags(demo, root / "cut", 2, "lora_r=4", "stop_after=2"))
    saved = FileSystemReader(str(latest_state(root / "cut"))).read_metadata().state_dict_metadata
    state = [k.removeprefix("model.") for k in saved if k.startswith("model.")]  # the trained weights' names
    train.main(flags(demo, root / "cut", 2, "lora_r=4", "--resume"))
    return root, state


def test_lora_training_state_holds_only_adapters_and_projector(lora_resumed):
    _, state = lora_resumed
    assert state and all(is_adapter(k) or k.startswith("projector.") for k in state)


def test_lora_resume_continues_to_the_same_output(lora_resumed):
    root, _ = lora_resumed
    assert losses(root / "cut") == pytest.approx(losses(root / "full"), rel=1e-6)
    full, cut = (load_file(root / run / "model.safetensors") for run in ("full", "cut"))
    assert all((v - cut[k]).abs().max() <= 1e-6 for k, v in full.items())
    full, cut = (load_file(root / run / "adapter.safetensors") for run in ("full", "cut"))
    assert all((v - cut[k]).abs().max() <= 1e-6 for k, v in full.items())


def test_resume_refuses_a_state_of_another_lora_rank(demo, tmp_path):
    train.main(flags(demo, tmp_path, 2, "lora_r=4", "stop_after=1"))
    with pytest.raises(SystemExit, match=re.escape("lora_r=4, this run has 8")):
        train.main(flags(demo, tmp_path, 2, "lora_r=8", "--resume"))


@pytest.mark.slow
def test_lora_two_processes_match_one(demo, tmp_path):
    # FSDP2 shards each block holding frozen base weights and trained adapters; no dropout: its masks depend on
    # how the batch is split
    lora = ("lora_r=4", "lora_dropout=0")
    one = train.main(flags(demo, tmp_path / "one", 2, *lora))
    args = flags(demo, tmp_path / "two", 2, *lora, "micro_batch_size=2", "grad_checkpointing=true")
    for extra in (["stop_after=2"], ["--resume"]):
        result = subprocess.run(torchrun(*args, *extra), cwd=REPO, capture_output=True, text=True, timeout=180,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
    single, fsdp = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(single) == len(fsdp) == 4
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(single, fsdp)), (single, fsdp)
    merged = LLaVA.from_pretrained(str(tmp_path / "one"))
    two = LLaVA.from_pretrained(str(tmp_path / "two")).state_dict()
    assert all((v - two[k]).abs().max() <= 1e-4 for k, v in merged.state_dict().items())
    assert one is not None and (tmp_path / "two" / "adapter.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- what must stop a run


def test_a_diverged_run_stops_naming_the_step_and_keeps_nothing_non_finite(demo, tmp_path):
    with pytest.raises(SystemExit, match=r"step \d+: loss (nan|inf), gradient norm \w+: diverged"):
        train.main(flags(demo, tmp_path, 1, "lr=1e30"))
    logged = losses(tmp_path)
    assert logged and all(x == x and abs(x) != float("inf") for x in logged)  # never logged as 0 or NaN
    assert not (tmp_path / "projector.safetensors").exists() and latest_state(tmp_path) is None


def test_a_run_of_zero_steps_writes_nothing(demo, tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    args = flags(demo, tmp_path / "out", 1)
    args[args.index("--data") + 1] = str(tmp_path / "empty.json")
    with pytest.raises(SystemExit, match="empty.json: no usable samples"):
        train.main(args)
    assert not (tmp_path / "out").exists()


def test_the_last_partial_batch_is_kept_as_a_shorter_step(demo, tmp_path):
    train.main(flags(demo, tmp_path / "out", 1, "batch_size=12"))  # 32 samples: 12, 12, then 8
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[2]["tokens"] * 12 == records[0]["tokens"] * 8  # stage 1's samples are all of one length


def test_grad_clip_0_trains_as_no_clipping(demo, tmp_path):
    train.main(flags(demo, tmp_path / "off", 2, "grad_clip=0"))
    train.main(flags(demo, tmp_path / "huge", 2, "grad_clip=1e30"))
    assert losses(tmp_path / "off") == losses(tmp_path / "huge")


def edit_state(cut, tmp_path, edit):
    """A copy of the cut run whose state.json went through edit(dict)."""
    shutil.copytree(cut, tmp_path / "run")
    file = latest_state(tmp_path / "run") / "state.json"
    state = json.loads(file.read_text())
    edit(state)
    file.write_text(json.dumps(state))
    return tmp_path / "run"


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(step=-3), r"'step' is -3, not a step of this run \(0\.\.4\)"),
    (lambda s: s.update(step="2"), r"'step' is '2', not a step"),
    (lambda s: s.update(step=10**9), r"'step' is 1000000000, not a step of this run"),
    (lambda s: s.pop("rng"), r"'rng' is not the RNG state save_state writes"),
])
def test_a_hand_edited_state_json_is_refused_naming_the_file(demo, cut, tmp_path, edit, message):
    run = edit_state(cut, tmp_path, edit)
    with pytest.raises(SystemExit, match=r"state\.json: " + message):
        train.main(flags(demo, run, 1, "--resume"))


def test_a_missing_data_file_of_a_state_is_named(demo, cut, tmp_path):
    shutil.copytree(cut, tmp_path / "run")
    for shard in latest_state(tmp_path / "run").glob("*.distcp"):
        shard.unlink()
    with pytest.raises(SystemExit, match=r"step_0000002: the training state's data cannot be read"):
        train.main(flags(demo, tmp_path / "run", 1, "--resume"))


def test_resume_trains_with_this_runs_projector_lr(demo, tmp_path):
    config = train.make_config("demo", 2, ["projector_lr=1e-2"], model=str(demo / "base" / "llm"),
                               vision_tower=str(demo / "base" / "clip"), projector=str(demo / "projector"),
                               out=str(tmp_path))
    model = train.build_model(config)
    state = checkpoint.save_state(model, train.make_optimizer(model, config), 1, tmp_path, {})
    config.projector_lr = 5e-2
    optimizer = train.make_optimizer(model, config)
    checkpoint.load_state(state, tmp_path, model, optimizer, {})
    assert sorted({g["lr_scale"] for g in optimizer.param_groups}) == [1.0, 5e-2 / config.lr]


def test_a_full_disk_reported_by_safetensors_keeps_the_training_state(demo, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def save_projector(self, path):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')
    monkeypatch.setattr(LLaVA, "save_projector", save_projector)
    with pytest.raises(SystemExit, match=rf"could not write {re.escape(str(tmp_path))}: Error while serializing.*"
                                         r"needs about .* MiB are free there.\nThe trained weights are safe in"):
        train.main(flags(demo, tmp_path, 1))
    assert latest_state(tmp_path) is not None and not leftovers(tmp_path)


def test_a_full_disk_reported_by_torch_during_a_state_keeps_the_previous_one(demo, tmp_path, monkeypatch):
    train.main(flags(demo, tmp_path, 1, "stop_after=2"))

    class FullDisk(FileSystemWriter):
        def write_data(self, *args, **kwargs):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(checkpoint, "FileSystemWriter", FullDisk)
    with pytest.raises(SystemExit, match="step_0000003: PytorchStreamWriter failed writing file"):
        train.main(flags(demo, tmp_path, 1, "save_every=1", "--resume"))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000002"] and not leftovers(tmp_path)


def fixed_batch(demo, n=6):
    """A tiny stage-2 model and n demo samples (answers of different lengths)."""
    torch.manual_seed(0)
    model = train.set_stage(base_parts(demo).train(), 2)
    dataset = data.LLaVADataset(str(demo / "small2.json"), str(demo / "data" / "images"),
                                Tokenizer(str(demo / "base" / "llm")), "vicuna_v1", model.config.num_image_tokens,
                                model.config.image_size, True)
    return model, [dataset[i] for i in range(n)]


def direct_loss(model, samples, groups):
    """The loss written out: per group, the sum of its answer tokens' losses over their count; the mean of those."""
    means = []
    for group in groups:
        losses = torch.cat([model(s["input_ids"][None], s["pixel_values"], s["labels"][None])[1]
                            for s in (samples[i] for i in group)])
        means.append(losses.sum() / len(losses))
    return torch.stack(means).mean()


@pytest.mark.parametrize("loss_group, groups", [(0, [[0, 1, 2, 3, 4, 5]]), (2, [[0, 1], [2, 3], [4, 5]]),
                                                (3, [[0, 1, 2], [3, 4, 5]])])
def test_train_step_loss_and_gradient_equal_the_direct_form_for_any_micro_batch(demo, loss_group, groups):
    model, samples = fixed_batch(demo)
    assert len({int((s["labels"] != -100).sum()) for s in samples}) > 1  # unequal groups tell the forms apart
    want = direct_loss(model, samples, groups)
    want.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for micro in (1, 4, 6):  # micro-batches that cut through groups
        for n, p in model.named_parameters():
            p.grad = None
            if p.requires_grad:
                p.data.copy_(start[n])
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD([{"params": trained, "lr_scale": 1.0}], lr=1.0)  # the weights move by -gradient
        n_groups = len(groups)
        micro_batches = [data.collate(samples[i:i + micro], 0) | {"group": torch.tensor(
            [next(g for g, members in enumerate(groups) if j in members) for j in range(i, min(i + micro, 6))])}
            for i in range(0, 6, micro)]
        loss, *_ = train.train_step(model, optimizer, micro_batches, 1.0, 0.0, torch.device("cpu"),
                                    n_groups=n_groups)
        assert abs(loss - want.item()) <= 1e-5 * want.item(), (micro, loss, want.item())
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(start[n] - p.detach(), grads[n], atol=1e-6, rtol=1e-4)


def test_the_two_loss_forms_differ_on_groups_of_unequal_answers(demo):
    model, samples = fixed_batch(demo)
    with torch.no_grad():
        one = direct_loss(model, samples, [[0, 1, 2, 3, 4, 5]])
        three = direct_loss(model, samples, [[0, 1], [2, 3], [4, 5]])
    assert abs(one - three) > 1e-4


@pytest.mark.slow
def test_two_processes_match_one_with_loss_groups_across_ranks_and_a_short_last_batch(demo, tmp_path):
    rows = json.loads((demo / "small2.json").read_text())[:31]  # batches of 10: 10, 10, 10, then 1 (one rank idle)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    args = flags(demo, tmp_path / "one", 2, "lr=1e-3", "batch_size=10", "loss_group=5")
    args[args.index("--data") + 1] = str(tmp_path / "d.json")
    one = train.main(args)
    args[args.index("--out") + 1] = str(tmp_path / "two")
    result = subprocess.run(torchrun(*args, "micro_batch_size=1"), cwd=REPO, capture_output=True, text=True,
                            timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    single, fsdp = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(single) == len(fsdp) == 4
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(single, fsdp)), (single, fsdp)
    two = LLaVA.from_pretrained(str(tmp_path / "two")).state_dict()
    assert all((v - two[k]).abs().max() <= 1e-4 for k, v in one.state_dict().items())


def _stage2_config(demo, projector, *sets):
    return train.make_config("demo", 2, list(sets), model=str(demo / "base" / "llm"),
                             vision_tower=str(demo / "base" / "clip"), projector=projector)


def test_projector_scratch_starts_stage_2_from_a_fresh_seeded_projector(demo):
    fresh = train.build_model(_stage2_config(demo, "scratch")).projector.state_dict()
    train_cli.check_inputs(_stage2_config(demo, "scratch"))  # accepted where a stage-1 folder is expected
    again = train.build_model(_stage2_config(demo, "scratch")).projector.state_dict()
    loaded = train.build_model(_stage2_config(demo, str(demo / "projector"))).projector.state_dict()
    assert all(torch.equal(fresh[k], again[k]) for k in fresh)
    assert not all(torch.equal(fresh[k], loaded[k]) for k in fresh)


def test_select_layer_reaches_the_model_and_its_features(demo):
    model = train.build_model(_stage2_config(demo, str(demo / "projector"), "select_layer=-1"))
    pixels = torch.rand(1, 3, model.config.image_size, model.config.image_size)
    assert model.config.select_layer == -1
    penultimate = train.build_model(_stage2_config(demo, str(demo / "projector")))
    with torch.no_grad():
        assert not torch.equal(model.encode_images(pixels)[0], penultimate.encode_images(pixels)[0])
