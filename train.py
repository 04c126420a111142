"""Train LLaVA: stage 1 aligns the image features (projector only), stage 2 tunes on instructions (projector + LLM).

    python train.py                                          # the built-in demo, stage 1 then 2: minutes on a CPU
    python train.py --stage 1 && python train.py --stage 2   # the same demo, one stage at a time
    python train.py --recipe llava-v1.5 --stage 2 --dry-run  # the resolved config as one JSON object
    torchrun --nproc_per_node 8 train.py --recipe llava-v1.5 --stage 1 --model vicuna-7b-v1.5 \\
        --vision-tower clip-vit-large-patch14-336 --data blip_laion_cc_sbu_558k.json --image-folder images \\
        --out runs/stage1 --set micro_batch_size=32
    torchrun --nproc_per_node 8 train.py --recipe llava-v1.5 --stage 2 --model vicuna-7b-v1.5 \\
        --vision-tower clip-vit-large-patch14-336 --projector runs/stage1 --data llava_v1_5_mix665k.json \\
        --image-folder playground/data --out runs/stage2 --set micro_batch_size=16

Recipes are data: TrainConfig holds every hyperparameter and RECIPES names the original scripts' values
(`llava-v1` = the paper, `llava-v1.5`, `llava-v1.5-lora`, `scienceqa`, `demo`); `--set key=value` overrides any
field. Flags are for paths and actions only. With no --data and --model the demo runs (recipe `demo` unless
--recipe names another); with real paths --recipe is required, so a real run never trains on values nobody chose.

The two stages are one loop that differs only in which parameters require grad; the CLIP tower never trains.
With lora_r > 0 (recipe `llava-v1.5-lora`, or `--set lora_r=N`) stage 2 trains the projector and LoRA adapters on
the LLM's block linears (lora.py), the LLM frozen; the output has them merged in, adapter.safetensors beside it.
One process when RANK is unset; under torchrun every decoder block and then the whole model is sharded with FSDP2
(bf16 compute with fp32 gradient reduction on CUDA, fp32 and gloo on CPU). The loss of a step is the mean over all
answer tokens of the global batch, so it does not depend on how the batch is split over GPUs and micro-batches.
A run ends with a training state (checkpoints/step_N: trained weights, optimizer, RNG) and then the output, so a
failed final write loses nothing. A rank that stalls for dist_timeout seconds ends the job; on gloo with a message
naming the last good state (NCCL's watchdog aborts the process itself). Under torchrun each rank reads only its own
shards of the base weights (memory-mapped) and writes only its own shards of a training state (DCP, which resumes on
any number of ranks). `precision` bf16 (the default on CUDA) runs the same code on a CPU. Limits: one cosine schedule.
"""
import argparse
import json
import math
import os
import pickle
import random
import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import formats
from demo import DEMO_CLIP, build_demo_inputs, demo_accuracy
from fileio import append_jsonl, fresh_dir, read_json, read_jsonl, write_json, write_text
from llama import LlamaConfig, Tokenizer, hf_to_llama_keys, load_checkpoint
from llava import LLaVA, LLaVAConfig
from projector import build_projector
from lora import apply_lora, initial_adapters, merge_lora, save_adapters

# -----------------------------------------------------------------------------------------------------------------
# config: one dataclass, named recipes, the command line


@dataclass
class TrainConfig:
    recipe: str = "demo"  # the named recipe the values came from (RECIPES)
    stage: int = 1  # 1: the projector learns to align features; 2: projector + LLM learn to follow instructions
    lr: float = 2e-5  # peak learning rate
    projector_lr: float = 0.0  # peak lr of the projector (the original's mm_projector_lr); 0: the same as lr
    batch_size: int = 128  # global batch in samples (per-device batch x GPUs x accumulation in the original)
    micro_batch_size: int = 0  # samples per forward per process; 0: the process's whole share of the batch at once
    epochs: float = 1.0  # passes over the data; the last partial batch of each epoch is left out
    warmup_ratio: float = 0.03  # share of the steps with linear warmup from 0 (HF Trainer)
    weight_decay: float = 0.0  # AdamW decay of the weight matrices; never applied to norms and biases
    grad_clip: float = 1.0  # max global gradient norm (HF Trainer's max_grad_norm)
    projector_type: str = "mlp2x_gelu"  # "linear": the paper; "mlp2x_gelu": LLaVA-1.5
    image_size: int = 336  # the tower's input size in the recipe (ViT-L/14: 224, -336: 336); other: error; 0: any
    template: str = "vicuna_v1"  # conversation template (data.TEMPLATES): "plain" for stage-1 captions
    image_aspect_ratio: str = "square"  # "square": resize + centre-crop (CLIP's); "pad": pad to a square first
    max_length: int = 2048  # tokens per sample, image tokens included (model_max_length)
    group_by_length: bool = False  # batches of similar length and one modality: less padding (LLaVA-1.5 stage 2)
    grad_checkpointing: bool = True  # recompute each decoder block in backward: less memory, ~1/3 more compute
    compile: bool = False  # torch.compile each decoder block: element-wise ops fused (the first step compiles)
    lora_r: int = 0  # stage 2: LoRA rank on the 7 linears of every LLM block, base frozen (lora.py); 0: full tuning
    lora_alpha: float = 0.0  # LoRA update scale alpha / r; 0: 2 * lora_r (LLaVA-1.5's 256 for r=128)
    lora_dropout: float = 0.05  # dropout on the adapters' input (LLaVA's default lora_dropout)
    num_workers: int = 4  # data loader processes
    skip_bad: bool = False  # skip unreadable rows and images (counted and reported) instead of stopping
    seed: int = 0  # the projector's init and the data order
    save_every: int = 0  # write a training state every N steps; 0: only when stopped and at the end
    stop_after: int = 0  # stop after this step with a training state; 0: run to the end
    dist_timeout: float = 300.0  # seconds a collective waits for a stalled rank before the job ends
    precision: str = "auto"  # "bf16": bf16 compute, fp32 master weights and reduction; "fp32"; "auto": bf16 on CUDA
    threads: int = 0  # torch CPU threads; 0: torch's choice
    peak_tflops: float = 0.0  # accelerator peak for the MFU column; 0: the known cards (PEAK_TFLOPS)
    demo_dir: str = "runs/demo"  # the demo's data, base models and outputs
    eval_limit: int = 0  # demo: score only the first N held-out questions; 0: all
    # paths and actions: from the flags, not from recipes (--set refuses them)
    model: str | None = None  # base LLM directory (HF LLaMA/Vicuna), or a LLaVA checkpoint to go on from
    vision_tower: str | None = None  # CLIP directory (HF layout); not needed with a LLaVA checkpoint
    projector: str | None = None  # stage-1 output directory (projector.safetensors or mm_projector.bin)
    data: str | None = None  # LLaVA JSON: a list of {id, image, conversations}
    image_folder: str | None = None  # folder the image paths in data are relative to
    tokenizer: str | None = None  # tokenizer.model; default: the one in the model directory
    out: str | None = None  # output directory; default runs/stage<N> (demo: <demo_dir>/stage<N>)
    resume: str | None = None  # a training state directory, or "latest" in <out>/checkpoints
    demo: bool = False  # no --data and --model: build the demo's inputs, print its accuracy at the end


PATH_FIELDS = ("model", "vision_tower", "projector", "data", "image_folder", "tokenizer", "out", "resume")
CHOICES = {"projector_type": ("linear", "mlp2x_gelu"), "template": tuple(data.TEMPLATES),
           "image_aspect_ratio": ("square", "pad"), "precision": ("auto", "bf16", "fp32")}
# the demo: tiny models from scratch on 2 CPU cores; its fast projector lr reads the random tower in minutes.
# One thread: when another process holds a core, 2 OpenMP threads wait on each other and run 10-20x slower
DEMO = dict(projector_type="mlp2x_gelu", image_size=DEMO_CLIP["image_size"], image_aspect_ratio="pad",
            group_by_length=True, grad_checkpointing=False, num_workers=0, threads=1)
# stage -> the values that differ from TrainConfig's defaults, which are the original scripts' shared ones:
# warmup 0.03, weight decay 0, cosine, max length 2048, gradient checkpointing (haotian-liu/LLaVA, scripts/)
RECIPES = {
    "llava-v1": {  # the paper: scripts/pretrain.sh (CC-595K), then Section 4's 3 epochs of LLaVA-Instruct-158K
        1: dict(lr=2e-3, batch_size=128, epochs=1, template="plain", projector_type="linear", image_size=224),
        2: dict(lr=2e-5, batch_size=32, epochs=3, template="vicuna_v1", projector_type="linear", image_size=224)},
    "llava-v1.5": {  # scripts/v1_5/pretrain.sh (LCS-558K) and v1_5/finetune.sh (the 665K mix)
        1: dict(lr=1e-3, batch_size=256, epochs=1, template="plain"),
        2: dict(lr=2e-5, batch_size=128, epochs=1, template="vicuna_v1", image_aspect_ratio="pad",
                group_by_length=True)},  # group_by_modality_length
    "llava-v1.5-lora": {  # scripts/v1_5/finetune_lora.sh: stage 2 only, from llava-v1.5's stage-1 projector
        2: dict(lr=2e-4, projector_lr=2e-5, batch_size=128, epochs=1, template="vicuna_v1", image_aspect_ratio="pad",
                group_by_length=True, lora_r=128, lora_alpha=256.0, lora_dropout=0.05)},
    "scienceqa": {  # scripts/finetune_sqa.sh: stage 2 only, from the paper's stage-1 projector
        2: dict(lr=2e-5, batch_size=128, epochs=12, template="vicuna_v1", projector_type="linear", image_size=224)},
    "demo": {
        1: dict(lr=1e-3, batch_size=32, epochs=1, template="plain", **DEMO),
        2: dict(lr=2e-3, projector_lr=1e-2, batch_size=16, epochs=4, template="vicuna_v1", **DEMO)},
}
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "A10G": 70, "4090": 165}  # dense bf16, for MFU


def fail(message):
    raise SystemExit(f"train.py: error: {message}")


def make_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipes = ", ".join(f"{name} (stage {' and '.join(map(str, stages))})" for name, stages in RECIPES.items())
    p.add_argument("--recipe", choices=RECIPES, metavar="NAME",
                   help=f"named values (default: demo; required with --data/--model): {recipes}")
    p.add_argument("--stage", type=int, choices=(1, 2), help="1 or 2; left out: the whole demo, stage 1 then 2")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override TrainConfig fields, e.g. --set lr=1e-4 micro_batch_size=8 (see --dry-run)")
    p.add_argument("--model", help="base LLM directory (HF LLaMA/Vicuna), or a LLaVA checkpoint to go on from")
    p.add_argument("--vision-tower", help="CLIP directory (HF layout); not needed with a LLaVA checkpoint")
    p.add_argument("--projector", help="stage-1 output directory; required in stage 2 from a base LLM")
    p.add_argument("--data", help="LLaVA JSON: a list of {id, image, conversations}")
    p.add_argument("--image-folder", help="folder the image paths in --data are relative to")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one in --model)")
    p.add_argument("--out", help="output directory (default runs/stage<N>; demo: <demo_dir>/stage<N>)")
    p.add_argument("--resume", nargs="?", const="latest", help="a training state directory (default: the latest)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as one JSON object and exit")
    return p


KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "text"}


def parse_value(key, text):
    kind = {f.name: f.type for f in fields(TrainConfig)}[key]
    try:
        if kind is bool:
            value = {"true": True, "1": True, "yes": True, "on": True,
                     "false": False, "0": False, "no": False, "off": False}[text.lower()]
        else:
            value = kind(text)
    except (KeyError, ValueError):
        fail(f"--set {key}={text}: {key} must be {KINDS[kind]}, not {text!r}")
    if key in CHOICES and value not in CHOICES[key]:
        fail(f"--set {key}={text}: {key} is one of {', '.join(CHOICES[key])}")
    return value


def stage_1_for(recipe):
    """The first recipe whose stage 1 makes a projector that `recipe`'s stage 2 can start from."""
    def fit(name, stage):  # a projector fits another run with the same projector type and tower image size
        config = TrainConfig(**RECIPES[name][stage])
        return config.projector_type, config.image_size
    return next(name for name in RECIPES if 1 in RECIPES[name] and fit(name, 1) == fit(recipe, 2))


def make_config(recipe="demo", stage=1, sets=(), demo=False, **paths):
    """The recipe's values for this stage, then each --set key=value in order, then the default paths."""
    if stage not in RECIPES[recipe]:
        fail(f"recipe {recipe} has no stage {stage}: it starts from a stage-1 projector (--recipe "
             f"{stage_1_for(recipe)} --stage 1)")
    config = TrainConfig(recipe=recipe, stage=stage, demo=demo, **RECIPES[recipe][stage], **paths)
    flagged = ("recipe", "stage", *PATH_FIELDS)
    settable = [f.name for f in fields(TrainConfig) if f.name not in (*flagged, "demo")]
    for item in sets:
        key, sep, text = item.partition("=")
        if key in flagged:
            fail(f"--set {item}: give {key} with its flag, --{key.replace('_', '-')}")
        if not sep or key not in settable:
            fail(f"--set {item}: expected KEY=VALUE with KEY one of {', '.join(settable)}")
        setattr(config, key, parse_value(key, text))
    config.projector_lr = config.projector_lr or config.lr
    if config.lora_r and config.stage == 1:
        fail(f"lora_r={config.lora_r} in stage 1: LoRA adapts the LLM, which stage 1 leaves frozen (it trains "
             f"only the projector); give lora_r in stage 2")
    if config.lora_r < 0:
        fail(f"lora_r={config.lora_r}: the LoRA rank is >= 1 (0: no LoRA)")
    config.lora_alpha = config.lora_alpha or 2.0 * config.lora_r
    root = Path(config.demo_dir)
    if demo:
        config.model, config.vision_tower = str(root / "base" / "llm"), str(root / "base" / "clip")
        config.data, config.image_folder = str(root / "data" / f"stage{stage}.json"), str(root / "data" / "images")
        config.projector = config.projector or (str(root / "stage1") if stage == 2 else None)
    config.out = config.out or str((root if demo else Path("runs")) / f"stage{stage}")
    config.tokenizer = config.tokenizer or (str(Path(config.model) / "tokenizer.model") if config.model else None)
    return config


def is_llava_checkpoint(path):
    """A LLaVA checkpoint to go on from (ours, the original release, llava-hf), not a base LLM."""
    try:
        return formats.detect_format(path) in (formats.OWN, "llava-original", "llava-hf")
    except (OSError, ValueError) as e:
        fail(f"--model: {e}")


def check_inputs(config, rank):
    """Build the demo's inputs, check every input path: bad input stops before any training."""
    if config.demo and config.stage == 1:
        build_demo_inputs(Path(config.demo_dir), rank)
    if config.demo and config.stage == 2 and not (Path(config.projector) / "projector.safetensors").is_file():
        fail(f"no stage-1 output in {config.projector}: run `python train.py --stage 1` first")
    llava_checkpoint = is_llava_checkpoint(config.model)
    for key, kind in (("data", "file"), ("image_folder", "dir"), ("model", "dir"), ("vision_tower", "dir"),
                      ("projector", "dir"), ("tokenizer", "file")):
        path = getattr(config, key)
        if path is not None and not (os.path.isfile(path) if kind == "file" else os.path.isdir(path)):
            fail(f"--{key.replace('_', '-')}: no such {'file' if kind == 'file' else 'directory'}: {path}")
    if config.projector and not any(os.path.isfile(os.path.join(config.projector, f))
                                    for f in ("projector.safetensors", "mm_projector.bin")):
        fail(f"--projector: {config.projector} holds no projector.safetensors (stage-1 output) or mm_projector.bin")
    if not llava_checkpoint and config.vision_tower is None:
        fail(f"--model {config.model} is a base LLM: give --vision-tower (a CLIP directory) too")
    if config.stage == 2 and not llava_checkpoint and config.projector is None:
        fail("stage 2 from a base LLM needs the stage-1 projector: give --projector <stage-1 output directory>")


# -----------------------------------------------------------------------------------------------------------------
# distributed init


def setup_distributed(timeout_s):
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # the default (10 to 30 min) leaves a job with one hung rank idling on every other GPU for that long
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


def all_sum(values, device):
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return totals.tolist()


# -----------------------------------------------------------------------------------------------------------------
# data order: a pure function of (seed, epoch), so a resumed run sees exactly the batches it would have seen


def epoch_order(dataset, epoch, world, config):
    """Global batches are consecutive runs of batch_size; with length grouping each one holds similar lengths and
    is split into `world` chunks of even token totals. The set of samples in a batch never depends on `world`."""
    generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    if config.group_by_length:
        return data.modality_length_grouped_indices(dataset.lengths, config.batch_size // world, world, generator)
    return torch.randperm(len(dataset), generator=generator).tolist()


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def worker_init(worker_id):
    """Slurm's SIGTERM and Ctrl-C reach the whole process group: the main process decides when to stop (after the
    step, with a training state), so its loader workers ignore both instead of dying under it. The workers start
    with both blocked (step_batches), so one that arrives before this runs is dropped here, not fatal."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def step_batches(dataset, epoch, first_step, steps_per_epoch, collate, rank, world, config):
    """Yields (step, [micro-batches of this rank]) from first_step on: each rank takes its contiguous share of the
    global batch, cut into micro-batches; the loader works ahead in worker processes."""
    order, local = epoch_order(dataset, epoch, world, config), config.batch_size // world
    micro = config.micro_batch_size or local
    index_lists = []
    for step in range(first_step, steps_per_epoch):
        mine = order[step * config.batch_size + rank * local:][:local]
        index_lists += [mine[i:i + micro] for i in range(0, local, micro)]
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # inherited by the workers: see worker_init
    try:
        loader = iter(DataLoader(dataset, batch_sampler=index_lists, collate_fn=collate,
                                 num_workers=config.num_workers, worker_init_fn=worker_init,
                                 pin_memory=torch.cuda.is_available(),
                                 # its own seed, not one drawn from the global RNG: that stream feeds LoRA's dropout,
                                 # which must see the same numbers whether a run resumed mid-epoch or not
                                 generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal that came meanwhile reaches the main process now
    spare = None  # the last micro-batch this rank saw: the stand-in for one whose samples were all skipped
    for step in range(first_step, steps_per_epoch):
        micro_batches = []
        for _ in range(local // micro):
            batch = next(loader)
            if batch is None:  # collate dropped every sample (skip_bad): count them, run a stand-in without labels
                spare = spare or stand_in(dataset, mine, collate)
                batch = dict(spare, labels=torch.full_like(spare["labels"], -100), skipped=torch.tensor(micro),
                             stand_in=True)
            spare = batch
            micro_batches.append(batch)
        yield epoch * steps_per_epoch + step, micro_batches


def stand_in(dataset, indices, collate):
    """A readable sample as a micro-batch, for a rank whose first micro-batch was skipped whole."""
    for i in [*indices, *range(len(dataset))]:
        if (batch := collate([dataset[i]])) is not None:
            return batch
    fail("skip_bad: no sample of the dataset has a readable image")


# -----------------------------------------------------------------------------------------------------------------
# model


def build_model(config):
    torch.manual_seed(config.seed)  # every rank draws the same random projector before sharding
    if is_llava_checkpoint(config.model):
        model = LLaVA.from_pretrained(config.model, vision_tower=config.vision_tower)
    else:
        model = LLaVA.from_parts(config.model, config.vision_tower, projector_type=config.projector_type)
    if config.projector is not None:
        model.load_projector(config.projector)
    for key, have in (("projector_type", model.config.projector_type), ("image_size", model.config.image_size)):
        if getattr(config, key) and getattr(config, key) != have:
            fail(f"--model/--vision-tower give {key} {have}, recipe {config.recipe} has {getattr(config, key)}: "
                 f"--set {key}={have} to train with it")
    # saved with the checkpoint: chat and evaluate render and preprocess the way it trained
    model.config.template, model.config.image_aspect_ratio = config.template, config.image_aspect_ratio
    # training mode: the decoder recomputes blocks only then
    return set_stage(model.train(), config.stage, config.lora_r, config.lora_alpha, config.lora_dropout)


def set_stage(model, stage, lora_r=0, lora_alpha=0.0, lora_dropout=0.0):
    """The two stages differ only here: stage 1 trains the projector, stage 2 the projector and the LLM, or with
    lora_r > 0 the projector and low-rank adapters on the LLM's block linears, the LLM itself frozen (lora.py)."""
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    model.llm.requires_grad_(stage == 2)
    if lora_r:
        apply_lora(model.llm, lora_r, lora_alpha or 2.0 * lora_r, lora_dropout)  # A drawn from the seeded RNG
    return model


def resolve_precision(precision, device):
    """"auto": bf16 on CUDA, fp32 on CPU. "bf16" on a CPU runs the GPU's code path (FSDP2 mixed precision, flash
    attention), which is what the tests do."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def parallelize(model, device, grad_checkpointing, bf16=None, compile_blocks=False):
    """Returns the model on `device`; under torchrun each decoder block, then the root, sharded with FSDP2. A model
    on the meta device stays there (load_sharded fills each rank's shards afterwards)."""
    bf16 = device.type == "cuda" if bf16 is None else bf16
    model.llm.gradient_checkpointing = grad_checkpointing  # the layer loop runs each block inside checkpoint()
    if compile_blocks:  # in place (parameter names unchanged), before sharding; all blocks share one compiled graph
        for block in model.llm.layers:
            block.compile()
    if not dist.is_initialized():
        return model.to(device)
    # fp32 master weights and optimizer; each block's weights gathered in bf16, gradients reduced in fp32
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    # the frozen tower is a plain replica on every rank, outside FSDP and the optimizer; bf16 is enough to run it
    tower_dtype = torch.bfloat16 if bf16 else torch.float32
    on_meta = model.vision_tower.pre_layrnorm.weight.is_meta  # filled after sharding (load_sharded)
    model.vision_tower.to(tower_dtype) if on_meta else model.vision_tower.to(device, tower_dtype)
    for i, block in enumerate(model.llm.layers):
        # the last block is needed again first thing in backward: keep it gathered (as torchtitan does)
        fully_shard(block, mp_policy=mp_policy, reshard_after_forward=i < len(model.llm.layers) - 1)
    fully_shard(model, mp_policy=mp_policy, ignored_params=set(model.vision_tower.parameters()))
    return model


class FileSlice:
    """A tensor of a safetensors file that reads only the rows it is indexed with, through a memory map opened and
    closed per read: the pages it touched leave the process with the map (one open map for the whole file would
    keep every page read resident, and a rank's peak memory would again be the whole model)."""
    def __init__(self, file, key, shape):
        self.file, self.key, self.shape = file, key, tuple(shape)

    def get_shape(self):
        return self.shape

    def __getitem__(self, index):
        with safe_open(self.file, framework="pt", device="cpu") as f:
            return f.get_slice(self.key)[index]


def read_slices(file, device="cpu", skip=lambda key: False):
    """llama.load_checkpoint's reader for sharded loading: {key: FileSlice}, nothing read yet."""
    with safe_open(file, framework="pt", device="cpu") as f:
        return {k: FileSlice(file, k, f.get_slice(k).get_shape()) for k in f.keys() if not skip(k)}


def build_sharded(config):
    """Under torchrun, the model on the meta device and {parameter name: where its values come from}: a lazy slice
    of the checkpoint's file (the LLM, read after sharding, each rank its own rows) or a small real tensor (the
    tower, the seeded or stage-1 projector, LoRA adapters drawn as build_model draws them). None where only the
    whole-model path applies (the original release and llava-hf layouts, .bin files): build_model then loads the
    whole model on every rank."""
    if not set(os.listdir(config.model)) & {"model.safetensors", "model.safetensors.index.json"}:
        return None
    kind = formats.detect_format(config.model)
    if kind not in (formats.OWN, "llama"):
        return None
    torch.manual_seed(config.seed)  # every rank draws the same random projector (as build_model)
    if kind == formats.OWN:
        with torch.device("meta"):
            model = LLaVA(LLaVAConfig.from_dict(read_json(Path(config.model) / "config.json")))
        tensors, files = load_checkpoint(config.model, read=read_slices)
        to_model, extra = (lambda sd: sd), {}
    else:
        llm_config = LlamaConfig.from_hf(read_json(Path(config.model) / "config.json"))
        tower = formats.load_clip(config.vision_tower)
        with torch.device("meta"):
            model = LLaVA(LLaVAConfig(llm=llm_config, vision=tower.config, projector_type=config.projector_type))
        tensors, files = load_checkpoint(config.model, skip=lambda key: "rotary_emb.inv_freq" in key,
                                         read=read_slices)
        to_model = lambda sd: {"llm." + k: v for k, v in hf_to_llama_keys(sd).items()}
        # PyTorch's default Linear init, as LLaVA.from_parts (and the original) builds it after the LLM
        projector = build_projector(config.projector_type, tower.config.hidden_size, llm_config.hidden_size)
        extra = {**{f"vision_tower.{k}": v for k, v in tower.state_dict().items()},
                 **{f"projector.{k}": v for k, v in projector.state_dict().items()}}
    names = to_model({k: k for k in tensors})  # model key -> key in the file
    sources = {**to_model(tensors), **extra}
    if config.projector is not None:
        projector_tensors, _, (to_projector, _) = formats.read_projector(config.projector, model.config.projector_type)
        sources.update({f"projector.{k}": v for k, v in to_projector(projector_tensors).items()})
    set_stage(model.train(), config.stage, config.lora_r, config.lora_alpha, config.lora_dropout)  # adapters on meta
    sources.update(initial_adapters(model))  # real ones, from the RNG after the projector, as in build_model
    expected = dict(model.named_parameters())  # a tied head is one parameter, under its first name
    shape = lambda v: tuple(v.shape) if torch.is_tensor(v) else tuple(v.get_shape())
    for key, p in expected.items():
        if key not in sources:
            raise KeyError(f"{config.model}: missing key {key!r} (expected shape {tuple(p.shape)})")
        if shape(sources[key]) != tuple(p.shape):
            where = files.get(names.get(key), config.model)
            raise ValueError(f"{where}: key {names.get(key, key)!r} has shape {shape(sources[key])}, expected "
                             f"{tuple(p.shape)}")
    all_names = set(model.state_dict())
    for key in sources:
        if key not in all_names:
            raise KeyError(f"{files.get(names.get(key), config.model)}: unexpected key {names.get(key, key)!r}")
    for key, have in (("projector_type", model.config.projector_type), ("image_size", model.config.image_size)):
        if getattr(config, key) and getattr(config, key) != have:
            fail(f"--model/--vision-tower give {key} {have}, recipe {config.recipe} has {getattr(config, key)}: "
                 f"--set {key}={have} to train with it")
    model.config.template, model.config.image_aspect_ratio = config.template, config.image_aspect_ratio
    return model, {k: sources[k] for k in expected}


@torch.no_grad()
def load_sharded(model, sources, device):
    """Materialise a sharded meta model: each rank allocates and reads only its own rows of every FSDP parameter
    (dim-0 shards of ceil(rows / world) rows, the last one shorter as FSDP2 pads it), memory-mapped, so a rank's
    peak memory is about the model / world plus one tensor; replicated parameters (the tower) are read whole."""
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        source = sources[name]
        if isinstance(param, DTensor):
            assert [p.dim for p in param.placements] == [0], param.placements  # fully_shard's dim-0 Shard
            local = param.to_local()
            chunk = math.ceil(param.shape[0] / param.device_mesh.size())
            start = param.device_mesh.get_local_rank() * chunk
            if local.shape[0]:
                local.copy_(source[start:start + local.shape[0]])
        else:
            param.copy_(source[:])
    return model


def flops_per_step(model, stage):
    """A function (tokens, images, seq_len) -> FLOPs of one training step: 2 per multiply-add, backward = 2x forward.

    Trained weights cost 6N per token, frozen LLM weights that the gradient still flows through (stage 1, or the
    base under LoRA adapters) 4N, the frozen tower 2N per patch (forward only); attention adds
    12 * layers * width * seq_len per token (PaLM)."""
    count = lambda module: sum(p.numel() for p in module.parameters())
    llm, vision, patches = model.config.llm, model.config.vision, model.config.num_image_tokens
    weights = [*model.llm.layers.parameters(), *model.llm.norm.parameters(), model.llm.lm_head.weight]  # no embed
    per_token = sum((6 if stage == 2 and p.requires_grad else 4) * p.numel() for p in weights)
    attention = 12 * llm.num_hidden_layers * llm.num_attention_heads * llm.head_dim
    per_image = (6 * count(model.projector) * patches + 2 * count(model.vision_tower) * (patches + 1)
                 + 4 * vision.num_hidden_layers * vision.hidden_size * (patches + 1) ** 2)
    return lambda tokens, images, seq_len: (per_token + attention * seq_len) * tokens + per_image * images


# -----------------------------------------------------------------------------------------------------------------
# optimizer and schedule


def make_optimizer(model, config):
    """AdamW, no weight decay on norms and biases; the projector may take its own lr (the original mm_projector_lr)."""
    groups = []
    for is_projector in (True, False):
        params = [p for n, p in model.named_parameters()
                  if p.requires_grad and n.startswith("projector.") == is_projector]
        scale = (config.projector_lr or config.lr) / config.lr if is_projector else 1.0
        groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay,
                    "lr_scale": scale}, {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0,
                                         "lr_scale": scale}]
    # fused: one kernel over all parameters (CUDA, and CPU since torch 2.4), not a loop of small ones per tensor
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                             fused=True)


def lr_at(step, total_steps, config):
    """HF's cosine schedule, which LLaVA trained with: peak * step / warmup over the first ceil(warmup_ratio * total)
    steps (0 at the first step), then a half cosine from the peak to 0."""
    warmup = math.ceil(config.warmup_ratio * total_steps)
    if step < warmup:
        return config.lr * step / warmup
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))


# -----------------------------------------------------------------------------------------------------------------
# training state and output: a training state holds the trained weights, the optimizer, the step (the data
# position and the schedule follow from it), each rank's RNG, and the values a resume must share; each rank's shards
# (DCP), resharded on load, so it resumes on any number of GPUs. Directories are written to a fresh temp dir, then
# renamed.

RESUME_MUST_MATCH = ("stage", "batch_size", "data", "template", "seed", "max_length",  # data order, what trains
                     "lora_r", "lora_alpha")


@contextmanager
def temp_dir(folder, target, nbytes, hint=""):
    """A fresh temp directory in `folder`, always removed afterwards. An OSError inside (a full disk) becomes an
    error naming the target, the space it needs and the space free."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    tmp = Path(fresh_dir(folder, Path(target).name))
    try:
        yield tmp
    except OSError as e:
        fail(f"could not write {target}: {e.strerror or e}; it needs about {nbytes / 2**20:,.1f} MiB, "
             f"{shutil.disk_usage(folder).free / 2**20:,.1f} MiB are free there{hint}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_state(model, optimizer, step, config, rank):
    """Each rank writes its own shards of the trained weights and the optimizer moments, in parallel, with
    torch.distributed.checkpoint (DCP), which reshards on load: a state written by N ranks resumes on M, or in one
    process. DCP stores tensors as raw bytes; its .metadata index is a pickle (FileSystemWriter has no other format),
    read back by StateReader, which builds nothing but DCP's metadata classes. Optimizer settings, step and RNG go to
    state.json."""
    weights = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))  # local shards
    optim = get_optimizer_state_dict(model, optimizer)  # {"state": {name: {step, exp_avg, exp_avg_sq}}, groups}
    rng = {"torch": torch.get_rng_state().tolist(), "python": random.getstate(),
           "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
           "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None}
    world = dist.get_world_size() if dist.is_initialized() else 1
    rngs = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    final = Path(config.out) / "checkpoints" / f"step_{step:07d}"
    local = lambda v: v.to_local() if isinstance(v, DTensor) else v
    nbytes = world * sum(local(v).numel() * local(v).element_size() for v in
                         [*weights.values(), *(t for s in optim["state"].values() for t in s.values())])
    with temp_dir(final.parent, final, nbytes) if rank == 0 else nullcontext() as tmp:
        names = [str(tmp)]
        if dist.is_initialized():
            dist.broadcast_object_list(names, src=0)  # rank 0's fresh temp dir
        try:
            dcp.save({"model": weights, "optimizer": optim["state"]}, storage_writer=FileSystemWriter(names[0]),
                     no_dist=not dist.is_initialized())
        except CheckpointException as e:  # DCP gathers every rank's failure: a full disk stays an OSError
            raise next((exc for exc, _ in e.failures.values() if isinstance(exc, OSError)), e) from None
        if rank == 0:
            state = {"step": step, **{k: getattr(config, k) for k in RESUME_MUST_MATCH},
                     "param_groups": optim["param_groups"], "rng": rngs, "world_size": world}
            write_json(tmp / "state.json", state, indent=None)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    if rank == 0:
        for old in final.parent.glob("step_*"):  # keep only the newest
            if old != final:
                shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()
    return final


def latest_state(out):
    states = sorted((Path(out) / "checkpoints").glob("step_*"))  # temp dirs start with "."
    return states[-1] if states else None


def find_state(config):
    path = latest_state(config.out) if config.resume == "latest" else Path(config.resume)
    if path is None:
        fail(f"--resume: no training state in {Path(config.out) / 'checkpoints'}")
    return path


class StateReader(FileSystemReader):
    """DCP's reader with its .metadata pickle read weights_only-style: only DCP's metadata classes, torch.Size, dtypes
    and paths may be built from it, so a training state can never run code (torch.load(weights_only=True) reads its
    other non-tensor items)."""
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            dcp_module = module.startswith("torch.distributed.checkpoint.")
            found = (super().find_class(module, name)  # nothing else is even imported
                     if dcp_module or module == "torch" or (module, name) in StateReader.ALLOWED else None)
            if (dcp_module and isinstance(found, type) or (module, name) in StateReader.ALLOWED
                    or module == "torch" and isinstance(found, torch.dtype)):
                return found
            raise pickle.UnpicklingError(f"a training state's .metadata may not build {module}.{name}")

    def read_metadata(self, *args, **kwargs):
        with open(Path(self.checkpoint_dir) / ".metadata", "rb") as f:
            metadata = self.Unpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def __init__(self, path):
        super().__init__(str(path))
        self.checkpoint_dir = path


def load_state(path, model, optimizer, config, rank):
    if not (path / "state.json").is_file() or not (path / ".metadata").is_file():
        fail(f"--resume: {path} is not a training state (no state.json and .metadata)")
    state = read_json(path / "state.json")
    for key in RESUME_MUST_MATCH:
        if state.get(key) != getattr(config, key):
            fail(f"--resume: {path} was trained with {key}={state.get(key)!r}, this run has {getattr(config, key)!r}")
    try:
        reader = StateReader(path)
        saved = reader.read_metadata().state_dict_metadata  # {"model.<name>": its full size, ...}
    except (pickle.UnpicklingError, EOFError, AttributeError) as e:
        fail(f"--resume: {path / '.metadata'} is not a training state's index: {e}")
    for name, param in model.named_parameters():  # DTensor shapes are the full ones
        key = f"model.{name}"
        if param.requires_grad and key not in saved:
            fail(f"--resume: {path} has no {name}: a state of another stage or projector")
        if param.requires_grad and tuple(saved[key].size) != tuple(param.shape):
            fail(f"--resume: {path}: {name} is {list(saved[key].size)}, this model's is {list(param.shape)}: the "
                 f"state comes from a model of another width or projector")
    weights = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
    optim = get_optimizer_state_dict(model, optimizer)  # zero moments of the right shapes, filled in place
    dcp.load({"model": weights, "optimizer": optim["state"]}, storage_reader=reader,  # reshards N ranks -> M
             no_dist=not dist.is_initialized())
    set_model_state_dict(model, weights, options=StateDictOptions(strict=False))
    groups = [dict(g, betas=tuple(g["betas"])) for g in state["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": optim["state"], "param_groups": groups})
    rng = state["rng"][min(rank, len(state["rng"]) - 1)]
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8))
    return state["step"]


def trim_metrics(path, step):
    """Keep the records up to `step`: a run that died after its last training state logged steps that the resumed
    run repeats, and a fresh run (step 0) starts a fresh log."""
    records = read_jsonl(path)
    if any(r.get("step", 0) > step for r in records):
        write_text(path, "".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= step))


def save_output(model, config, rank, bf16, state):
    """Stage 1: the projector; stage 2: the whole model + tokenizer.model. Gathered into a plain copy on rank 0 and
    written to a temp dir in <out> whose files then move into <out>: a failed write leaves no partial file."""
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    with torch.device("meta"):
        plain = LLaVA(model.config)
        if config.lora_r:  # filled below, written to their own small file, then merged: the output is a plain LLaVA
            apply_lora(plain.llm, config.lora_r, config.lora_alpha, config.lora_dropout)
    dtype = torch.bfloat16 if bf16 else torch.float32  # the precision it trained in
    plain.load_state_dict({k: v.to(dtype) if v.is_floating_point() and ".lora_" not in k else v  # adapters: fp32
                           for k, v in weights.items()}, assign=True)
    saved = plain.projector if config.stage == 1 else plain
    hint = f".\nThe trained weights are safe in {state}: make room, then --resume writes the output"
    with temp_dir(config.out, config.out, sum(p.numel() * p.element_size() for p in saved.parameters()), hint) as tmp:
        if config.stage == 1:
            plain.save_projector(str(tmp))
        else:
            if config.lora_r:  # adapter.safetensors + adapter_config.json: lora.load_adapters puts them on the base
                save_adapters(plain, tmp, {"base_model": config.model, "vision_tower": config.vision_tower,
                                           "projector_type": plain.config.projector_type, "template": config.template,
                                           "image_aspect_ratio": config.image_aspect_ratio})
                merge_lora(plain)
            plain.save_pretrained(str(tmp))
            shutil.copy(config.tokenizer, tmp / "tokenizer.model")
        for file in tmp.iterdir():
            os.replace(file, Path(config.out) / file.name)


# -----------------------------------------------------------------------------------------------------------------
# the loop


def train_step(model, optimizer, micro_batches, lr, grad_clip, device, bf16=None, times=None):
    """One optimizer step over this rank's micro-batches of a global batch: accumulate, clip, AdamW. The loss is the
    mean over every answer token of the global batch, however it is split over ranks and micro-batches. A stand-in
    micro-batch (step_batches: all its samples were skipped) has no labels: it adds nothing to the loss or the
    gradient, but the rank still runs forward and backward, so it takes part in FSDP's collectives.
    Returns (loss, grad_norm, tokens, images, skipped samples), over all ranks. bench.py times this function;
    `times`, a dict, gets the seconds of "forward", "backward" and "optimizer" added."""
    world, cuda = dist.get_world_size() if dist.is_initialized() else 1, device.type == "cuda"
    bf16 = cuda if bf16 is None else bf16
    autocast = torch.autocast(device.type, torch.bfloat16) if bf16 and world == 1 else nullcontext()  # FSDP casts
    # flash attention on bf16, as on a GPU; torch has a CPU flash kernel (no memory-efficient one there)
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION] if cuda else [SDPBackend.FLASH_ATTENTION]
    attention = (lambda: sdpa_kernel(backends)) if bf16 else nullcontext  # a new one per use: entered once each
    clock = lambda: (torch.cuda.synchronize() if cuda and times is not None else None, time.perf_counter())[1]
    times = {} if times is None else times
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    real = [b for b in micro_batches if not b.get("stand_in")]
    answer_tokens, tokens, images, skipped = all_sum([  # over all ranks: answer tokens set the loss's denominator
        sum(int((b["labels"][:, 1:] != -100).sum()) for b in real),
        sum(b["input_ids"].numel() for b in real),
        sum(len(b["pixel_values"]) for b in real if b["pixel_values"] is not None),
        sum(int(b.get("skipped", 0)) for b in micro_batches)], device)
    loss_sum = torch.zeros((), device=device)
    for batch in micro_batches:
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        start = clock()
        with autocast, attention():
            _, micro_loss = model(batch["input_ids"], batch["pixel_values"], batch["labels"])  # token mean
        micro_loss = torch.nan_to_num(micro_loss)  # no labels: the mean over none is NaN; it counts 0 times below
        n = (batch["labels"][:, 1:] != -100).sum()
        middle = clock()
        # FSDP averages gradients over ranks: scale so the step's gradient is the global token mean
        (micro_loss * n * world / max(answer_tokens, 1)).backward()
        loss_sum += micro_loss.detach() * n
        end = clock()
        times["forward"] = times.get("forward", 0) + middle - start
        times["backward"] = times.get("backward", 0) + end - middle
    start = clock()
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(trained, grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times["optimizer"] = times.get("optimizer", 0) + clock() - start
    (loss_total,) = all_sum([loss_sum.item()], device)
    return loss_total / max(answer_tokens, 1), grad_norm.item(), tokens, images, skipped


@contextmanager
def stop_requests():
    """A list that SIGTERM (Slurm, preemption) or Ctrl-C appends to: the loop finishes its step, writes a training
    state and ends; a second Ctrl-C stops at once. The previous handlers come back afterwards."""
    stop = []

    def on_signal(signum, frame):
        if stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.append(signal.Signals(signum).name)
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def train_loop(model, optimizer, dataset, collate, config, step, total_steps, flops, rank, world, device):
    """Steps from `step` to total_steps: fetch, one optimizer step, log, save. Returns (step, why it stopped early
    or None, totals for the summary line)."""
    steps_per_epoch, metrics = len(dataset) // config.batch_size, Path(config.out) / "metrics.jsonl"
    peak = config.peak_tflops or next((v for k, v in PEAK_TFLOPS.items()
                                       if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    totals = {"tokens": 0, "start": time.time(), "first_loss": None, "loss": float("nan"), "skipped": 0}
    bf16 = resolve_precision(config.precision, device)
    with stop_requests() as stop:
        while step < total_steps and not stop:
            epoch, first = divmod(step, steps_per_epoch)
            for step, micro_batches in step_batches(dataset, epoch, first, steps_per_epoch, collate, rank, world,
                                                    config):
                if step >= total_steps:
                    break
                start, lr = time.time(), lr_at(step, total_steps, config)
                loss, grad_norm, tokens, images, skipped = train_step(
                    model, optimizer, micro_batches, lr, config.grad_clip, device, bf16)
                step, dt = step + 1, time.time() - start
                record = {"step": step, "epoch": step / steps_per_epoch, "loss": loss, "lr": lr,
                          "grad_norm": grad_norm, "tokens": int(tokens), "tokens_per_s": tokens / dt}
                if peak:
                    seq_len = micro_batches[0]["input_ids"].shape[1]
                    record["mfu"] = flops(tokens, images, seq_len) / dt / (peak * 1e12 * world)
                if rank == 0:
                    append_jsonl(metrics, record)
                    bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "lr", "tokens_per_s", "mfu")
                                     if k in record})
                    bar.update(1)
                totals.update(tokens=totals["tokens"] + tokens, loss=loss, first_loss=totals["first_loss"] or loss,
                              skipped=totals["skipped"] + skipped)
                if all_sum([float(bool(stop))], device)[0] and not stop:  # every rank stops at the same step
                    stop.append("another rank")
                if step == config.stop_after:
                    stop.append(f"stop_after={step}")
                if stop or (config.save_every and step % config.save_every == 0):
                    save_state(model, optimizer, step, config, rank)
                if stop:
                    break
    bar.close()
    return step, (stop[0] if stop else None), totals


def run_stage(config, rank, world, device):
    """One stage: inputs, model, sharding, optimizer, resume, the loop, then the training state and the output."""
    log = print if rank == 0 else (lambda *a, **k: None)
    check_inputs(config, rank)
    if config.batch_size % world or (config.batch_size // world) % (config.micro_batch_size or 1):
        fail(f"batch_size {config.batch_size} must split evenly over {world} processes x micro_batch_size")
    if config.threads:
        torch.set_num_threads(config.threads)
    tokenizer = Tokenizer(config.tokenizer)
    built = build_sharded(config) if dist.is_initialized() else None  # on meta: each rank reads its shards below
    model, sources = built or (build_model(config), None)
    dataset = data.LLaVADataset(config.data, config.image_folder, tokenizer, config.template,
                                model.config.num_image_tokens, model.config.image_size,
                                pad_to_square=config.image_aspect_ratio == "pad", max_length=config.max_length,
                                skip_bad=config.skip_bad)
    # rows and images found bad at start-up; with num_workers=0 __getitem__ adds the unreadable ones it meets to
    # dataset.skipped too, so those are counted from the batches (summed over ranks), not from here
    skipped_at_start = dict(dataset.skipped)
    steps_per_epoch = len(dataset) // config.batch_size  # the last partial batch of an epoch is left out
    total_steps = int(config.epochs * steps_per_epoch)
    if total_steps == 0:
        fail(f"{config.data}: {len(dataset)} usable samples, fewer than one batch of {config.batch_size}")
    flops = flops_per_step(model, config.stage)
    bf16 = resolve_precision(config.precision, device)
    model = parallelize(model, device, config.grad_checkpointing, bf16, config.compile)
    if sources:
        load_sharded(model, sources, device)
    optimizer = make_optimizer(model, config)
    state = find_state(config) if config.resume else None
    first_step = load_state(state, model, optimizer, config, rank) if state else 0
    Path(config.out).mkdir(parents=True, exist_ok=True)
    if rank == 0:
        trim_metrics(Path(config.out) / "metrics.jsonl", first_step)
    log(f"stage {config.stage} ({config.recipe}): {len(dataset)} samples, {total_steps} steps of {config.batch_size}, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trained parameters, "
        f"{world} process(es) on {device.type}")
    try:
        step, stopped, totals = train_loop(model, optimizer, dataset, lambda b: data.collate(b, tokenizer.pad_id),
                                           config, first_step, total_steps, flops, rank, world, device)
    except RuntimeError as e:  # gloo raises on a timed-out collective (NCCL's watchdog aborts the process)
        if not (dist.is_initialized() and "timed out" in str(e).lower()):
            raise
        fail(f"rank {rank}: no answer from another rank within dist_timeout={config.dist_timeout:g} s (a rank "
             f"stalled or died): {str(e).splitlines()[0]}\nthe last good training state: "
             f"{latest_state(config.out) or 'none yet'}; continue with --resume")
    elapsed = time.time() - totals["start"]
    skipped = ", ".join([f"{n} {reason}" for reason, n in skipped_at_start.items()]
                        + ([f"{totals['skipped']:.0f} image unreadable while training"] if totals["skipped"] else []))
    skipped = skipped or "none"
    log(f"done: {step}/{total_steps} steps, {totals['tokens']:,.0f} tokens in {elapsed:.0f} s "
        f"({totals['tokens'] / max(elapsed, 1e-9):,.0f} tokens/s), loss {totals['first_loss'] or float('nan'):.4f} "
        f"-> {totals['loss']:.4f}; samples skipped: {skipped}; left out as the partial last batch: "
        f"{len(dataset) % config.batch_size} per epoch")
    if stopped:
        log(f"stopped ({stopped}) at step {step}: continue with --resume")
        return None
    if step > first_step:  # the trained weights are safe in a training state before the output is written
        state = save_state(model, optimizer, step, config, rank)
    save_output(model, config, rank, bf16, state)
    log(f"saved {'projector' if config.stage == 1 else 'model'} to {config.out}")
    if config.demo and config.stage == 2 and rank == 0:
        trained_model = LLaVA.from_pretrained(config.out).eval()  # the demo's last line: held-out accuracy
        correct, total = demo_accuracy(trained_model, Tokenizer(config.out), str(Path(config.demo_dir) / "data"),
                                       limit=config.eval_limit or None)
        print(f"demo accuracy: {100 * correct / max(total, 1):.1f}% ({correct}/{total})")
    return model


def main(argv=None):
    args = make_parser().parse_args(argv)
    demo = args.data is None and args.model is None and args.recipe in (None, "demo")
    if args.stage is None and (not demo or args.out or args.resume or args.projector or args.dry_run):
        fail("--stage 1 or --stage 2 is required with --data, --model, --out, --resume, --projector or --dry-run")
    if not demo and args.recipe is None:
        fail(f"--recipe is required with --data/--model: one of {', '.join(RECIPES)}")
    if not demo and not args.dry_run and (args.data is None or args.model is None):
        fail("give both --data and --model, or neither (and no --recipe but demo) to run the built-in demo")
    paths = {name: getattr(args, name) for name in PATH_FIELDS}
    stages = [args.stage] if args.stage else [1, 2]
    configs = [make_config(args.recipe or "demo", stage, args.set, demo, **paths) for stage in stages]
    if args.dry_run:
        print(json.dumps(asdict(configs[0])))
        return None
    rank, world, device = setup_distributed(configs[0].dist_timeout)
    model = None
    for config in configs:  # the demo without --stage: stage 1, then stage 2 from its projector
        model = run_stage(config, rank, world, device)
        if model is None:
            break
    if dist.is_initialized():
        dist.barrier()  # gloo aborts at exit when a rank tears down while another still talks
        dist.destroy_process_group()
    return model  # None: ended early, a training state was written


if __name__ == "__main__":
    main()
