"""Train LLaVA: stage 1 aligns the image features (projector only), stage 2 tunes on instructions (projector + LLM).

    python train.py                                               # the built-in demo: a few minutes on a laptop CPU
    python train.py --stage 1 && python train.py --stage 2        # the same demo, one stage at a time
    torchrun --nproc_per_node 8 train.py --stage 1 --model vicuna-7b --vision-tower clip-vit-large-patch14 \\
        --data blip_laion_cc_sbu_558k.json --image-folder images --out runs/stage1
    torchrun --nproc_per_node 8 train.py --stage 2 --model vicuna-7b --vision-tower clip-vit-large-patch14 \\
        --projector runs/stage1 --data llava_instruct_158k.json --image-folder coco/train2017 --out runs/stage2

The two stages are one loop that differs only in which parameters require grad; the CLIP tower never trains.
One process when RANK is unset; under torchrun every decoder block and then the whole model is sharded with FSDP2
(bf16 compute with fp32 gradient reduction on CUDA, fp32 and gloo on CPU). The loss of a step is the mean over all
answer tokens of the global batch, so it does not depend on how the batch is split over GPUs and micro-batches.
"""
import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
from demo import DEMO_RECIPES, build_demo_inputs, demo_accuracy
from llama import Tokenizer
from llava import LLaVA

# The paper's recipe for the real models (LLaVA-1.5: stage 1 lr 1e-3 batch 256, stage 2 lr 2e-5 batch 128, 1 epoch).
RECIPES = {1: dict(lr=2e-3, epochs=1, batch_size=128, template="plain"),
           2: dict(lr=2e-5, epochs=3, batch_size=32, template="vicuna_v1")}
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "A10G": 70, "4090": 165}  # dense bf16, for MFU


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=(1, 2), help="1 or 2; left out: the whole demo, stage 1 then 2")
    p.add_argument("--model", help="base LLM directory (HF LLaMA/Vicuna), or a LLaVA checkpoint to go on from")
    p.add_argument("--vision-tower", help="CLIP directory (HF layout); not needed with a LLaVA checkpoint")
    p.add_argument("--projector", help="stage-1 output directory; required in stage 2 from a base LLM")
    p.add_argument("--data", help="LLaVA JSON: a list of {id, image, conversations}")
    p.add_argument("--image-folder", help="folder the image paths in --data are relative to")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one in --model)")
    p.add_argument("--out", help="output directory (default runs/demo/stage<N>, or runs/stage<N>)")
    p.add_argument("--projector-type", default="mlp2x_gelu", choices=("linear", "mlp2x_gelu"))
    p.add_argument("--template", help="conversation template (default: plain in stage 1, vicuna_v1 in stage 2)")
    p.add_argument("--image-aspect-ratio", default="pad", choices=("pad", "square"))
    p.add_argument("--lr", type=float, help="peak learning rate (default: the stage's recipe)")
    p.add_argument("--projector-lr", type=float, help="peak lr of the projector (default: --lr)")
    p.add_argument("--epochs", type=float, help="passes over the data (default: the stage's recipe)")
    p.add_argument("--batch-size", type=int, help="global batch in samples (default: the stage's recipe)")
    p.add_argument("--micro-batch-size", type=int, help="samples per forward per process (default: all at once)")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per sample, image tokens included")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0, help="never applied to norms and biases")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="batch samples of similar length (and modality) together: less padding")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each decoder block in backward")
    p.add_argument("--save-every", type=int, default=0, help="write a training state every N steps")
    p.add_argument("--resume", nargs="?", const="latest", help="a training state directory (default: the latest)")
    p.add_argument("--stop-after", type=int, help="stop after this step and write a training state")
    p.add_argument("--num-workers", type=int, help="data loader processes (default 4; demo 0)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable rows/images instead of stopping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, help="accelerator peak for MFU (default: known cards)")
    p.add_argument("--demo-dir", default="runs/demo")
    p.add_argument("--eval-limit", type=int, help="demo: score only the first N held-out questions")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------------------------------------------
# set-up: inputs, demo, model, distributed


def fail(message):
    raise SystemExit(f"train.py: error: {message}")


def is_llava_checkpoint(path):
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    d = json.loads(config.read_text())
    return d.get("format") == "llava-minimal" or "mm_vision_tower" in d or "vision_config" in d


def resolve_args(args, rank):
    """Fill the demo or recipe defaults and check every input path, so bad input stops before any training."""
    demo = args.data is None and args.model is None
    if not demo and (args.data is None or args.model is None):
        fail("give both --data and --model, or neither to run the built-in demo")
    if demo:
        root = Path(args.demo_dir)
        if args.stage == 1:
            build_demo_inputs(root, rank)
        args.model, args.vision_tower = str(root / "base" / "llm"), str(root / "base" / "clip")
        args.data, args.image_folder = str(root / "data" / f"stage{args.stage}.json"), str(root / "data" / "images")
        if args.stage == 2 and args.projector is None:
            args.projector = str(root / "stage1")
            if not (root / "stage1" / "projector.safetensors").is_file():
                fail(f"no stage-1 output in {root / 'stage1'}: run `python train.py --stage 1` first")
        args.num_workers = 0 if args.num_workers is None else args.num_workers
        # idle, 2 threads are ~1.7x faster; but when another process holds a core, OpenMP threads wait on each
        # other and 2 threads run 10-20x slower than 1: one thread keeps the demo's time predictable
        torch.set_num_threads(1)
    for key, value in (DEMO_RECIPES if demo else RECIPES)[args.stage].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.demo, args.num_workers = demo, 4 if args.num_workers is None else args.num_workers
    args.out = args.out or (str(Path(args.demo_dir) / f"stage{args.stage}") if demo else f"runs/stage{args.stage}")
    args.tokenizer = args.tokenizer or str(Path(args.model) / "tokenizer.model")
    llava_checkpoint = is_llava_checkpoint(args.model)
    for flag, path, kind in (("--data", args.data, "file"), ("--image-folder", args.image_folder, "dir"),
                             ("--model", args.model, "dir"), ("--vision-tower", args.vision_tower, "dir"),
                             ("--projector", args.projector, "dir"), ("--tokenizer", args.tokenizer, "file")):
        if path is not None and not (os.path.isfile(path) if kind == "file" else os.path.isdir(path)):
            fail(f"{flag}: no such {'file' if kind == 'file' else 'directory'}: {path}")
    if args.projector and not any(os.path.isfile(os.path.join(args.projector, f))
                                  for f in ("projector.safetensors", "mm_projector.bin")):
        fail(f"--projector: {args.projector} holds no projector.safetensors (stage-1 output) or mm_projector.bin")
    if not llava_checkpoint and args.vision_tower is None:
        fail(f"--model {args.model} is a base LLM: give --vision-tower (a CLIP directory) too")
    if args.stage == 2 and not llava_checkpoint and args.projector is None:
        fail("stage 2 from a base LLM needs the stage-1 projector: give --projector <stage-1 output directory>")
    return args


def build_model(args):
    torch.manual_seed(args.seed)  # every rank draws the same random projector before sharding
    if is_llava_checkpoint(args.model):
        model = LLaVA.from_pretrained(args.model, vision_tower=args.vision_tower)
    else:
        model = LLaVA.from_parts(args.model, args.vision_tower, projector_type=args.projector_type,
                                 image_aspect_ratio=args.image_aspect_ratio)
    if args.projector is not None:
        model.load_projector(args.projector)
    model.config.template = args.template  # saved with the checkpoint: chat and evaluate render with it
    return set_stage(model, args.stage)


def set_stage(model, stage):
    """The two stages differ only here: stage 1 trains the projector, stage 2 the projector and the LLM."""
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    model.llm.requires_grad_(stage == 2)
    return model


def setup_distributed():
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def parallelize(model, device, grad_checkpointing):
    if grad_checkpointing:  # keeps the parameter names: the block's own forward runs inside checkpoint()
        for block in model.llm.layers:
            block.forward = lambda *a, _f=block.forward, **kw: checkpoint(_f, *a, use_reentrant=False, **kw)
    if not dist.is_initialized():
        return model.to(device)
    cuda = device.type == "cuda"
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None, reduce_dtype=torch.float32)
    # the frozen tower is a plain replica on every rank, outside FSDP and the optimizer; bf16 is enough to run it
    model.vision_tower.to(device, torch.bfloat16 if cuda else torch.float32)
    for i, block in enumerate(model.llm.layers):
        # the last block is needed again first thing in backward: keep it gathered (as torchtitan does)
        fully_shard(block, mp_policy=mp_policy, reshard_after_forward=i < len(model.llm.layers) - 1)
    fully_shard(model, mp_policy=mp_policy, ignored_params=set(model.vision_tower.parameters()))
    return model


def make_optimizer(model, args):
    """AdamW, no weight decay on norms and biases; the projector may take its own lr (the original mm_projector_lr)."""
    groups = []
    for is_projector in (True, False):
        params = [p for n, p in model.named_parameters()
                  if p.requires_grad and n.startswith("projector.") == is_projector]
        scale = (getattr(args, "projector_lr", None) or args.lr) / args.lr if is_projector else 1.0
        groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay, "lr_scale": scale},
                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr_scale": scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.999), eps=1e-8)


def lr_at(step, total_steps, args):
    """Linear warmup over warmup_ratio of the steps, then cosine to 0 (the HF schedule LLaVA trained with)."""
    warmup = math.ceil(args.warmup_ratio * total_steps)
    if step < warmup:
        return args.lr * (step + 1) / (warmup + 1)
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))


def flops_per_step(model, stage):
    """A function (tokens, images, seq_len) -> FLOPs of one training step: 2 per multiply-add, backward = 2x forward.

    Trained weights cost 6N per token, frozen LLM weights that the gradient still flows through (stage 1) 4N, the
    frozen tower 2N per patch (forward only); attention adds 12 * layers * width * seq_len per token (PaLM)."""
    count = lambda module: sum(p.numel() for p in module.parameters())
    llm, vision, patches = model.config.llm, model.config.vision, model.config.num_image_tokens
    n_llm = count(model.llm.layers) + count(model.llm.norm) + model.llm.lm_head.weight.numel()  # no embed lookup
    per_token = (6 if stage == 2 else 4) * n_llm
    attention = 12 * llm.num_hidden_layers * llm.num_attention_heads * llm.head_dim
    per_image = (6 * count(model.projector) * patches + 2 * count(model.vision_tower) * (patches + 1)
                 + 4 * vision.num_hidden_layers * vision.hidden_size * (patches + 1) ** 2)
    return lambda tokens, images, seq_len: (per_token + attention * seq_len) * tokens + per_image * images


# -----------------------------------------------------------------------------------------------------------------
# data order: a pure function of (seed, epoch), so a resumed run sees exactly the batches it would have seen


def epoch_order(dataset, epoch, world, args):
    """Global batches are consecutive runs of batch_size; with length grouping each one holds similar lengths and
    is split into `world` chunks of even token totals. The set of samples in a batch never depends on `world`."""
    generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    if args.group_by_length:
        return data.modality_length_grouped_indices(dataset.lengths, args.batch_size // world, world, generator)
    return torch.randperm(len(dataset), generator=generator).tolist()


def step_batches(dataset, epoch, first_step, steps_per_epoch, collate, rank, world, args):
    """Yields (step, [micro-batches of this rank]) from first_step on: each rank takes its contiguous share of the
    global batch, cut into micro-batches; the loader works ahead in worker processes."""
    order, local = epoch_order(dataset, epoch, world, args), args.batch_size // world
    micro = args.micro_batch_size or local
    index_lists = []
    for step in range(first_step, steps_per_epoch):
        mine = order[step * args.batch_size + rank * local:][:local]
        index_lists += [mine[i:i + micro] for i in range(0, local, micro)]
    loader = iter(DataLoader(dataset, batch_sampler=index_lists, collate_fn=collate, num_workers=args.num_workers,
                             pin_memory=torch.cuda.is_available()))
    for step in range(first_step, steps_per_epoch):
        yield epoch * steps_per_epoch + step, [next(loader) for _ in range(local // micro)]


# -----------------------------------------------------------------------------------------------------------------
# checkpoints: a training state holds the trained weights, the optimizer, the step (the data position and the
# schedule follow from it) and each rank's RNG; full (unsharded) tensors, so it can resume on any number of GPUs


def save_state(model, optimizer, step, args, rank):
    weights = get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rng = {"torch": torch.get_rng_state().tolist(), "python": random.getstate(),
           "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
           "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None}
    rngs = [None] * dist.get_world_size() if dist.is_initialized() else [rng]
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)
    if rank == 0:
        final = Path(args.out) / "checkpoints" / f"step_{step:07d}"
        tmp = final.with_name(final.name + ".tmp")  # renamed when complete: a crash never leaves a broken state
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
        # optimizer: {"state": {name: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]} -> "name:key" tensors
        save_file({f"{name}:{key}": v for name, s in optim["state"].items() for key, v in s.items()},
                  tmp / "optimizer.safetensors")
        state = {"step": step, "stage": args.stage, "batch_size": args.batch_size, "data": args.data,
                 "param_groups": optim["param_groups"], "rng": rngs}
        (tmp / "state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in final.parent.glob("step_*"):  # keep only the newest
            if old != final and not old.name.endswith(".tmp"):
                shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()


def find_state(args):
    if args.resume != "latest":
        return Path(args.resume)
    states = sorted(p for p in (Path(args.out) / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
    if not states:
        fail(f"--resume: no training state in {Path(args.out) / 'checkpoints'}")
    return states[-1]


def load_state(path, model, optimizer, args, rank):
    if not (path / "state.json").is_file():
        fail(f"--resume: {path} is not a training state (no state.json)")
    state = json.loads((path / "state.json").read_text())
    for key in ("stage", "batch_size", "data"):  # these change the data order or what trains
        if state[key] != getattr(args, key):
            fail(f"--resume: {path} was written with {key}={state[key]!r}, this run has {getattr(args, key)!r}")
    weights = load_file(path / "model.safetensors")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if trained - weights.keys():
        fail(f"{path / 'model.safetensors'}: missing trained tensor {sorted(trained - weights.keys())[0]}")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    optim = {"state": {}, "param_groups": [dict(g, betas=tuple(g["betas"])) for g in state["param_groups"]]}
    for key, value in load_file(path / "optimizer.safetensors").items():
        name, field = key.rsplit(":", 1)
        optim["state"].setdefault(name, {})[field] = value
    set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))
    rng = state["rng"][min(rank, len(state["rng"]) - 1)]
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8))
    return state["step"]


def save_output(model, args, rank, cuda):
    """Stage 1: the projector; stage 2: the whole model + tokenizer.model. Gathered into a plain copy on rank 0."""
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    with torch.device("meta"):
        plain = LLaVA(model.config)
    dtype = torch.bfloat16 if cuda else torch.float32  # the precision it trained in
    plain.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}, assign=True)
    if args.stage == 1:
        plain.save_projector(args.out)
    else:
        plain.save_pretrained(args.out)
        shutil.copy(args.tokenizer, Path(args.out) / "tokenizer.model")


# -----------------------------------------------------------------------------------------------------------------


def all_sum(values, device):
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return totals.tolist()


def main(argv=None):
    args = parse_args(argv)
    if args.stage is None:  # `python train.py` alone: the whole built-in demo, stage 1 then stage 2
        if args.data or args.model or args.out or args.resume or args.projector:
            fail("--stage 1 or --stage 2 is required with --data, --model, --out, --resume or --projector")
        rest = list(sys.argv[1:] if argv is None else argv)
        return main(rest + ["--stage", "2"]) if main(rest + ["--stage", "1"]) is not None else None
    rank, world, device = setup_distributed()
    cuda = device.type == "cuda"
    args = resolve_args(args, rank)
    if args.batch_size % world or (args.batch_size // world) % (args.micro_batch_size or 1):
        fail(f"--batch-size {args.batch_size} must split evenly over {world} processes x --micro-batch-size")
    log = print if rank == 0 else (lambda *a, **k: None)

    tokenizer = Tokenizer(args.tokenizer)
    model = build_model(args)
    config = model.config
    dataset = data.LLaVADataset(args.data, args.image_folder, tokenizer, args.template, config.num_image_tokens,
                                config.image_size, pad_to_square=config.image_aspect_ratio == "pad",
                                max_length=args.max_length, skip_bad=args.skip_bad)
    steps_per_epoch = len(dataset) // args.batch_size  # the last partial batch of an epoch is left out
    total_steps = int(args.epochs * steps_per_epoch)
    if total_steps == 0:
        fail(f"{args.data}: {len(dataset)} usable samples, fewer than one batch of {args.batch_size}")
    flops = flops_per_step(model, args.stage)
    model = parallelize(model, device, args.grad_checkpointing)
    optimizer = make_optimizer(model, args)
    step = load_state(find_state(args), model, optimizer, args, rank) if args.resume else 0
    collate = lambda batch: data.collate(batch, tokenizer.pad_id)
    trained = [p for p in model.parameters() if p.requires_grad]
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items()
                                     if cuda and k in torch.cuda.get_device_name()), None)
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda and world == 1 else nullcontext()  # FSDP casts itself
    attention = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]) if cuda else nullcontext()
    stop = []  # SIGTERM / Ctrl-C: finish the step, write a training state, exit; a second Ctrl-C exits at once

    def on_signal(signum, frame):
        if stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.append(signal.Signals(signum).name)
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    metrics = open(Path(args.out) / "metrics.jsonl", "a") if rank == 0 else None
    log(f"stage {args.stage}: {len(dataset)} samples, {total_steps} steps of {args.batch_size}, "
        f"{sum(p.numel() for p in trained):,} trained parameters, {world} process(es) on {device.type}")
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    run_tokens, run_start, first_loss, loss = 0, time.time(), None, float("nan")
    while step < total_steps and not stop:
        epoch, first = divmod(step, steps_per_epoch)
        for step, micro_batches in step_batches(dataset, epoch, first, steps_per_epoch, collate, rank, world, args):
            if step >= total_steps:
                break
            start, lr = time.time(), lr_at(step, total_steps, args)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            answer_tokens, tokens, images = all_sum([  # over all ranks: answer tokens set the loss's denominator
                sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches),
                sum(b["input_ids"].numel() for b in micro_batches),
                sum(len(b["pixel_values"]) for b in micro_batches if b["pixel_values"] is not None)], device)
            loss_sum = torch.zeros((), device=device)
            for batch in micro_batches:
                batch = {k: v.to(device, non_blocking=True) if v is not None else None for k, v in batch.items()}
                with autocast, attention:
                    _, micro_loss = model(batch["input_ids"], batch["pixel_values"], batch["labels"])  # token mean
                n = (batch["labels"][:, 1:] != -100).sum()
                # FSDP averages gradients over ranks: scale so the step's gradient is the global token mean
                (micro_loss * n * world / max(answer_tokens, 1)).backward()
                loss_sum += micro_loss.detach() * n
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, args.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_total, stopping = all_sum([loss_sum.item(), float(bool(stop))], device)
            loss, dt, step = loss_total / max(answer_tokens, 1), time.time() - start, step + 1
            first_loss = loss if first_loss is None else first_loss
            run_tokens += tokens
            record = {"step": step, "epoch": step / steps_per_epoch, "loss": loss, "lr": lr,
                      "grad_norm": grad_norm.item(), "tokens": int(tokens), "tokens_per_s": tokens / dt}
            if peak:
                seq_len = micro_batches[0]["input_ids"].shape[1]
                record["mfu"] = flops(tokens, images, seq_len) / dt / (peak * 1e12 * world)
            if rank == 0:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                os.fsync(metrics.fileno())
                bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "lr", "tokens_per_s", "mfu") if k in record})
                bar.update(1)
            if stopping and not stop:
                stop.append("another rank")
            if stop or step == args.stop_after or (args.save_every and step % args.save_every == 0):
                save_state(model, optimizer, step, args, rank)
            if step == args.stop_after:
                stop.append(f"--stop-after {step}")
            if stop:
                break
    bar.close()
    elapsed = time.time() - run_start
    skipped = ", ".join(f"{n} {reason}" for reason, n in dataset.skipped.items()) or "none"
    log(f"done: {step}/{total_steps} steps, {run_tokens:,.0f} tokens in {elapsed:.0f} s "
        f"({run_tokens / max(elapsed, 1e-9):,.0f} tokens/s), loss {first_loss or float('nan'):.4f} -> {loss:.4f}; "
        f"samples skipped: {skipped}; left out as the partial last batch: {len(dataset) % args.batch_size} per epoch")
    if stop:
        log(f"stopped ({stop[0]}) at step {step}: continue with --resume")
    else:
        save_output(model, args, rank, cuda)
        log(f"saved {'projector' if args.stage == 1 else 'model'} to {args.out}")
        if args.demo and args.stage == 2 and rank == 0:
            trained_model = LLaVA.from_pretrained(args.out).eval()  # the demo's last line: held-out accuracy
            correct, total = demo_accuracy(trained_model, Tokenizer(args.out),
                                                    str(Path(args.demo_dir) / "data"), limit=args.eval_limit)
            print(f"demo accuracy: {100 * correct / max(total, 1):.1f}% ({correct}/{total})")
    for s, handler in handlers.items():
        signal.signal(s, handler)
    if dist.is_initialized():
        dist.barrier()  # gloo aborts at exit when a rank tears down while another still talks
        dist.destroy_process_group()
    return None if stop else model  # None: ended early, a training state was written


if __name__ == "__main__":
    main()
