"""Training benches of bench.py: train.py's optimizer step in one process (train), with transformers' LLaVA on the
same weights and batch (--hf); LoRA against full stage-2 tuning (lora); and under torchrun on this CPU (gloo) the
peak memory of rank-sharded loading and the time and memory of a DCP training state (scale).
Random weights and random tokens throughout."""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import checkpoint
import distributed
import formats
import train
from clip import CLIPVisionConfig, CLIPVisionTower
from demo import DEMO_CLIP, DEMO_LLM
from llama import Llama, LlamaConfig
from llava import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LLaVA, LLaVAConfig

BENCH = str(Path(__file__).with_name("bench.py"))  # lora and scale run bench.py subcommands in processes of their own


def _rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _run_bench(*args, launcher=(), env=None):
    """(stdout, its "json: " lines parsed) of `python [launcher] bench.py args` in a process of its own."""
    command = [sys.executable, *launcher, BENCH, *map(str, args)]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    return out.stdout, [json.loads(line.split("json: ", 1)[1]) for line in out.stdout.splitlines() if "json: " in line]


# -------------------------------------------------------------------------------------------------------- train
# train.train_step (accumulation, clipping, AdamW, bf16 autocast + flash attention on CUDA) on random weights and
# random tokens: each sample is BOS, one image's placeholders, then text to --seq-len. The optimizer's settings and
# the precision are the --recipe's, as train.py decides them.
TRAIN_PRESETS = {  # name: (LlamaConfig preset, CLIPVisionConfig preset)
    "demo": (None, None),  # train.py's demo shapes
    "tiny": ("tiny", "tiny"),
    "tinyllama-336": ("tinyllama-1.1b", "vit-l-14-336"),  # a 1B-class LLaVA-1.5
    "smollm-135m": ("smollm-135m", "tiny"),  # LLM shapes with the tiny tower: short sequences fit a CPU (bench lora)
    "tinyllama-1.1b": ("tinyllama-1.1b", "tiny"),
    "smollm-576": ("smollm-135m", "tiny-336"),  # a LLaVA-1.5 sample's sequence (576 image tokens), cheap tower
    "vicuna-7b-336": ("vicuna-7b", "vit-l-14-336"),  # LLaVA-1.5-7B
}


def add_train_args(parser):
    parser.add_argument("--preset", default="demo", choices=TRAIN_PRESETS)
    parser.add_argument("--recipe", default="llava-v1.5", help="train.py recipe for the optimizer's lr, decay, clip")
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2))
    parser.add_argument("--batch", type=int, default=16, help="samples per step")
    parser.add_argument("--micro-batch", type=int, help="samples per forward (default: the whole batch)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample, image tokens included")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder block (train.py's compile)")
    parser.add_argument("--peak-tflops", type=float, help="accelerator peak: prints MFU (default: known cards)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--lora-r", type=int, help="LoRA rank (default: the recipe's lora_r; 0: full tuning)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line (bench lora)")
    parser.add_argument("--labelled", type=int, help="labels on the last N tokens only (a stage-1 caption); default: "
                        "every text token")
    parser.add_argument("--hf", action="store_true", help="also time transformers' LlavaForConditionalGeneration on "
                        "identical weights and batch (stage 2, one process): step time and first loss")


def _train_batch(config, batch, seq_len, device):
    """(input_ids, labels) (B, T) and pixel_values (B, 3, S, S): BOS, the image's placeholders, random text."""
    P, V = config.num_image_tokens, config.llm.vocab_size
    input_ids = torch.randint(3, V - 1, (batch, seq_len), device=device)  # the last id: --hf's <image>
    input_ids[:, 0], input_ids[:, 1:P + 1] = config.llm.bos_token_id, IMAGE_TOKEN_INDEX
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
    size = config.image_size
    return input_ids, labels, torch.randn(batch, 3, size, size, device=device)


def bench_train(args):
    """Tokens/s, MFU and peak memory of train.py's optimizer step, split into forward, backward and optimizer."""
    device = distributed.default_device()
    cuda = device.type == "cuda"
    llm_name, vision_name = TRAIN_PRESETS[args.preset]
    llm = LlamaConfig.from_name(llm_name) if llm_name else LlamaConfig(vocab_size=512, **DEMO_LLM)
    vision = CLIPVisionConfig.from_name(vision_name) if vision_name else CLIPVisionConfig(**DEMO_CLIP)
    config = train.make_config(args.recipe, args.stage, [] if args.lora_r is None else [f"lora_r={args.lora_r}"])
    torch.manual_seed(0)
    with torch.device(device):
        model = train.set_stage(LLaVA(LLaVAConfig(llm=llm, vision=vision)), args.stage, config.lora_r,
                                config.lora_alpha, config.lora_dropout)
    flops = distributed.flops_per_step(model, args.stage)
    bf16 = distributed.uses_bf16(config.precision, device)
    model = distributed.parallelize(model, device, bf16=bf16, grad_checkpointing=args.grad_checkpointing,
                                    compile_blocks=args.compile)
    optimizer = train.make_optimizer(model, config)
    trained = [p for p in model.parameters() if p.requires_grad]
    P, T, B = model.config.num_image_tokens, args.seq_len, args.batch
    micro = args.micro_batch or B
    if T <= P + 1:
        raise SystemExit(f"--seq-len {T} must exceed the {P} image tokens + BOS")
    if B % micro:
        raise SystemExit(f"--batch {B} must be a multiple of --micro-batch {micro}")
    input_ids, labels, pixel_values = _train_batch(model.config, B, T, device)
    if args.labelled:
        labels[:, :T - args.labelled] = IGNORE_INDEX
    micro_batches = [{"input_ids": input_ids[i:i + micro], "labels": labels[i:i + micro], "skipped": 0,
                      "pixel_values": pixel_values[i:i + micro], "group": torch.zeros(micro, dtype=torch.long)}
                     for i in range(0, B, micro)]
    if args.hf:  # before any step: the same weights
        hf, hf_batch = _hf_llava(model, input_ids, labels, pixel_values)
    times, parts, losses = [], [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps + 2):
        start, part = time.perf_counter(), {}
        # the loop's step; it ends in .item(), so its GPU work is done when it returns
        losses.append(train.train_step(model, optimizer, micro_batches, config.lr, config.grad_clip, device, bf16,
                                       times=part)[0])
        times.append(time.perf_counter() - start)
        parts.append(part)
    dt = statistics.median(times[2:])
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or distributed.peak_tflops(device)
    achieved = flops(B * T, B, T) / dt
    memory = (f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else
              f"peak RSS {_rss_gib():.2f} GiB")
    n_trained, n_params = sum(p.numel() for p in trained), sum(p.numel() for p in model.parameters())
    print(f"train {args.preset} stage {args.stage} ({args.recipe} optimizer) on {name}: batch {B} x {T} tokens "
          f"({P} image tokens) in micro-batches of {micro}, grad checkpointing "
          f"{'on' if args.grad_checkpointing else 'off'}, compile {'on' if args.compile else 'off'}, "
          f"{n_trained / 1e6:.1f}M of {n_params / 1e6:.1f}M parameters trained")
    print(f"  {dt * 1e3:.1f} ms/step (median of {args.steps}), {B * T / dt:,.0f} tokens/s, "
          f"{achieved / 1e12:.3g} TFLOP/s{f', MFU {100 * achieved / (peak * 1e12):.1f}%' if peak else ''}, {memory}")
    optimizer_bytes = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                          if torch.is_tensor(v))
    print(f"  lora_r {config.lora_r}, optimizer state {optimizer_bytes / 2**20:,.1f} MiB")
    median_step = sorted(range(2, len(times)), key=times.__getitem__)[(len(times) - 2) // 2]
    split = parts[median_step]
    print("  split of the median step: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in split.items())
          + f", rest {(times[median_step] - sum(split.values())) * 1e3:.1f} ms; first loss {losses[0]:.6f}")
    if args.hf:
        import transformers
        hf_time, hf_loss = _time_hf_train(hf, hf_batch, config, args.steps)
        print(f"  transformers {transformers.__version__} LlavaForConditionalGeneration, same weights and batch: "
              f"{hf_time * 1e3:.1f} ms/step, first loss {hf_loss:.6f}; llava-minimal / transformers step time "
              f"{hf_time / dt:.2f}x, loss difference {abs(hf_loss - losses[0]):.2e}")
    if args.json:
        print("json: " + json.dumps({"lora_r": config.lora_r, "trained": n_trained, "params": n_params,
                                     "step_s": dt, "all_steps_s": times, "optimizer_bytes": optimizer_bytes,
                                     "memory": memory}))


def _hf_llava(model, input_ids, labels, pixel_values):
    """transformers' LlavaForConditionalGeneration with `model`'s weights (formats.export_hf), stage 2 trainable, and
    the batch in its terms: <image> is the vocabulary's last id, so no padding rows enter the softmax."""
    import transformers
    V = model.config.llm.vocab_size
    assert V % 64 == 0, "export_hf pads the vocabulary to a multiple of 64: the losses would differ"
    model.config.image_token_index = V - 1
    with tempfile.TemporaryDirectory() as tmp:
        formats.export_hf(model, tmp)
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32)
    hf.train().model.vision_tower.requires_grad_(False)
    ids = input_ids.masked_fill(input_ids == IMAGE_TOKEN_INDEX, V - 1)
    return hf, {"input_ids": ids, "labels": labels, "pixel_values": pixel_values}


def _time_hf_train(hf, batch, config, steps):
    """A step as the HF Trainer takes it: forward with labels (full logits), backward, clip, AdamW (fused: Trainer's
    default adamw_torch_fused), zero_grad. Returns (median seconds, the first step's loss)."""
    trained = [p for p in hf.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    times, losses = [], []
    for step in range(steps + 2):
        start = time.perf_counter()
        loss = hf(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, config.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # waits for the step's GPU work, as train_step's own .item() does
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]), losses[0]


# --------------------------------------------------------------------------------------------------------- lora

def add_lora_args(parser):
    parser.add_argument("--preset", default="smollm-135m", choices=TRAIN_PRESETS)
    parser.add_argument("--lora-r", type=int, default=128, help="LoRA rank (alpha 2r, the recipe's dropout)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sample (16 image tokens + text)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=1)


def bench_lora(args):
    """Full stage 2 (llava-v1.5) and LoRA stage 2 (llava-v1.5-lora) of `bench.py train`, each in its own process so
    that each peak RSS is its own: trained parameters, optimizer state, peak memory, step time and their ratios."""
    results = {}
    for recipe, r in (("llava-v1.5", 0), ("llava-v1.5-lora", args.lora_r)):
        out, (results[r],) = _run_bench("train", "--preset", args.preset, "--recipe", recipe, "--lora-r", r,
                                        "--batch", args.batch, "--seq-len", args.seq_len, "--steps", args.steps,
                                        "--threads", args.threads, "--json")
        print(out.rstrip())
    full, lora = results[0], results[args.lora_r]
    print(f"LoRA r={args.lora_r} / full: trained parameters {lora['trained'] / full['trained']:.4f}x, optimizer state "
          f"{lora['optimizer_bytes'] / full['optimizer_bytes']:.4f}x, step time {lora['step_s'] / full['step_s']:.2f}x "
          f"(medians); peak memory {full['memory']} -> {lora['memory']}")


# -------------------------------------------------------------------------------------------------------- scale
# train.py under torchrun on this CPU (gloo): peak RSS per rank of loading a base LLM (train.build_model(lazy=True):
# each rank reads its own shards, memory-mapped, once distributed.parallelize has sharded the model) against one
# process loading it whole; then the time and peak RSS of writing and resuming a training state with DCP
# (checkpoint.save_state / load_state: each rank its own shards). Random weights are written to --dir once; every
# figure comes from a process of its own.

def add_scale_args(parser):
    parser.add_argument("--load-preset", default="tinyllama-1.1b", help="LLM preset for the loading figures")
    parser.add_argument("--state-preset", default="smollm-135m", help="LLM preset for the training-state figures")
    parser.add_argument("--dir", default="/tmp/bench_scale", help="where the random checkpoints and states go")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def _scale_config(llm_dir, clip_dir):
    return train.make_config("llava-v1.5", 2, ["num_workers=0", "image_size=0"], model=str(llm_dir),
                             vision_tower=str(clip_dir), data="unused", image_folder="unused")


def _scale_worker(args):
    """One measurement in this process (or this torchrun rank), printed as one JSON line. "load": build and shard the
    model; "state": then write a training state and resume from it."""
    kind, preset = args.worker.split(":")
    with distributed.process_group(timeout_s=3600) as (rank, world, device):
        config = _scale_config(f"{args.dir}/{preset}", f"{args.dir}/clip")
        start = time.perf_counter()
        model = distributed.parallelize(train.build_model(config, lazy=world > 1), device)
        result = {"kind": kind, "rank": rank, "world": world, "load_s": time.perf_counter() - start,
                  "load_rss_gib": _rss_gib()}
        if kind == "state":
            optimizer = train.make_optimizer(model, config)
            out, settings = f"{args.dir}/out_state", {k: getattr(config, k) for k in train.RESUME_MUST_MATCH}
            if rank == 0:  # the other ranks write only into the fresh folder that save_state makes on rank 0
                shutil.rmtree(out, ignore_errors=True)
            before, start = _rss_gib(), time.perf_counter()
            path = checkpoint.save_state(model, optimizer, 1, out, settings, rank)
            result.update(save_s=time.perf_counter() - start, save_rss_gib=_rss_gib(), rss_before_gib=before)
            start = time.perf_counter()
            checkpoint.load_state(path, out, model, optimizer, settings, rank)
            result.update(resume_s=time.perf_counter() - start, resume_rss_gib=_rss_gib())
        rows = [None] * world if rank == 0 else None  # one printer: two ranks' lines could interleave on stdout
        if world > 1:
            torch.distributed.gather_object(result, rows)
        for row in rows or ():
            print("json: " + json.dumps(row or result), flush=True)
        model = optimizer = None  # a sharded model goes before its process group (distributed.process_group)


def _spawn_scale_worker(kind, preset, ranks, folder):
    """Run one _scale_worker measurement in `ranks` fresh processes (torchrun for 2 or more); print and return each
    rank's figures."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    _, rows = _run_bench("scale", "--dir", folder, "--worker", f"{kind}:{preset}", launcher=launcher,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    for row in rows:
        print(f"  {kind} {preset}, {ranks} process(es), rank {row['rank']}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in row.items() if k.endswith(("_s", "_gib"))), flush=True)
    return rows


def bench_scale(args):
    """2 ranks against 1 process: peak RSS of loading a base LLM; time and peak RSS of a DCP training state."""
    if args.worker:
        return _scale_worker(args)
    torch.manual_seed(0)
    for preset in (args.load_preset, args.state_preset):
        if not Path(f"{args.dir}/{preset}/model.safetensors").is_file():
            Llama(LlamaConfig.from_name(preset)).save_pretrained(f"{args.dir}/{preset}")  # random, fp32
    if not Path(f"{args.dir}/clip/model.safetensors").is_file():
        CLIPVisionTower(CLIPVisionConfig.from_name("tiny")).save_pretrained(f"{args.dir}/clip")
    size = os.path.getsize(f"{args.dir}/{args.load_preset}/model.safetensors") / 2**30
    print(f"loading {args.load_preset} ({size:.2f} GiB fp32 safetensors), peak RSS (getrusage) per process:")
    one = _spawn_scale_worker("load", args.load_preset, 1, args.dir)[0]
    two = _spawn_scale_worker("load", args.load_preset, 2, args.dir)
    worst = max(r["load_rss_gib"] for r in two)
    print(f"  2 ranks / 1 process peak RSS: {worst / one['load_rss_gib']:.2f}x (the larger rank)")
    print(f"training state of {args.state_preset} (stage 2: every LLM weight + AdamW moments), DCP, 2 ranks:")
    rows = _spawn_scale_worker("state", args.state_preset, 2, args.dir)
    print("  the larger rank: " + ", ".join(f"{key} {max(r[key] for r in rows):.2f}" for key in
                                            ("save_s", "save_rss_gib", "resume_s", "resume_rss_gib")))
