"""Speed and memory of the model files, side by side with the Hugging Face reference when it is installed.

    python bench.py llama --preset smollm-135m          # prefill and decode tokens/s
    python bench.py clip --preset vit-l-14 --batch 8    # tower images/s
    python bench.py train --preset tiny                 # training-step tokens/s and peak memory
    python bench.py scale                               # 2 ranks: sharded load RSS, DCP states vs full gather
    python bench.py lora --preset smollm-135m           # LoRA vs full stage 2: trained params, optimizer, memory, time
    python bench.py generate --threads 1                # batched generation tokens/s by batch size; int8 vs fp32
    python bench.py answer --threads 1                  # evaluate.py's answering: demo questions/s by batch size
    python bench.py quality --model DIR --text FILE     # int8 (and bf16) next-token agreement with fp32 on real text

Figures go to BENCHMARKS.md with the machine, the command and the date.
"""
import argparse

# ---- llama ----
import inspect
import json
import math
import statistics
import time

import torch


def add_llama_args(parser):
    parser.add_argument("--preset", default="smollm-135m", help="a LlamaConfig.from_name preset")
    parser.add_argument("--config", help="a HF config.json (overrides --preset)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompt-len", type=int, default=128, help="prefill length (batch 1)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="medians over this many runs of each model")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers even when installed")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def _time_llama(model, prompt, new_tokens, device):
    """(prefill seconds, decode seconds for new_tokens greedy steps) with our static KV cache."""
    T = prompt.shape[1]
    positions = torch.arange(T + new_tokens, device=device)
    model.setup_cache(1, T + new_tokens)
    _sync(device); t0 = time.perf_counter()
    logits = model(prompt, input_pos=positions[:T])  # (1, T, V)
    _sync(device); t1 = time.perf_counter()
    for i in range(new_tokens):  # generate()'s loop: one token in, next greedy token out
        token = logits[:, -1].argmax(-1)  # (1,)
        logits = model(token.view(1, 1), input_pos=positions[T + i:T + i + 1])
    _sync(device); t2 = time.perf_counter()
    return t1 - t0, t2 - t1


@torch.inference_mode()
def _time_hf(model, prompt, new_tokens, device):
    from transformers import DynamicCache
    # transformers >= 5.24 renamed past_key_values to cache
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    kw = {name: DynamicCache(config=model.config), "use_cache": True}
    _sync(device); t0 = time.perf_counter()
    logits = model(prompt, **kw).logits  # (1, T, V)
    _sync(device); t1 = time.perf_counter()
    for _ in range(new_tokens):
        token = logits[:, -1].argmax(-1)  # (1,)
        logits = model(token.view(1, 1), **kw).logits
    _sync(device); t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def run_llama(args):
    from llama import Llama, LlamaConfig, llama_to_hf_keys
    if args.config:
        with open(args.config) as f:
            config = LlamaConfig.from_hf(json.load(f))
    else:
        config = LlamaConfig.from_name(args.preset)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Llama(config).to(args.device, dtype).eval()
    models = {"llama.py": (model, _time_llama)}
    if not args.no_reference:
        try:
            import transformers
        except ImportError:
            print("transformers not installed: llama.py only")
        else:
            hf_config = transformers.LlamaConfig(**config.to_hf())
            hf = transformers.LlamaForCausalLM(hf_config).to(args.device, dtype).eval()
            hf.load_state_dict(llama_to_hf_keys(model.state_dict()))  # identical weights
            models[f"transformers {transformers.__version__}"] = (hf, _time_hf)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), device=args.device)
    times = {name: [] for name in models}
    for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, (m, timer) in models.items():  # interleaved: both models see the same machine load
            if repeat:
                times[name].append(timer(m, prompt, args.new_tokens, args.device))
            else:
                timer(m, prompt, 2, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.config or args.preset}: {n_params / 1e6:.1f}M params, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.repeats}")
    rates = {}
    for name, runs in times.items():
        prefill = args.prompt_len / statistics.median(r[0] for r in runs)
        decode = args.new_tokens / statistics.median(r[1] for r in runs)
        rates[name] = (prefill, decode)
        print(f"  {name:24s} prefill {prefill:10.1f} tok/s   decode {decode:8.1f} tok/s")
    if len(rates) == 2:
        (p0, d0), (p1, d1) = rates.values()
        print(f"  {'ratio llama.py / ref':24s} prefill {p0 / p1:10.2f}x      decode {d0 / d1:8.2f}x")

# ---- clip ----
def clip_args(p):
    p.add_argument("--preset", default="vit-l-14", help="clip.py preset: tiny, vit-l-14, vit-l-14-336")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--select-layer", type=int, default=-2, help="-2: LLaVA's features; -1: every layer (like for like)")
    p.add_argument("--repeats", type=int, default=5, help="timed batches per model (median reported)")
    p.add_argument("--no-reference", action="store_true", help="skip transformers even when installed")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (1 is steadier on a shared machine)")


def clip_flops_per_image(config, layers):
    # matmul FLOPs: patch conv, q/k/v/out + MLP per token, and the two T x T attention products per layer
    T, C, I = config.num_patches + 1, config.hidden_size, config.intermediate_size
    conv = 2 * config.num_patches * C * config.num_channels * config.patch_size ** 2
    return conv + layers * (2 * T * (4 * C * C + 2 * C * I) + 4 * T * T * C)


def clip_run(args):
    import statistics
    import time

    import torch

    from clip import CLIPVisionConfig, CLIPVisionTower, tower_to_clip_keys
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype, sync = getattr(torch, args.dtype), (torch.cuda.synchronize if device.startswith("cuda") else lambda: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = CLIPVisionConfig.from_name(args.preset)
    ours = CLIPVisionTower(config).to(device, dtype).eval()  # random weights: speed does not depend on them
    x = torch.randn(args.batch, 3, config.image_size, config.image_size, device=device, dtype=dtype)
    runs = {"clip.py": lambda: ours(x, select_layer=args.select_layer)}
    if args.select_layer != -1:  # like for like with transformers, which always runs every layer
        runs["clip.py all layers"] = lambda: ours(x, select_layer=-1)
    try:
        if args.no_reference:
            raise ImportError
        import transformers
        hf_config = transformers.CLIPVisionConfig(**{k: v for k, v in config.to_hf().items() if k != "architectures"})
        hf = transformers.CLIPVisionModel(hf_config).to(device, dtype).eval()
        state = ours.state_dict()  # transformers 5 names == tower names; transformers 4 adds "vision_model."
        hf.load_state_dict(state if "pre_layrnorm.weight" in hf.state_dict() else tower_to_clip_keys(state))
        # what LLaVA runs: every layer, output_hidden_states, then pick the layer and drop CLS
        runs["transformers"] = lambda: hf(x, output_hidden_states=True).hidden_states[args.select_layer][:, 1:]
    except ImportError:
        pass
    times = {name: [] for name in runs}
    with torch.inference_mode():
        outputs = {name: run() for name, run in runs.items()}  # warm-up, and a check that both agree
        if "transformers" in outputs:
            diff = (outputs["clip.py"].float() - outputs["transformers"].float()).abs().max().item()
            print(f"max |clip.py - transformers| = {diff:.2e}")
        for i in range(args.repeats):  # interleaved, order alternating, so that outside load hits all alike
            for name in list(runs)[::1 if i % 2 == 0 else -1]:
                sync()
                start = time.perf_counter()
                runs[name]()
                sync()
                times[name].append(time.perf_counter() - start)
    layers = config.num_hidden_layers + 1 + args.select_layer if args.select_layer < 0 else args.select_layer
    print(f"clip {args.preset} batch {args.batch} {device} {args.dtype} select_layer {args.select_layer} "
          f"torch {torch.__version__} threads {torch.get_num_threads()}")
    for name, t in times.items():
        seconds = statistics.median(t)
        depth = layers if name == "clip.py" else config.num_hidden_layers
        tflops = clip_flops_per_image(config, depth) * args.batch / seconds / 1e12
        print(f"  {name:18s} {args.batch / seconds:8.2f} images/s  (median {seconds * 1e3:.1f} ms/batch, "
              f"{tflops:.3f} TFLOP/s; all runs ms: {' '.join(f'{s * 1e3:.0f}' for s in t)})")
    for name in [n for n in times if n.startswith("clip.py")] if "transformers" in times else []:
        ratio = statistics.median(times["transformers"]) / statistics.median(times[name])
        # the same repeat's runs are adjacent in time, so their ratio is the one least moved by outside load
        paired = statistics.median(h / o for h, o in zip(times["transformers"], times[name]))
        print(f"  speed ratio {name} / transformers: {ratio:.2f}x of medians, {paired:.2f}x median of pairs")

# ---- train ----
# train.py's own optimizer step (train.train_step: accumulation, clipping, AdamW, bf16 autocast + flash attention on
# CUDA) in one process, on random weights and random tokens: each sample is BOS, one image's placeholders, then text
# to --seq-len. The optimizer's settings are the --recipe's.
TRAIN_PRESETS = {  # name: (LlamaConfig preset, CLIPVisionConfig preset)
    "demo": (None, None),  # train.py's demo shapes
    "tiny": ("tiny", "tiny"),
    "tinyllama-336": ("tinyllama-1.1b", "vit-l-14-336"),  # a 1B-class LLaVA-1.5
    "smollm-135m": ("smollm-135m", "tiny"),  # LLM shapes with the tiny tower: short sequences fit a CPU (bench lora)
    "tinyllama-1.1b": ("tinyllama-1.1b", "tiny"),
    "smollm-576": ("smollm-135m", "tiny-336"),  # a LLaVA-1.5 sample's sequence (576 image tokens), cheap tower
    "vicuna-7b-336": ("vicuna-7b", "vit-l-14-336"),  # LLaVA-1.5-7B
}


def train_args(parser):
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
    parser.add_argument("--full-logits", action="store_true",
                        help="the loss as before issue 17 item 1: lm_head on every position, (B, T, V) fp32 logits")
    parser.add_argument("--hf", action="store_true", help="also time transformers' LlavaForConditionalGeneration on "
                        "identical weights and batch (stage 2, one process): step time and first loss")


def train_bench(args):
    import resource
    import torch.nn.functional as F
    import demo
    import train
    from clip import CLIPVisionConfig
    from llama import LlamaConfig
    from llava import LLaVA, LLaVAConfig
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    llm_name, vision_name = TRAIN_PRESETS[args.preset]
    llm = LlamaConfig.from_name(llm_name) if llm_name else LlamaConfig(vocab_size=512, **demo.DEMO_LLM)
    vision = CLIPVisionConfig.from_name(vision_name) if vision_name else CLIPVisionConfig(**demo.DEMO_CLIP)
    config = train.make_config(args.recipe, args.stage, [] if args.lora_r is None else [f"lora_r={args.lora_r}"])
    torch.manual_seed(0)
    with torch.device(device):
        model = train.set_stage(LLaVA(LLaVAConfig(llm=llm, vision=vision)), args.stage, config.lora_r,
                                config.lora_alpha, config.lora_dropout)
    flops = train.flops_per_step(model, args.stage)
    model = train.parallelize(model, device, args.grad_checkpointing, compile_blocks=args.compile)
    optimizer = train.make_optimizer(model, config)
    trained = [p for p in model.parameters() if p.requires_grad]
    P, T, B = model.config.num_image_tokens, args.seq_len, args.batch
    micro = args.micro_batch or B
    if T <= P + 1:
        raise SystemExit(f"--seq-len {T} must exceed the {P} image tokens + BOS")
    if B % micro:
        raise SystemExit(f"--batch {B} must be a multiple of --micro-batch {micro}")
    input_ids = torch.randint(3, llm.vocab_size - 1, (B, T), device=device)  # (B, T); the last id: --hf's <image>
    input_ids[:, 0], input_ids[:, 1:P + 1] = llm.bos_token_id, -200
    labels = input_ids.masked_fill(input_ids == -200, -100)  # (B, T)
    if args.labelled:
        labels[:, :T - args.labelled] = -100
    pixel_values = torch.randn(B, 3, vision.image_size, vision.image_size, device=device)  # (B, 3, S, S)
    micro_batches = [{"input_ids": input_ids[i:i + micro], "labels": labels[i:i + micro],
                      "pixel_values": pixel_values[i:i + micro]} for i in range(0, B, micro)]
    if args.hf:  # before any step: the same weights
        hf, hf_batch = _hf_llava(model, input_ids, labels, pixel_values)
    if args.full_logits:  # the form before item 1: logits at every position, then the shifted cross-entropy
        def full_logits_forward(ids, px, targets):
            logits = model.llm(inputs_embeds=model.embed(ids, px))  # (B, T, V)
            return logits, F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(),
                                           ignore_index=-100)
        model.forward = full_logits_forward
    times, parts, first_loss = [], [], None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps + 2):
        _sync(device); start = time.perf_counter()
        part = {}
        loss = train.train_step(model, optimizer, micro_batches, config.lr, config.grad_clip, device,
                                times=part)[0]  # the loop's step
        _sync(device)
        times.append(time.perf_counter() - start)
        parts.append(part)
        first_loss = loss if first_loss is None else first_loss
    dt = statistics.median(times[2:])
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in train.PEAK_TFLOPS.items() if cuda and k in name), None)
    achieved = flops(B * T, B, T) / dt
    memory = (f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else
              f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print(f"train {args.preset} stage {args.stage} ({args.recipe} optimizer) on {name}: batch {B} x {T} tokens "
          f"({P} image tokens) in micro-batches of {micro}, "
          f"grad checkpointing {'on' if args.grad_checkpointing else 'off'}, "
          f"compile {'on' if args.compile else 'off'}, "
          f"{sum(p.numel() for p in trained) / 1e6:.1f}M of {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters trained")
    print(f"  {dt * 1e3:.1f} ms/step (median of {args.steps}), {B * T / dt:,.0f} tokens/s, "
          f"{achieved / 1e12:.3g} TFLOP/s{f', MFU {100 * achieved / (peak * 1e12):.1f}%' if peak else ''}, {memory}")
    optimizer_bytes = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                          if torch.is_tensor(v))
    print(f"  lora_r {config.lora_r}, optimizer state {optimizer_bytes / 2**20:,.1f} MiB")
    split = parts[sorted(range(2, len(times)), key=times.__getitem__)[(len(times) - 2) // 2]]  # the median step's
    print("  split of the median step: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in split.items())
          + f", rest {(dt - sum(split.values())) * 1e3:.1f} ms; first loss {first_loss:.6f}"
          + (" (full-logits loss, before item 1)" if args.full_logits else ""))
    if args.hf:
        hf_times, hf_loss = _time_hf_train(hf, hf_batch, config, args.steps)
        import transformers
        print(f"  transformers {transformers.__version__} LlavaForConditionalGeneration, same weights and batch: "
              f"{hf_times * 1e3:.1f} ms/step, first loss {hf_loss:.6f}; llava-minimal / transformers step time "
              f"{hf_times / dt:.2f}x, loss difference {abs(hf_loss - first_loss):.2e}")
    if args.json:
        print("json: " + json.dumps({"lora_r": config.lora_r, "trained": sum(p.numel() for p in trained),
                                     "params": sum(p.numel() for p in model.parameters()), "step_s": dt,
                                     "all_steps_s": times, "optimizer_bytes": optimizer_bytes, "memory": memory}))


def _hf_llava(model, input_ids, labels, pixel_values):
    """transformers' LlavaForConditionalGeneration with `model`'s weights (formats.export_hf), stage 2 trainable, and
    the batch in its terms: <image> is the vocabulary's last id, so no padding rows enter the softmax."""
    import tempfile
    import transformers
    import formats
    V = model.config.llm.vocab_size
    assert V % 64 == 0, "export_hf pads the vocabulary to a multiple of 64: the losses would differ"
    model.config.image_token_index = V - 1
    with tempfile.TemporaryDirectory() as tmp:
        formats.export_hf(model, tmp)
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32)
    hf.train().model.vision_tower.requires_grad_(False)
    ids = input_ids.masked_fill(input_ids == -200, V - 1)
    return hf, {"input_ids": ids, "labels": labels, "pixel_values": pixel_values}


def _time_hf_train(hf, batch, config, steps):
    """A step as the HF Trainer takes it: forward with labels (full logits), backward, clip, AdamW (fused: Trainer's
    default adamw_torch_fused), zero_grad. Returns (median seconds, the first step's loss)."""
    trained = [p for p in hf.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    times, first = [], None
    for step in range(steps + 2):
        start = time.perf_counter()
        loss = hf(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        first = loss.item() if first is None else first
    return statistics.median(times[2:]), first


# ---- scale ----
# train.py under torchrun on this CPU (gloo): peak RSS per rank of loading a base LLM (each rank its own shards,
# memory-mapped) against one process loading it whole; then the time and peak RSS of writing and reading a training
# state with DCP (each rank its own shards) against the previous full gather to rank 0 (model + optimizer
# gathered, one safetensors file each). Random weights written to --dir once; every figure from its own process.

def scale_args(parser):
    parser.add_argument("--load-preset", default="tinyllama-1.1b", help="LLM preset for the loading figures")
    parser.add_argument("--state-preset", default="smollm-135m", help="LLM preset for the training-state figures")
    parser.add_argument("--dir", default="/tmp/bench_scale", help="where the random checkpoints and states go")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def _scale_config(llm_dir, clip_dir, stage=2):
    import train
    return train.make_config("llava-v1.5", stage, ["num_workers=0", "image_size=0"], model=str(llm_dir),
                             vision_tower=str(clip_dir), data="unused", image_folder="unused")


def _rss_gib():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _scale_worker(args):
    """One measurement, in this process (or this torchrun rank); prints one JSON line."""
    import os
    import shutil
    import torch.distributed as dist
    import train
    from fileio import save_tensors
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    kind, preset = args.worker.split(":")
    rank, world, device = train.setup_distributed(3600)
    config = _scale_config(f"{args.dir}/{preset}", f"{args.dir}/clip")
    start = time.perf_counter()
    built = train.build_sharded(config) if world > 1 else None
    model, sources = built or (train.build_model(config), None)
    model = train.parallelize(model, device, False, False)
    if sources:
        train.load_sharded(model, sources, device)
    result = {"kind": kind, "rank": rank, "world": world, "load_s": time.perf_counter() - start,
              "load_rss_gib": _rss_gib()}
    if kind != "load":
        optimizer = train.make_optimizer(model, config)
        config.out = f"{args.dir}/out_{kind}"
        if rank == 0:
            shutil.rmtree(config.out, ignore_errors=True)
            os.makedirs(config.out)
        if world > 1:
            dist.barrier()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        before = _rss_gib()
        start = time.perf_counter()
        if kind == "dcp":
            path = train.save_state(model, optimizer, 1, config, rank)
        else:  # the previous training state: everything gathered to rank 0 and written there
            weights = get_model_state_dict(model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
            optim = get_optimizer_state_dict(model, optimizer, options=options)
            path = f"{config.out}/full"
            if rank == 0:
                save_tensors(f"{path}.model.safetensors", {k: v.contiguous() for k, v in weights.items()})
                save_tensors(f"{path}.optimizer.safetensors", {f"{n}:{k}": v for n, s in optim["state"].items()
                                                               for k, v in s.items()})
            del weights, optim
            if world > 1:
                dist.barrier()
        result.update(save_s=time.perf_counter() - start, save_rss_gib=_rss_gib(), rss_before_gib=before)
        start = time.perf_counter()
        if kind == "dcp":
            train.load_state(path, model, optimizer, config, rank)
        else:  # the previous resume: every rank reads the whole files, then keeps its shards
            weights = load_file(f"{path}.model.safetensors")
            set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
            optim = {"state": {}, "param_groups": get_optimizer_state_dict(model, optimizer)["param_groups"]}
            for key, value in load_file(f"{path}.optimizer.safetensors").items():
                name, field = key.rsplit(":", 1)
                optim["state"].setdefault(name, {})[field] = value
            set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))
        result.update(resume_s=time.perf_counter() - start, resume_rss_gib=_rss_gib())
    print("json: " + json.dumps(result), flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def scale_bench(args):
    import os
    import subprocess
    import sys
    from pathlib import Path
    from clip import CLIPVisionConfig, CLIPVisionTower
    from llama import Llama, LlamaConfig
    if args.worker:
        return _scale_worker(args)
    torch.manual_seed(0)
    for preset in (args.load_preset, args.state_preset):
        if not Path(f"{args.dir}/{preset}/model.safetensors").is_file():
            Llama(LlamaConfig.from_name(preset)).save_pretrained(f"{args.dir}/{preset}")  # random, fp32
    if not Path(f"{args.dir}/clip/model.safetensors").is_file():
        CLIPVisionTower(CLIPVisionConfig.from_name("tiny")).save_pretrained(f"{args.dir}/clip")
    size = os.path.getsize(f"{args.dir}/{args.load_preset}/model.safetensors") / 2**30
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}

    def run(kind, preset, ranks):
        command = [sys.executable, __file__, "scale", "--dir", args.dir, "--worker", f"{kind}:{preset}"]
        if ranks > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(ranks), *command[1:]]
        out = subprocess.run(command, capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        rows = [json.loads(line.split("json: ", 1)[1]) for line in out.stdout.splitlines() if "json: " in line]
        runs[kind, ranks] = rows
        for row in rows:
            print(f"  {kind} {preset}, {ranks} process(es), rank {row['rank']}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in row.items() if k.endswith(("_s", "_gib"))), flush=True)
        return rows
    print(f"loading {args.load_preset} ({size:.2f} GiB fp32 safetensors), peak RSS (getrusage) per process:")
    one, two = run("load", args.load_preset, 1)[0], run("load", args.load_preset, 2)
    worst = max(r["load_rss_gib"] for r in two)
    print(f"  2 ranks / 1 process peak RSS: {worst / one['load_rss_gib']:.2f}x (the larger rank)")
    print(f"training state of {args.state_preset} (stage 2: every LLM weight + AdamW moments), 2 ranks:")
    for kind in ("full", "dcp"):
        run(kind, args.state_preset, 2)
    for key in ("save_s", "save_rss_gib", "resume_s", "resume_rss_gib"):
        full, dcp = (max(r[key] for r in runs[kind, 2]) for kind in ("full", "dcp"))
        print(f"  {key}: full gather {full:.2f}, DCP {dcp:.2f} ({dcp / full:.2f}x; the larger rank)")


def lora_args(parser):
    parser.add_argument("--preset", default="smollm-135m", choices=TRAIN_PRESETS)
    parser.add_argument("--lora-r", type=int, default=128, help="LoRA rank (alpha 2r, the recipe's dropout)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sample (16 image tokens + text)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=1)


def lora_bench(args):
    """Full stage 2 (llava-v1.5) and LoRA stage 2 (llava-v1.5-lora) of `bench.py train`, each in its own process so
    that each peak RSS is its own: trained parameters, optimizer state, peak memory, step time and their ratios."""
    import subprocess
    import sys
    results = {}
    for recipe, r in (("llava-v1.5", 0), ("llava-v1.5-lora", args.lora_r)):
        command = [sys.executable, __file__, "train", "--preset", args.preset, "--recipe", recipe, "--lora-r", str(r),
                   "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                   "--threads", str(args.threads), "--json"]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        print(out.rstrip())
        results[r] = json.loads(out.split("json: ", 1)[1])
    full, lora = results[0], results[args.lora_r]
    print(f"LoRA r={args.lora_r} / full: trained parameters {lora['trained'] / full['trained']:.4f}x, optimizer state "
          f"{lora['optimizer_bytes'] / full['optimizer_bytes']:.4f}x, step time {lora['step_s'] / full['step_s']:.2f}x "
          f"(medians); peak memory {full['memory']} -> {lora['memory']}")


# ---- generate ----
# Batched greedy generation (llama.generate_batch; LLaVA.generate_batch with --llava) against batch 1 (llama.generate,
# the streaming path) and transformers' batched generate with left padding: total new tokens/s, prefill included,
# on random weights with no EOS (every row runs --new-tokens steps). Prompt lengths are drawn from
# --min-prompt..--max-prompt, so a batch is padded. Then int8 weights (quantize.py) against fp32: batch-1 decode
# tokens/s and the bytes of the weights. `answer` times what evaluate.py runs: questions/s by batch size.

def generate_args(p):
    p.add_argument("--preset", default="smollm-135m", help="a LlamaConfig.from_name preset")
    p.add_argument("--llava", action="store_true", help="a LLaVA (the LLM --preset, the demo's vision tower), "
                   "half the prompts with an image; no transformers reference")
    p.add_argument("--tower", help="with --llava: a clip.py preset (vit-l-14-336: LLaVA-1.5's); default the demo's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batches", default="1,8,32", help="batch sizes; 1 runs llama.generate prompt by prompt")
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch1-prompts", type=int, default=4, help="prompts timed one by one for batch 1")
    p.add_argument("--repeats", type=int, default=3, help="medians over this many rounds (after a warm-up round)")
    p.add_argument("--no-reference", action="store_true", help="skip transformers even when installed")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 comparison")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)")


def _weight_bytes(model):
    """Bytes of the model's distinct tensors (parameters and buffers; a tied weight counted once)."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


@torch.inference_mode()
def _time_generate(model, prompts, new_tokens, device, batch_size):
    """Seconds for greedy generation of new_tokens per prompt, prefill included."""
    from llama import generate, generate_batch
    llm = getattr(model, "llm", model)
    _sync(device); start = time.perf_counter()
    if batch_size == 1:
        for prompt in prompts:
            llm.setup_cache(1, len(prompt[0]) + new_tokens)
            if llm is model:
                list(generate(model, prompt[0][None], max_new_tokens=new_tokens))
            else:
                list(model.generate(prompt[0][None], prompt[1], max_new_tokens=new_tokens))
    else:
        model.generate_batch(prompts, max_new_tokens=new_tokens) if llm is not model else \
            generate_batch(model, [p[0] for p in prompts], max_new_tokens=new_tokens)
    _sync(device)
    llm.reset_cache()
    return time.perf_counter() - start


@torch.inference_mode()
def _time_hf_generate(hf, prompts, new_tokens, device):
    """transformers' generate, left padding + attention mask, greedy, exactly new_tokens per row."""
    T = max(len(p[0]) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for b, (prompt, _) in enumerate(prompts):
        ids[b, T - len(prompt):], mask[b, T - len(prompt):] = prompt, 1
    _sync(device); start = time.perf_counter()
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      do_sample=False, pad_token_id=0)
    _sync(device)
    return time.perf_counter() - start, out[:, T:]


def run_generate(args):
    import copy

    from llama import Llama, LlamaConfig, generate_batch, llama_to_hf_keys
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = getattr(torch, args.dtype), args.device
    torch.manual_seed(0)
    config = LlamaConfig.from_name(args.preset)
    if args.llava:
        import demo
        from clip import CLIPVisionConfig
        from llava import IMAGE_TOKEN_INDEX, LLaVA, LLaVAConfig
        vision = CLIPVisionConfig.from_name(args.tower) if args.tower else CLIPVisionConfig(**demo.DEMO_CLIP)
        with torch.device(device):
            model = LLaVA(LLaVAConfig(llm=config, vision=vision)).to(dtype).eval()
        n_image = model.config.num_image_tokens
    else:
        with torch.device(device):  # a 7B shape: random init where it runs, not 27 GB on the host first
            model = Llama(config).to(dtype).eval()
    sizes = [int(b) for b in args.batches.split(",")]
    generator = torch.Generator().manual_seed(0)

    def prompts(n):  # (ids (T,), pixel_values or None); with --llava every other prompt starts with an image
        out = []
        for i in range(n):
            T = int(torch.randint(args.min_prompt, args.max_prompt + 1, (1,), generator=generator))
            ids = torch.randint(3, config.vocab_size, (T,), generator=generator)
            pixels = None
            if args.llava and i % 2 == 0:
                ids = torch.cat([ids[:1], torch.full((n_image,), IMAGE_TOKEN_INDEX), ids[1:]])
                size = model.config.image_size
                pixels = torch.randn(1, 3, size, size, generator=generator).to(device, dtype)
            out.append((ids.to(device), pixels))
        return out

    sets = {b: prompts(args.batch1_prompts if b == 1 else b) for b in sizes}
    name = "llava.py" if args.llava else "llama.py"
    runs = {f"{name} batch {b}": (b, lambda ps, n, b=b: _time_generate(model, ps, n, device, b)) for b in sizes}
    hf = None
    if not (args.no_reference or args.llava):
        try:
            import transformers
        except ImportError:
            print("transformers not installed: no reference")
        else:
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf())).to(device, dtype).eval()
            hf.load_state_dict(llama_to_hf_keys(model.state_dict()))  # identical weights
            hf.generation_config.eos_token_id = None  # random weights: every row runs new_tokens steps anyway
            runs.update({f"transformers {transformers.__version__} batch {b}":
                         (b, lambda ps, n: _time_hf_generate(hf, ps, n, device)[0]) for b in sizes if b > 1})
    times = {name: [] for name in runs}
    for name, (b, run) in runs.items():  # warm-up: two prompts, two tokens
        run(sets[b][:2], 2)
    for repeat in range(args.repeats):
        for name, (b, run) in list(runs.items())[::1 if repeat % 2 == 0 else -1]:  # interleaved, order alternating
            times[name].append(run(sets[b], args.new_tokens))
    n_params = sum(p.numel() for p in model.parameters())
    tower = f" LLaVA ({args.tower or 'demo'} tower)" if args.llava else ""
    print(f"generate {args.preset}{tower}: {n_params / 1e6:.1f}M params, "
          f"{device} {args.dtype}, {torch.get_num_threads()} threads, prompts {args.min_prompt}-{args.max_prompt} "
          f"tokens, {args.new_tokens} new tokens per row, median of {args.repeats}, torch {torch.__version__}")
    rates, per_round = {}, {}  # per_round: the rate in each round (runs of one round are adjacent in time)
    for name, t in times.items():
        n = len(sets[runs[name][0]])
        rates[name] = n * args.new_tokens / statistics.median(t)
        per_round[name] = [n * args.new_tokens / s for s in t]
        first = next(iter(runs))
        paired = statistics.median(r / r1 for r, r1 in zip(per_round[name], per_round[first]))
        print(f"  {name:30s} {rates[name]:8.1f} new tokens/s   {rates[name] / rates[first]:5.2f}x batch 1 "
              f"({paired:.2f}x median of rounds)   (median {statistics.median(t):.2f} s for {n} x "
              f"{args.new_tokens}; runs {' '.join(f'{s:.2f}' for s in t)})")
    if args.llava:  # batch 1, one image: the tower, the projector and the prefill before the first token
        ids, pixels = next(prompt for prompt in sets[sizes[0]] if prompt[1] is not None)
        ttft = []
        for _ in range(args.repeats + 1):  # the first: warm-up
            model.llm.setup_cache(1, len(ids) + 1, device=device, dtype=dtype)
            _sync(device); start = time.perf_counter()
            next(model.generate(ids[None], pixels, max_new_tokens=1))
            _sync(device); ttft.append(time.perf_counter() - start)
        model.llm.reset_cache()
        print(f"  time to first token, batch 1, one {model.config.vision.image_size} px image ({n_image} tokens) + "
              f"{len(ids) - n_image} text tokens: {statistics.median(ttft[1:]) * 1e3:.1f} ms (median)")
    if hf is not None:
        for b in [b for b in sizes if b > 1]:
            ours = generate_batch(model, [p for p, _ in sets[b]], max_new_tokens=args.new_tokens)
            theirs = _time_hf_generate(hf, sets[b], args.new_tokens, device)[1].tolist()
            same = sum(o == t for o, t in zip(ours, theirs))
            ours_name, ref_name = f"llama.py batch {b}", f"transformers {transformers.__version__} batch {b}"
            paired = statistics.median(o / r for o, r in zip(per_round[ours_name], per_round[ref_name]))
            print(f"  batch {b}: llama.py / transformers {rates[ours_name] / rates[ref_name]:.2f}x "
                  f"({paired:.2f}x median of rounds); greedy rows identical {same}/{b}")
        model.reset_cache()
    if args.no_int8:
        return
    from quantize import quantize_int8
    llm = getattr(model, "llm", model)
    quantized = quantize_int8(copy.deepcopy(llm))
    prompt = sets[sizes[0]][0][0][None].clamp(min=0)  # (1, T): token ids only
    decode = {"fp32" if dtype == torch.float32 else args.dtype: llm, "int8": quantized}
    times = {name: [] for name in decode}
    for repeat in range(args.repeats + 1):
        for name, m in decode.items():
            t = _time_llama(m, prompt, args.new_tokens if repeat else 2, device)
            if repeat:
                times[name].append(t[1])
    (n0, t0), (n1, t1) = ((name, statistics.median(t)) for name, t in times.items())
    b0, b1 = _weight_bytes(llm), _weight_bytes(quantized)
    print(f"  batch-1 decode {n0} {args.new_tokens / t0:.1f} tok/s, int8 {args.new_tokens / t1:.1f} tok/s: "
          f"{t0 / t1:.2f}x; weights {b0 / 2**20:.0f} MiB -> {b1 / 2**20:.0f} MiB: {b1 / b0:.2f}x "
          f"(the LLM's distinct tensors: embeddings, blocks, head)")


def quality_args(p):
    p.add_argument("--model", required=True, help="a pretrained LLaMA-architecture folder (HF layout)")
    p.add_argument("--text", nargs="+", required=True, help="plain-text files: ordinary text to predict")
    p.add_argument("--positions", type=int, default=2048, help="positions per file, in windows of --window")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--decode", action="store_true", help="also one token at a time (the CPU int8 kernel's path)")
    p.add_argument("--threads", type=int)


@torch.inference_mode()
def run_quality(args):
    """Next-token predictions of bf16 and int8 copies against the fp32 model on the same text: top-1 agreement (all
    positions, and those where fp32's best token leads its second by > 0.5), the largest logit difference, the
    perplexity. Tokenized with tokenizer.model (sentencepiece) or, for BPE-only folders, transformers if installed."""
    import copy
    import os

    import torch.nn.functional as F

    from llama import Llama, Tokenizer
    from quantize import quantize_int8
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.path.exists(os.path.join(args.model, "tokenizer.model")):
        encode = Tokenizer(args.model).encode
    else:
        from transformers import AutoTokenizer
        encode = AutoTokenizer.from_pretrained(args.model).encode
    windows = []
    for file in args.text:
        ids = encode(" ".join(open(file, encoding="utf-8").read().split()))[:args.positions]
        windows += [torch.tensor([ids[i:i + args.window]]) for i in range(0, len(ids), args.window)]
    fp32 = Llama.from_pretrained(args.model).eval()
    variants = {"bf16": lambda: copy.deepcopy(fp32).to(torch.bfloat16),
                "int8 (default: embeddings, blocks, head)": lambda: quantize_int8(copy.deepcopy(fp32)),
                "int8, head and table float": lambda: quantize_int8(copy.deepcopy(fp32),
                                                                    skip=("lm_head", "embed_tokens"))}
    refs = [fp32(w)[0].float() for w in windows]  # (T, V) each

    def decode(model, ids):  # one position at a time through the KV cache: the path chat and generate take
        model.setup_cache(1, ids.shape[1])
        out = [model(ids[:, i:i + 1], input_pos=torch.tensor([i]))[0, -1].float() for i in range(ids.shape[1])]
        model.reset_cache()
        return torch.stack(out)  # (T, V)

    n = sum(r.shape[0] for r in refs)
    nll = sum(F.cross_entropy(r[:-1], w[0, 1:], reduction="sum") for r, w in zip(refs, windows))
    print(f"quality {args.model}: {n} positions of {', '.join(args.text)}; fp32 perplexity "
          f"{(nll / (n - len(windows))).exp():.2f}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, make in variants.items():
        model = make()
        for path, run in [("full forward", lambda w: model(w)[0].float()), ("decode", lambda w: decode(model, w))]:
            if path == "decode" and not args.decode:
                continue
            agree = clear = agree_clear = 0
            diff, nll = 0.0, 0.0
            for w, r in zip(windows, refs):
                logits = run(w)
                same = logits.argmax(-1) == r.argmax(-1)
                top2 = r.topk(2, -1).values
                margin = top2[:, 0] - top2[:, 1] > 0.5
                agree, clear, agree_clear = agree + int(same.sum()), clear + int(margin.sum()), \
                    agree_clear + int(same[margin].sum())
                diff = max(diff, float((logits - r).abs().max()))
                nll += float(F.cross_entropy(logits[:-1], w[0, 1:], reduction="sum"))
            print(f"  {name:42s} {path:12s} top-1 agreement {100 * agree / n:5.1f}% (margin > 0.5: "
                  f"{100 * agree_clear / max(clear, 1):5.1f}% of {clear})  max |logit diff| {diff:5.2f}  "
                  f"perplexity {math.exp(nll / (n - len(windows))):6.2f}")


def answer_args(p):
    p.add_argument("--model", default="runs/demo/stage2", help="checkpoint folder (with tokenizer.model)")
    p.add_argument("--data", default="runs/demo/data", help="the demo's data folder (eval.json, images/)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--max-new-tokens", type=int, default=16, help="evaluate.py demo's default")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int)


def run_answer(args):
    """Questions/s of inference.answer_batches (evaluate.py's answering) by batch size, model load excluded."""
    import inference
    from demo import demo_items
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = inference.load_model(args.model, "cpu", "float32")
    items = demo_items(args.data, args.limit)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    times, replies = {b: [] for b in sizes}, {}
    for repeat in range(args.repeats + 1):
        for b in sizes[::1 if repeat % 2 else -1]:
            start = time.perf_counter()
            out = [r for batch in inference.answer_batches(model, tokenizer, items if repeat else items[:8],
                                                           args.max_new_tokens, b) for _, r in batch]
            if repeat:
                times[b].append(time.perf_counter() - start)
                replies[b] = sorted(out)
    print(f"answer {args.model}: {len(items)} demo questions, max {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    base = len(items) / statistics.median(times[sizes[0]])
    for b in sizes:
        rate = len(items) / statistics.median(times[b])
        print(f"  batch {b:3d}: {rate:7.1f} questions/s  {rate / base:5.2f}x   same answers as batch {sizes[0]}: "
              f"{replies[b] == replies[sizes[0]]}")


BENCHES = [
    ("llama", add_llama_args, run_llama),
    ("clip", clip_args, clip_run),
    ("train", train_args, train_bench),
    ("scale", scale_args, scale_bench),
    ("lora", lora_args, lora_bench),
    ("generate", generate_args, run_generate),
    ("answer", answer_args, run_answer),
    ("quality", quality_args, run_quality),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name, add_args, run in BENCHES:
        add_args(sub.add_parser(name))
    args = parser.parse_args()
    dict((name, run) for name, _, run in BENCHES)[args.what](args)


if __name__ == "__main__":
    main()
