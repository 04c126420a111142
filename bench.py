"""Speed and memory of the model files, side by side with the Hugging Face reference when it is installed.

    python bench.py llama --preset smollm-135m          # prefill and decode tokens/s
    python bench.py clip --preset vit-l-14 --batch 8    # tower images/s
    python bench.py train --preset tiny                 # training-step tokens/s and peak memory
    python bench.py lora --preset smollm-135m           # LoRA vs full stage 2: trained params, optimizer, memory, time

Figures go to BENCHMARKS.md with the machine, the command and the date.
"""
import argparse

# ---- llama ----
import inspect
import json
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
    parser.add_argument("--peak-tflops", type=float, help="accelerator peak: prints MFU (default: known cards)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--lora-r", type=int, help="LoRA rank (default: the recipe's lora_r; 0: full tuning)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line (bench lora)")


def train_bench(args):
    import resource
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
    model = train.parallelize(model, device, args.grad_checkpointing)
    optimizer = train.make_optimizer(model, config)
    trained = [p for p in model.parameters() if p.requires_grad]
    P, T, B = model.config.num_image_tokens, args.seq_len, args.batch
    micro = args.micro_batch or B
    if T <= P + 1:
        raise SystemExit(f"--seq-len {T} must exceed the {P} image tokens + BOS")
    if B % micro:
        raise SystemExit(f"--batch {B} must be a multiple of --micro-batch {micro}")
    input_ids = torch.randint(3, llm.vocab_size, (B, T), device=device)  # (B, T)
    input_ids[:, 0], input_ids[:, 1:P + 1] = llm.bos_token_id, -200
    labels = input_ids.masked_fill(input_ids == -200, -100)  # (B, T)
    pixel_values = torch.randn(B, 3, vision.image_size, vision.image_size, device=device)  # (B, 3, S, S)
    micro_batches = [{"input_ids": input_ids[i:i + micro], "labels": labels[i:i + micro],
                      "pixel_values": pixel_values[i:i + micro]} for i in range(0, B, micro)]
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps + 2):
        _sync(device); start = time.perf_counter()
        train.train_step(model, optimizer, micro_batches, config.lr, config.grad_clip, device)  # the loop's step
        _sync(device)
        times.append(time.perf_counter() - start)
    dt = statistics.median(times[2:])
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in train.PEAK_TFLOPS.items() if cuda and k in name), None)
    achieved = flops(B * T, B, T) / dt
    memory = (f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else
              f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print(f"train {args.preset} stage {args.stage} ({args.recipe} optimizer) on {name}: batch {B} x {T} tokens "
          f"({P} image tokens) in micro-batches of {micro}, "
          f"grad checkpointing {'on' if args.grad_checkpointing else 'off'}, "
          f"{sum(p.numel() for p in trained) / 1e6:.1f}M of {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters trained")
    print(f"  {dt * 1e3:.1f} ms/step (median of {args.steps}), {B * T / dt:,.0f} tokens/s, "
          f"{achieved / 1e12:.3g} TFLOP/s{f', MFU {100 * achieved / (peak * 1e12):.1f}%' if peak else ''}, {memory}")
    optimizer_bytes = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                          if torch.is_tensor(v))
    print(f"  lora_r {config.lora_r}, optimizer state {optimizer_bytes / 2**20:,.1f} MiB")
    if args.json:
        print("json: " + json.dumps({"lora_r": config.lora_r, "trained": sum(p.numel() for p in trained),
                                     "params": sum(p.numel() for p in model.parameters()), "step_s": dt,
                                     "all_steps_s": times, "optimizer_bytes": optimizer_bytes, "memory": memory}))


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


BENCHES = [
    ("llama", add_llama_args, run_llama),
    ("clip", clip_args, clip_run),
    ("train", train_args, train_bench),
    ("lora", lora_args, lora_bench),
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
