"""Train LLaVA: stage 1 aligns the image features (projector only), stage 2 tunes on instructions (projector + LLM).

    python train.py                                          # the built-in demo, stage 1 then 2: minutes on a CPU
    python train.py --recipe llava-v1.5 --stage 2 --dry-run  # the resolved config as one JSON object
    torchrun --nproc_per_node 8 train.py --recipe llava-v1.5 --stage 2 --model vicuna-7b-v1.5 \\
        --vision-tower clip-vit-large-patch14-336 --projector runs/stage1 --data llava_v1_5_mix665k.json \\
        --image-folder playground/data --out runs/stage2 --set micro_batch_size=16     # stage 1: no --projector

Recipes are data: TrainConfig holds every hyperparameter, RECIPES the original scripts' values (`llava-v1` = the
paper, `llava-v1.5`, `llava-v1.5-lora`, `scienceqa`, `demo`), `--set key=value` overrides any field (train_cli.py).
The two stages differ only in which parameters require grad; the CLIP tower never trains (with lora_r > 0, stage 2
trains LoRA adapters on the frozen LLM: lora.py). Under torchrun the model is sharded with FSDP2, each rank reading
only its own shards (distributed.py). A step's loss is the token mean of the global batch, or the mean of the token
means of its groups of loss_group samples (the original's per-device batches); either way independent of how it is
split. A run ends with a training state (checkpoint.py: it resumes on any number of ranks), then the output.
"""
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from tqdm import tqdm

import checkpoint
import data
import demo
import distributed
import formats
import train_cli
from fileio import append_jsonl
from llama import Llama
from llava import IGNORE_INDEX, MERGE_TYPES, LLaVA
from lora import apply_lora, initial_adapters, merge_lora, save_adapters
from tokenizer import Tokenizer, copy_tokenizer

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
    epochs: float = 1.0  # passes over the data; the last partial batch of each epoch is kept, as in the original
    warmup_ratio: float = 0.03  # share of the steps with linear warmup from 0 (HF Trainer)
    weight_decay: float = 0.0  # AdamW decay of the weight matrices; never applied to norms and biases
    grad_clip: float = 0.0  # max global gradient norm; 0: none (the DeepSpeed scripts set no gradient_clipping)
    loss_group: int = 0  # 0: the token mean over the global batch; N: HF Trainer's mean of per-device token means
    projector_type: str = "mlp2x_gelu"  # "linear": the paper; "mlp2x_gelu": LLaVA-1.5
    select_layer: int = -2  # CLIP hidden state fed to the projector: the penultimate (the paper; Table 8: -1 worse)
    image_size: int = 336  # the tower's input size in the recipe (ViT-L/14: 224, -336: 336); other: error; 0: any
    template: str = "vicuna_v1"  # conversation template (data.TEMPLATES): "plain" for stage-1 captions
    image_aspect_ratio: str = "square"  # "square": resize + centre-crop (CLIP's); "pad": pad to a square first;
    # "anyres" (LLaVA-1.6): an overview + the tiles of the best of image_grid_pinpoints, merged by patch_merge_type
    image_grid_pinpoints: list | None = None  # anyres: [[width, height], ...]; None: ANYRES_GRIDS x the tower's size
    patch_merge_type: str = "spatial_unpad"  # anyres: llava.MERGE_TYPES; 1.6's spatial_unpad adds image_newline
    max_length: int = 2048  # tokens per sample, image tokens included (model_max_length)
    group_by_length: bool = False  # batches of similar length and one modality: less padding (LLaVA-1.5 stage 2)
    grad_checkpointing: bool = True  # recompute each decoder block in backward: less memory, ~1/3 more compute
    compile: bool = False  # torch.compile each decoder block: element-wise ops fused (the first step compiles)
    lora_r: int = 0  # stage 2: LoRA rank on the 7 linears of every LLM block, base frozen (lora.py); 0: full tuning
    lora_alpha: float = 0.0  # LoRA update scale alpha / r; 0: 2 * lora_r (LLaVA-1.5's 256 for r=128)
    lora_dropout: float = 0.05  # dropout on the adapters' input (LLaVA's default lora_dropout)
    num_workers: int = 4  # data loader processes
    skip_bad: bool = False  # skip unreadable rows and images (counted and reported) instead of stopping
    seed: int = 42  # the projector's init and the data order (the original's, HF TrainingArguments')
    save_every: int = 0  # write a training state every N steps; 0: only when stopped and at the end
    stop_after: int = 0  # stop after this step with a training state; 0: run to the end
    dist_timeout: float = 300.0  # seconds a collective waits for a stalled rank before the job ends
    precision: str = "auto"  # "bf16": bf16 compute, fp32 master weights and reduction; "fp32"; "auto": bf16 on CUDA
    threads: int = 0  # torch CPU threads; 0: torch's choice
    peak_tflops: float = 0.0  # accelerator peak for the MFU column; 0: the known cards (distributed.PEAK_TFLOPS)
    demo_dir: str = "runs/demo"  # the demo's data, base models and outputs
    eval_limit: int = 0  # demo: score only the first N held-out questions; 0: all
    model: str | None = None  # (paths and actions: flags only) base LLM, or a LLaVA checkpoint to go on from
    vision_tower: str | None = None  # CLIP directory (HF layout); not needed with a LLaVA checkpoint
    projector: str | None = None  # stage-1 output directory (projector.safetensors or mm_projector.bin)
    data: str | None = None  # LLaVA JSON: a list of {id, image, conversations}
    image_folder: str | None = None  # folder the image paths in data are relative to
    tokenizer: str | None = None  # tokenizer.model; default: the one in the model directory
    out: str | None = None  # output directory; default runs/stage<N> (demo: <demo_dir>/stage<N>)
    resume: str | None = None  # a training state directory, or "latest" in <out>/checkpoints
    demo: bool = False  # no --data and --model: build the demo's inputs, print its accuracy at the end


CHOICES = {"projector_type": ("linear", "mlp2x_gelu"), "template": tuple(data.TEMPLATES),
           "image_aspect_ratio": ("square", "pad", "anyres"), "patch_merge_type": MERGE_TYPES,
           "precision": ("auto", "bf16", "fp32")}
# anyres: LLaVA-1.6's grids in tiles (columns, rows): its image_grid_pinpoints [[336, 672], [672, 336], [672, 672],
# [1008, 336], [336, 1008]] are these times its tower's 336 px, so a 48 px demo tower gets [[48, 96], ...]
ANYRES_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
# the demo: tiny models from scratch on 2 CPU cores; its fast projector lr reads the random tower in minutes; its
# clipping and seed are its own. One thread: 2 wait on each other when another process holds a core (10-20x slower)
DEMO = dict(projector_type="mlp2x_gelu", image_size=demo.DEMO_CLIP["image_size"], image_aspect_ratio="pad",
            group_by_length=True, grad_checkpointing=False, num_workers=0, threads=1, grad_clip=1.0, seed=0)
# stage -> the values that differ from TrainConfig's defaults, which are the original scripts' shared ones:
# warmup 0.03, weight decay 0, cosine, max length 2048, gradient checkpointing, seed 42, no clipping: the
# DeepSpeed configs (scripts/zero2.json, zero3.json) have no gradient_clipping, so DeepSpeed's 0 (off) holds
RECIPES = {  # loss_group: the per-device batch of the original run, whose token means HF Trainer averaged
    "llava-v1": {  # the paper: CC-595K, then 3 epochs of Instruct-158K; torchrun + FSDP (max_grad_norm 1), 8x16, 8x4
        1: dict(lr=2e-3, batch_size=128, epochs=1, template="plain", projector_type="linear", image_size=224,
                grad_clip=1.0, loss_group=16),
        2: dict(lr=2e-5, batch_size=32, epochs=3, template="vicuna_v1", projector_type="linear", image_size=224,
                grad_clip=1.0, loss_group=4)},
    "llava-v1.5": {  # scripts/v1_5/pretrain.sh (LCS-558K, 8 x 32) and v1_5/finetune.sh (the 665K mix, 8 x 16)
        1: dict(lr=1e-3, batch_size=256, epochs=1, template="plain", loss_group=32),
        2: dict(lr=2e-5, batch_size=128, epochs=1, template="vicuna_v1", image_aspect_ratio="pad",
                group_by_length=True, loss_group=16)},  # group_by_modality_length
    "llava-v1.5-lora": {  # scripts/v1_5/finetune_lora.sh: stage 2 only, from llava-v1.5's stage-1 projector
        2: dict(lr=2e-4, projector_lr=2e-5, batch_size=128, epochs=1, template="vicuna_v1", image_aspect_ratio="pad",
                group_by_length=True, lora_r=128, lora_alpha=256.0, lora_dropout=0.05, loss_group=16)},
    "scienceqa": {  # scripts/finetune_sqa.sh (8 x 16): stage 2 only, from the paper's stage-1 projector
        2: dict(lr=2e-5, batch_size=128, epochs=12, template="vicuna_v1", projector_type="linear", image_size=224,
                loss_group=16)},
    "demo": {  # stage 1: 3 passes over 2,000 captions; after one the demo scored 84-99 % by seed and CPU
        1: dict(lr=1e-3, batch_size=32, epochs=3, template="plain", **DEMO),
        2: dict(lr=2e-3, projector_lr=1e-2, batch_size=16, epochs=4, template="vicuna_v1", **DEMO)},
}
RESUME_MUST_MATCH = ("stage", "batch_size", "data", "template", "seed", "max_length", "lora_r", "lora_alpha")


def stage_1_for(recipe):
    """The first recipe whose stage 1 makes a projector that `recipe`'s stage 2 can start from."""
    def fit(name, stage):  # a projector fits another run with the same projector type and tower image size
        config = TrainConfig(**RECIPES[name][stage])
        return config.projector_type, config.image_size
    return next(name for name in RECIPES if 1 in RECIPES[name] and fit(name, 1) == fit(recipe, 2))


def make_config(recipe="demo", stage=1, sets=(), demo_run=False, **paths):
    """The recipe's values for this stage, then each --set key=value in order, then the default paths."""
    if stage not in RECIPES[recipe]:
        raise ValueError(f"recipe {recipe} has no stage {stage}: it starts from a stage-1 projector (--recipe "
                         f"{stage_1_for(recipe)} --stage 1)")
    config = TrainConfig(recipe=recipe, stage=stage, demo=demo_run, **RECIPES[recipe][stage], **paths)
    train_cli.apply_sets(config, sets, CHOICES)
    train_cli.check_settings(config)
    config.projector_lr, config.lora_alpha = config.projector_lr or config.lr, config.lora_alpha or 2.0 * config.lora_r
    for key, value in demo.run_paths(config.demo_dir, stage).items() if demo_run else ():
        setattr(config, key, getattr(config, key) or value)
    config.out = config.out or str(Path(config.demo_dir if demo_run else "runs") / f"stage{stage}")
    config.tokenizer = config.tokenizer or (str(Path(config.model) / "tokenizer.model") if config.model else None)
    return config


# -----------------------------------------------------------------------------------------------------------------
# the model: what trains in each stage


def build_model(config, lazy=False):
    """A LLaVA checkpoint to go on from, or a base LLM + CLIP tower + a fresh (seeded) or stage-1 projector, set up
    for config.stage. lazy (under torchrun): the checkpoints' weights stay on the meta device, each holding its
    source, and every rank reads only its own shards once the model is sharded (distributed.parallelize)."""
    torch.manual_seed(config.seed)  # every rank draws the same random projector
    device = "meta" if lazy else "cpu"
    if train_cli.is_llava_checkpoint(config.model):
        model = formats.load_llava(config.model, config.vision_tower, device)
        # saved with the checkpoint: chat and evaluate render and preprocess the way it trained
        model.config = replace(model.config, template=config.template, **image_layout(config, model.config.image_size))
        if model.config.patch_merge_type == "spatial_unpad" and not hasattr(model, "image_newline"):
            model.init_image_newline()  # a checkpoint without anyres, trained on with it
    else:
        llm, tower = Llama.from_pretrained(config.model, device), formats.load_clip(config.vision_tower, device)
        model = LLaVA.from_parts(llm, tower, config.projector_type, select_layer=config.select_layer,
                                 template=config.template, **image_layout(config, tower.config.image_size))
    if config.projector not in (None, train_cli.FRESH_PROJECTOR):
        formats.load_projector(model, config.projector)
    train_cli.check_model(config, model.config)
    set_stage(model.train(), config.stage, config.lora_r, config.lora_alpha, config.lora_dropout)
    if lazy:  # adapters on meta: their first values drawn as on the CPU, from the RNG after the projector
        for name, value in initial_adapters(model).items():
            model.get_parameter(name).source = value
    return model


def image_layout(config, image_size) -> dict:
    """The recipe's image handling as LLaVAConfig fields; anyres pinpoints default to ANYRES_GRIDS at image_size."""
    if config.image_aspect_ratio != "anyres":
        return {"image_aspect_ratio": config.image_aspect_ratio}
    pinpoints = config.image_grid_pinpoints or [[cols * image_size, rows * image_size] for cols, rows in ANYRES_GRIDS]
    return {"image_aspect_ratio": "anyres", "image_grid_pinpoints": pinpoints,
            "patch_merge_type": config.patch_merge_type}


def set_stage(model, stage, lora_r=0, lora_alpha=0.0, lora_dropout=0.0):
    """The two stages differ only here: stage 1 trains the projector, stage 2 the projector and the LLM, or with
    lora_r > 0 the projector and low-rank adapters on the LLM's block linears, the LLM itself frozen (lora.py).
    LLaVA-1.6's image_newline trains in stage 2 (LoRA too), as LLaVA-NeXT tunes it with the language model."""
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    model.llm.requires_grad_(stage == 2)
    if hasattr(model, "image_newline"):
        model.image_newline.requires_grad_(stage == 2)
    if lora_r:
        apply_lora(model.llm, lora_r, lora_alpha or 2.0 * lora_r, lora_dropout)  # A drawn from the seeded RNG
    return model


# -----------------------------------------------------------------------------------------------------------------
# optimizer, schedule and data order: a pure function of (seed, step), so a resumed run sees the same batches


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


def step_batches(dataset, epoch, first_step, steps_per_epoch, collate, rank, world, config):
    """Yields (step, [micro-batches of this rank]) from first_step on. A global batch is a run of batch_size in the
    epoch's order (length grouping: similar lengths, in chunks of even totals, one per loss group or rank), the last
    one shorter; each rank takes its even share in micro-batches, as many on every rank (one short of samples runs
    the batch's first at no loss). "group": each sample's loss group (loss_group consecutive samples of the global
    batch; -1: no loss). The loader works ahead in worker processes."""
    generator, local = torch.Generator().manual_seed(config.seed * 1000 + epoch), config.batch_size // world
    chunk = config.loss_group or local  # the original: a global batch in chunks of its per-device batch
    order = (data.modality_length_grouped_indices(dataset.lengths, chunk, config.batch_size // chunk, generator)
             if config.group_by_length else torch.randperm(len(dataset), generator=generator).tolist())
    micro, group = config.micro_batch_size or local, config.loss_group or config.batch_size
    batches, groups, counts = [], [], []  # this rank's micro-batches: dataset indices, loss groups; per step
    for start in range(first_step * config.batch_size, steps_per_epoch * config.batch_size, config.batch_size):
        size = min(config.batch_size, len(order) - start)
        mine = range(rank * size // world, (rank + 1) * size // world)  # places in the global batch
        counts.append(math.ceil(math.ceil(size / world) / micro))
        for places in (mine[i:i + micro] for i in range(0, counts[-1] * micro, micro)):
            batches.append([order[start + p] for p in places] or [order[start]])
            groups.append(torch.tensor([p // group for p in places] or [-1]))
    with distributed.stop_signals_blocked():  # the workers leave stopping to this process (worker_init)
        # the loader's own seed, not one from the global RNG: that stream feeds LoRA's dropout, which must see the
        # same numbers whether a run resumed mid-epoch or not
        loader = iter(DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=config.num_workers,
                                 worker_init_fn=distributed.worker_init, pin_memory=torch.cuda.is_available(),
                                 generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)))
    groups = iter(groups)
    for step, count in enumerate(counts, first_step):
        yield epoch * steps_per_epoch + step, [next(loader) | {"group": next(groups)} for _ in range(count)]


# -----------------------------------------------------------------------------------------------------------------
# the loop


def train_step(model, optimizer, micro_batches, lr, grad_clip, device, bf16=False, times=None, n_groups=1):
    """One optimizer step over this rank's micro-batches of a global batch: accumulate, clip, AdamW. The loss is the
    mean over the batch's loss groups ("group" of each sample, 0..n_groups-1) of each group's mean over its answer
    tokens: one group, the token mean of the global batch; the original's groups, the mean of HF Trainer's
    per-device means. Either way independent of how the batch is split over ranks and micro-batches.
    Returns (loss, grad_norm, tokens, images, skipped samples), over all ranks. bench_train.py times this function;
    `times`, a dict, gets the seconds of "forward", "backward" and "optimizer" added."""
    world, cuda = dist.get_world_size() if dist.is_initialized() else 1, device.type == "cuda"
    autocast = torch.autocast(device.type, torch.bfloat16) if bf16 and world == 1 else nullcontext()  # FSDP casts
    # flash attention on bf16, as on a GPU; torch has a CPU flash kernel (no memory-efficient one there)
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION] if cuda else [SDPBackend.FLASH_ATTENTION]
    attention = (lambda: sdpa_kernel(backends)) if bf16 else nullcontext  # a new one per use: entered once each
    clock = lambda: (torch.cuda.synchronize() if cuda and times is not None else None, time.perf_counter())[1]  # noqa
    times = {} if times is None else times
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    counts = torch.zeros(n_groups + 1, dtype=torch.long)  # answer tokens per loss group; the last: group -1
    for b in micro_batches:
        counts.index_add_(0, b["group"] % (n_groups + 1), (b["labels"][:, 1:] != IGNORE_INDEX).sum(1))
    *counts, _, tokens, images, skipped = distributed.all_sum([
        *counts.tolist(), sum(b["input_ids"].numel() for b in micro_batches),
        sum(len(b["pixel_values"]) for b in micro_batches if b["pixel_values"] is not None),
        sum(b["skipped"] for b in micro_batches)], device)
    counts = torch.tensor(counts, dtype=torch.float64)
    # each answer token's share of the loss (FSDP averages gradients over ranks: hence `world`); group -1: none
    share = torch.cat([world / ((counts > 0).sum().clamp(min=1) * counts.clamp(min=1)), torch.zeros(1)]).float()
    loss_sum = torch.zeros((), device=device)
    for batch in micro_batches:
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        start = clock()
        with autocast, attention():
            _, losses = model(batch["input_ids"], batch["pixel_values"], batch["labels"],  # per answer token
                              batch.get("image_sizes"))
        middle = clock()
        rows = (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero()[:, 0]  # the sample of each answer token
        weighted = (losses * share.to(device)[batch["group"][rows]]).sum()  # group -1: the last share, 0
        weighted.backward()
        loss_sum += weighted.detach()
        end = clock()
        times["forward"] = times.get("forward", 0) + middle - start
        times["backward"] = times.get("backward", 0) + end - middle
    start = clock()
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(trained, grad_clip or float("inf"))  # grad_clip 0: no clipping
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times["optimizer"] = times.get("optimizer", 0) + clock() - start
    (loss_total,) = distributed.all_sum([loss_sum.item()], device)
    return loss_total / world, grad_norm.item(), tokens, images, skipped


def train_loop(model, optimizer, dataset, collate, config, step, total_steps, flops, rank, world, device):
    """Steps from `step` to total_steps: fetch, step, log, save. Returns (step, why it stopped early, totals)."""
    steps_per_epoch, metrics = math.ceil(len(dataset) / config.batch_size), Path(config.out) / "metrics.jsonl"
    n_groups = math.ceil(config.batch_size / (config.loss_group or config.batch_size))
    peak = config.peak_tflops or distributed.peak_tflops(device)
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    totals = {"tokens": 0, "start": time.time(), "first_loss": None, "loss": float("nan"), "skipped": 0}
    bf16 = distributed.uses_bf16(config.precision, device)
    settings = {k: getattr(config, k) for k in RESUME_MUST_MATCH}  # the data order and what trains
    with distributed.stop_requests() as stop:
        while step < total_steps and not stop:
            epoch, first = divmod(step, steps_per_epoch)
            for step, micro_batches in step_batches(dataset, epoch, first, steps_per_epoch, collate, rank, world,
                                                    config):
                if step >= total_steps:
                    break
                start, lr = time.time(), lr_at(step, total_steps, config)
                loss, grad_norm, tokens, images, skipped = train_step(
                    model, optimizer, micro_batches, lr, config.grad_clip, device, bf16, n_groups=n_groups)
                if not math.isfinite(loss) or not math.isfinite(grad_norm):  # stop: nothing of this step is kept
                    raise FloatingPointError(f"step {step + 1}: loss {loss}, gradient norm {grad_norm}: diverged at lr "
                                             f"{lr:g}; last state: {checkpoint.latest_state(config.out) or 'none'}")
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
                if distributed.all_sum([float(bool(stop))], device)[0] and not stop:  # all ranks stop at one step
                    stop.append("another rank")
                if step == config.stop_after:
                    stop.append(f"stop_after={step}")
                if stop or (config.save_every and step % config.save_every == 0):
                    checkpoint.save_state(model, optimizer, step, config.out, settings, rank)
                if stop:
                    break
    bar.close()
    return step, (stop[0] if stop else None), totals


def save_output(model, config, rank, bf16, state):
    """Stage 1: the projector; stage 2: the whole model + the tokenizer's files (LoRA: merged, and adapter.safetensors
    beside it). Gathered into a plain copy on rank 0 and written to a temporary folder in <out> whose files then
    move into <out>: a failed write leaves no partial file, and the weights are safe in the training state."""
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

    def write(folder):
        if config.stage == 1:
            return plain.save_projector(folder)
        if config.lora_r:  # adapter.safetensors + adapter_config.json: lora.load_adapters puts them on the base
            save_adapters(plain, folder, {"base_model": config.model, **{k: getattr(config, k) for k in (
                "vision_tower", "projector_type", "template")}, **image_layout(config, plain.config.image_size)})
            merge_lora(plain)
        plain.save_pretrained(folder)
        copy_tokenizer(config.tokenizer, folder)
    nbytes = sum(p.numel() * p.element_size() for p in (plain.projector if config.stage == 1 else plain).parameters())
    hint = f".\nThe trained weights are safe in {state}: make room, then --resume writes the output"
    checkpoint.write_output(config.out, write, nbytes, hint)


def run_stage(config, rank, world, device):
    """One stage: inputs, model, sharding, optimizer, resume, the loop, then the training state and the output."""
    log = print if rank == 0 else (lambda *a, **k: None)
    if config.demo and config.stage == 1:
        demo.build_demo_inputs(Path(config.demo_dir), rank)
    train_cli.check_inputs(config, world)
    if config.threads:
        torch.set_num_threads(config.threads)
    tokenizer = Tokenizer(config.tokenizer)
    model = build_model(config, lazy=world > 1)  # under torchrun each rank reads its own shards after sharding
    anyres = model.config.image_aspect_ratio == "anyres"  # each image's count from its size, its tiles as pixels
    dataset = data.LLaVADataset(config.data, config.image_folder, tokenizer, config.template,
                                model.config.image_tokens if anyres else model.config.num_image_tokens,
                                model.config.image_size, config.image_aspect_ratio == "pad", config.max_length,
                                config.skip_bad, model.config.image_grid_pinpoints if anyres else None)
    total_steps = math.ceil(config.epochs * math.ceil(len(dataset) / config.batch_size))  # the last batch kept
    if total_steps == 0:
        raise ValueError(f"{config.data}: no usable samples")
    flops = distributed.flops_per_step(model, config.stage)
    bf16 = distributed.uses_bf16(config.precision, device)
    model = distributed.parallelize(model, device, bf16=bf16, grad_checkpointing=config.grad_checkpointing,
                                    compile_blocks=config.compile)
    optimizer = make_optimizer(model, config)
    settings = {k: getattr(config, k) for k in RESUME_MUST_MATCH}
    first_step = checkpoint.load_state(config.resume, config.out, model, optimizer, settings, rank, total_steps) \
        if config.resume else 0
    if rank == 0:  # the output folder, and its log from first_step on
        checkpoint.trim_metrics(Path(config.out) / "metrics.jsonl", first_step)
    log(f"stage {config.stage} ({config.recipe}): {len(dataset)} samples, {total_steps} steps of {config.batch_size}, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trained parameters, "
        f"{world} process(es) on {device.type}; leading gpt turns dropped: {dataset.dropped_first_turn}")
    with distributed.stall_explained(config.dist_timeout, lambda: f"the last good training state: "
                                     f"{checkpoint.latest_state(config.out) or 'none yet'}; continue with --resume"):
        step, stopped, totals = train_loop(model, optimizer, dataset, lambda b: data.collate(b, tokenizer.pad_id),
                                           config, first_step, total_steps, flops, rank, world, device)
    elapsed, skipped = time.time() - totals["start"], [f"{n} {reason}" for reason, n in dataset.skipped.items()]
    skipped += [f"{totals['skipped']:.0f} image unreadable while training"] if totals["skipped"] else []
    log(f"done: {step}/{total_steps} steps, {totals['tokens']:,.0f} tokens in {elapsed:.0f} s "
        f"({totals['tokens'] / max(elapsed, 1e-9):,.0f} tokens/s), loss {totals['first_loss'] or float('nan'):.4f} "
        f"-> {totals['loss']:.4f}; samples skipped: {', '.join(skipped) or 'none'}")
    if stopped:
        log(f"stopped ({stopped}) at step {step}: continue with --resume")
        return None
    # the trained weights are safe in a training state before the output is written
    state = (checkpoint.save_state(model, optimizer, step, config.out, settings, rank) if step > first_step
             else checkpoint.latest_state(config.out))
    save_output(model, config, rank, bf16, state)
    log(f"saved {'projector' if config.stage == 1 else 'model'} to {config.out}")
    if config.demo and config.stage == 2 and rank == 0:
        demo.print_accuracy(config.out, Path(config.demo_dir) / "data", limit=config.eval_limit or None)
    return model


def main(argv=None):
    """The command line: an error that bad input or a full disk causes becomes one message and exit code 1."""
    args = train_cli.make_parser(__doc__, RECIPES).parse_args(argv)
    try:
        demo_run = train_cli.is_demo(args)
        paths = {name: getattr(args, name) for name in train_cli.PATH_FIELDS}
        configs = [make_config(args.recipe or "demo", stage, args.set, demo_run, **paths)
                   for stage in ([args.stage] if args.stage else [1, 2])]
        if args.dry_run:
            return print(json.dumps(asdict(configs[0])))
        model = None
        with distributed.process_group(timeout_s=configs[0].dist_timeout) as (rank, world, device):
            for config in configs:  # the demo without --stage: stage 1, then stage 2 from its projector
                model = run_stage(config, rank, world, device)
                if model is None:
                    break
            model = model if world == 1 else None  # a sharded model goes before its process group
        return model  # the trained model in one process; None under torchrun, or ended early with a training state
    except (OSError, ValueError, KeyError, FloatingPointError) as e:
        raise SystemExit(f"train.py: error: {e.args[0] if isinstance(e, KeyError) else e}") from e


if __name__ == "__main__":
    main()
