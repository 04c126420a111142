"""Inference speed benches of bench.py, on random weights: the model files' prefill, decode and tower against
transformers on identical weights (llama, clip), the engine's batched generation and int8 decode (generate), and
LLaVA-1.6's time to first token against transformers' LlavaNext (anyres). bench_eval.py has the benches that read a
real checkpoint (answer, quality)."""
import copy
import inspect
import json
import math
import statistics
import time
from dataclasses import replace

import torch

from clip import CLIPVisionConfig, CLIPVisionTower, anyres_grid, preprocess_anyres, tower_to_clip_keys
from demo import DEMO_CLIP
from inference import DTYPES, generate_batch, generate_llava
from llama import Llama, LlamaConfig, generate, llama_to_hf_keys
from llava import IMAGE_TOKEN_INDEX, LLaVA, LLaVAConfig
from quantize import quantize_int8


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _reference(args):
    """transformers, or None with --no-reference or when it is not installed."""
    if args.no_reference:
        return None
    try:
        import transformers
    except ImportError:
        print("transformers not installed: no reference")
        return None
    return transformers


# -------------------------------------------------------------------------------------------------------- llama

def add_llama_args(parser):
    parser.add_argument("--preset", default="smollm-135m", help="a LlamaConfig.from_name preset")
    parser.add_argument("--config", help="a HF config.json (overrides --preset)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--prompt-len", type=int, default=128, help="prefill length (batch 1)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="medians over this many runs of each model")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers even when installed")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


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


def _hf_llama(model, transformers, device, dtype):
    """transformers' LlamaForCausalLM with `model`'s weights."""
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf())).to(device, dtype).eval()
    hf.load_state_dict(llama_to_hf_keys(model.state_dict()))
    return hf


def bench_llama(args):
    """Prefill and decode tokens/s of llama.py, batch 1, against transformers."""
    if args.config:
        with open(args.config) as f:
            config = LlamaConfig.from_hf(json.load(f))
    else:
        config = LlamaConfig.from_name(args.preset)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = Llama(config).to(args.device, dtype).eval()
    models = {"llama.py": (model, _time_llama)}
    transformers = _reference(args)
    if transformers:
        models[f"transformers {transformers.__version__}"] = (_hf_llama(model, transformers, args.device, dtype),
                                                              _time_hf)
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


# --------------------------------------------------------------------------------------------------------- clip

def add_clip_args(parser):
    parser.add_argument("--preset", default="vit-l-14", help="clip.py preset: tiny, vit-l-14, vit-l-14-336")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--select-layer", type=int, default=-2,
                        help="-2: LLaVA's features; -1: every layer (like for like)")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per model (median reported)")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers even when installed")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 is steadier on a shared machine)")


def _clip_flops_per_image(config, layers):
    # matmul FLOPs: patch conv, q/k/v/out + MLP per token, and the two T x T attention products per layer
    T, C, I = config.num_patches + 1, config.hidden_size, config.intermediate_size
    conv = 2 * config.num_patches * C * config.num_channels * config.patch_size ** 2
    return conv + layers * (2 * T * (4 * C * C + 2 * C * I) + 4 * T * T * C)


def bench_clip(args):
    """Images/s of the CLIP tower against transformers' CLIPVisionModel, which runs every layer."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = CLIPVisionConfig.from_name(args.preset)
    ours = CLIPVisionTower(config).to(device, dtype).eval()  # random weights: speed does not depend on them
    x = torch.randn(args.batch, 3, config.image_size, config.image_size, device=device, dtype=dtype)
    runs = {"clip.py": lambda: ours(x, select_layer=args.select_layer)}
    if args.select_layer != -1:  # like for like with transformers, which always runs every layer
        runs["clip.py all layers"] = lambda: ours(x, select_layer=-1)
    transformers = _reference(args)
    if transformers:
        hf_config = transformers.CLIPVisionConfig(**{k: v for k, v in config.to_hf().items() if k != "architectures"})
        hf = transformers.CLIPVisionModel(hf_config).to(device, dtype).eval()
        state = ours.state_dict()  # transformers 5 names == tower names; transformers 4 adds "vision_model."
        hf.load_state_dict(state if "pre_layrnorm.weight" in hf.state_dict() else tower_to_clip_keys(state))
        # what LLaVA runs: every layer, output_hidden_states, then pick the layer and drop CLS
        runs["transformers"] = lambda: hf(x, output_hidden_states=True).hidden_states[args.select_layer][:, 1:]
    times = {name: [] for name in runs}
    with torch.inference_mode():
        outputs = {name: run() for name, run in runs.items()}  # warm-up, and a check that both agree
        if "transformers" in outputs:
            diff = (outputs["clip.py"].float() - outputs["transformers"].float()).abs().max().item()
            print(f"max |clip.py - transformers| = {diff:.2e}")
        for i in range(args.repeats):  # interleaved, order alternating, so that outside load hits all alike
            for name in list(runs)[::1 if i % 2 == 0 else -1]:
                _sync(device)
                start = time.perf_counter()
                runs[name]()
                _sync(device)
                times[name].append(time.perf_counter() - start)
    layers = config.num_hidden_layers + 1 + args.select_layer if args.select_layer < 0 else args.select_layer
    print(f"clip {args.preset} batch {args.batch} {device} {args.dtype} select_layer {args.select_layer} "
          f"torch {torch.__version__} threads {torch.get_num_threads()}")
    for name, t in times.items():
        seconds = statistics.median(t)
        depth = layers if name == "clip.py" else config.num_hidden_layers
        tflops = _clip_flops_per_image(config, depth) * args.batch / seconds / 1e12
        print(f"  {name:18s} {args.batch / seconds:8.2f} images/s  (median {seconds * 1e3:.1f} ms/batch, "
              f"{tflops:.3f} TFLOP/s; all runs ms: {' '.join(f'{s * 1e3:.0f}' for s in t)})")
    for name in [n for n in times if n.startswith("clip.py")] if "transformers" in times else []:
        ratio = statistics.median(times["transformers"]) / statistics.median(times[name])
        # the same repeat's runs are adjacent in time, so their ratio is the one least moved by outside load
        paired = statistics.median(h / o for h, o in zip(times["transformers"], times[name]))
        print(f"  speed ratio {name} / transformers: {ratio:.2f}x of medians, {paired:.2f}x median of pairs")


# ----------------------------------------------------------------------------------------------------- generate
# inference.generate_batch (with --llava on model.embed's embeddings) against batch 1 (llama.generate, the streaming
# path; inference.generate_llava with --llava) and transformers' batched generate with left padding: total new
# tokens/s, prefill included, on random weights with no EOS (every row runs --new-tokens steps). Prompt lengths are
# drawn from --min-prompt..--max-prompt, so a batch is padded. Then int8 weights (quantize.py) against fp32: batch-1
# decode tokens/s and the bytes of the weights.

def add_generate_args(parser):
    parser.add_argument("--preset", default="smollm-135m", help="a LlamaConfig.from_name preset")
    parser.add_argument("--llava", action="store_true", help="a LLaVA (the LLM --preset, the demo's vision tower), "
                        "half the prompts with an image; no transformers reference")
    parser.add_argument("--tower", help="with --llava: a clip.py preset (vit-l-14-336: LLaVA-1.5's); default the "
                        "demo's")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--batches", default="1,8,32", help="batch sizes; 1 runs llama.generate prompt by prompt")
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch1-prompts", type=int, default=4, help="prompts timed one by one for batch 1")
    parser.add_argument("--repeats", type=int, default=3, help="medians over this many rounds (after a warm-up round)")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers even when installed")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 comparison")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)")


def _weight_bytes(model):
    """Bytes of the model's distinct tensors (parameters and buffers; a tied weight counted once)."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


@torch.inference_mode()
def _time_generate(model, prompts, new_tokens, device, batch_size):
    """Seconds for greedy generation of new_tokens per prompt (ids (T,), pixel_values or None), prefill included
    (and for a LLaVA the tower and projector)."""
    llava = isinstance(model, LLaVA)
    llm = model.llm if llava else model
    _sync(device); start = time.perf_counter()
    if batch_size == 1:
        for ids, pixels in prompts:
            llm.setup_cache(1, len(ids) + new_tokens)
            list(generate_llava(model, ids[None], pixels, max_new_tokens=new_tokens) if llava
                 else generate(model, ids[None], max_new_tokens=new_tokens))
    else:
        rows = [model.embed(ids[None], pixels)[0] if llava else ids for ids, pixels in prompts]  # (T, D) or (T,)
        generate_batch(llm, rows, max_new_tokens=new_tokens)
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


def _generate_prompts(n, args, vocab_size, llava_config, generator):
    """n prompts (ids (T,), pixel_values (1, 3, S, S) or None); with --llava every other one starts with an image."""
    out = []
    for i in range(n):
        T = int(torch.randint(args.min_prompt, args.max_prompt + 1, (1,), generator=generator))
        ids = torch.randint(3, vocab_size, (T,), generator=generator)
        pixels = None
        if llava_config and i % 2 == 0:
            ids = torch.cat([ids[:1], torch.full((llava_config.num_image_tokens,), IMAGE_TOKEN_INDEX), ids[1:]])
            size = llava_config.image_size
            pixels = torch.randn(1, 3, size, size, generator=generator).to(args.device, getattr(torch, args.dtype))
        out.append((ids.to(args.device), pixels))
    return out


def bench_generate(args):
    """New tokens/s of batched greedy generation by batch size, against batch 1 and transformers; int8 decode."""
    dtype, device = getattr(torch, args.dtype), args.device
    torch.manual_seed(0)
    config = LlamaConfig.from_name(args.preset)
    with torch.device(device):  # a 7B shape: random init where it runs, not 27 GB on the host first
        if args.llava:
            vision = CLIPVisionConfig.from_name(args.tower) if args.tower else CLIPVisionConfig(**DEMO_CLIP)
            model = LLaVA(LLaVAConfig(llm=config, vision=vision)).to(dtype).eval()
        else:
            model = Llama(config).to(dtype).eval()
    sizes = [int(b) for b in args.batches.split(",")]
    generator = torch.Generator().manual_seed(0)
    sets = {b: _generate_prompts(args.batch1_prompts if b == 1 else b, args, config.vocab_size,
                                 model.config if args.llava else None, generator) for b in sizes}
    name = "llava.py" if args.llava else "llama.py"
    runs = {f"{name} batch {b}": (b, lambda ps, n, b=b: _time_generate(model, ps, n, device, b)) for b in sizes}
    transformers = None if args.llava else _reference(args)
    if transformers:
        hf = _hf_llama(model, transformers, device, dtype)
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
            next(generate_llava(model, ids[None], pixels, max_new_tokens=1))
            _sync(device); ttft.append(time.perf_counter() - start)
        model.llm.reset_cache()
        n_image = model.config.num_image_tokens
        print(f"  time to first token, batch 1, one {model.config.vision.image_size} px image ({n_image} tokens) + "
              f"{len(ids) - n_image} text tokens: {statistics.median(ttft[1:]) * 1e3:.1f} ms (median)")
    if transformers:
        for b in [b for b in sizes if b > 1]:
            ours = generate_batch(model, [p for p, _ in sets[b]], max_new_tokens=args.new_tokens)
            theirs = _time_hf_generate(hf, sets[b], args.new_tokens, device)[1].tolist()
            same = sum(o == t for o, t in zip(ours, theirs))
            ours_name, ref_name = f"llama.py batch {b}", f"transformers {transformers.__version__} batch {b}"
            paired = statistics.median(o / r for o, r in zip(per_round[ours_name], per_round[ref_name]))
            print(f"  batch {b}: llama.py / transformers {rates[ours_name] / rates[ref_name]:.2f}x "
                  f"({paired:.2f}x median of rounds); greedy rows identical {same}/{b}")
        model.reset_cache()
    if not args.no_int8:
        prompt = sets[sizes[0]][0][0][None].clamp(min=0)  # (1, T): token ids only
        _time_int8_decode(model.llm if args.llava else model, prompt, args)


def _time_int8_decode(llm, prompt, args):
    """Batch-1 decode tokens/s and weight bytes of an int8 copy (quantize.py) against the model as it is."""
    quantized = quantize_int8(copy.deepcopy(llm))
    decode = {"fp32" if args.dtype == "float32" else args.dtype: llm, "int8": quantized}
    times = {name: [] for name in decode}
    for repeat in range(args.repeats + 1):
        for name, m in decode.items():
            t = _time_llama(m, prompt, args.new_tokens if repeat else 2, args.device)
            if repeat:
                times[name].append(t[1])
    (n0, t0), (n1, t1) = ((name, statistics.median(t)) for name, t in times.items())
    b0, b1 = _weight_bytes(llm), _weight_bytes(quantized)
    print(f"  batch-1 decode {n0} {args.new_tokens / t0:.1f} tok/s, int8 {args.new_tokens / t1:.1f} tok/s: "
          f"{t0 / t1:.2f}x; weights {b0 / 2**20:.0f} MiB -> {b1 / 2**20:.0f} MiB: {b1 / b0:.2f}x "
          f"(the LLM's distinct tensors: embeddings, blocks, head)")


# ------------------------------------------------------------------------------------------------------- anyres
# Time to first token of one LLaVA-1.6 ("anyres") image: preprocessing (clip.preprocess_anyres against transformers'
# LlavaNextImageProcessor), the tower over the overview and the tiles, the projector and the spatial_unpad merge,
# then the prefill of the whole prompt to the first greedy token; ours against LlavaNextForConditionalGeneration
# loaded from the folder formats.export_hf writes of the same random weights. --hidden/--layers shrink the LLM so
# the run fits a CPU; the tower is full size (the most work at 672 px: 5 tower passes for 2,928 image tokens).

LLAVA_16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # (width, height), 336 px tower


def add_anyres_args(parser):
    parser.add_argument("--preset", default="vicuna-7b", help="the LLM's LlamaConfig.from_name preset")
    parser.add_argument("--hidden", type=int, help="LLM hidden size instead of the preset's (heads of 128, "
                        "intermediate scaled alike): a LLaMA-shaped LLM small enough for a CPU")
    parser.add_argument("--layers", type=int, help="LLM layers instead of the preset's")
    parser.add_argument("--tower", default="vit-l-14-336", help="clip.py preset (LLaVA-1.6's: vit-l-14-336)")
    parser.add_argument("--image", default="672x672", help="WIDTHxHEIGHT of the (random) image")
    parser.add_argument("--text-tokens", type=int, default=40, help="text tokens around the image")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--repeats", type=int, default=3, help="medians over this many runs (after a warm-up)")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers even when installed")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def _anyres_model(args, dtype):
    """Our LLaVA-1.6-shaped model on random weights (the LLM shrunk by --hidden/--layers)."""
    llm = LlamaConfig.from_name(args.preset)
    if args.hidden:
        scale = args.hidden / llm.hidden_size
        llm = replace(llm, hidden_size=args.hidden, num_attention_heads=args.hidden // 128,
                      num_key_value_heads=max(1, round(llm.num_key_value_heads * scale)),
                      intermediate_size=round(llm.intermediate_size * scale / 16) * 16)
    if args.layers:
        llm = replace(llm, num_hidden_layers=args.layers)
    config = LLaVAConfig(llm=llm, vision=CLIPVisionConfig.from_name(args.tower), image_aspect_ratio="anyres",
                         image_grid_pinpoints=LLAVA_16_PINPOINTS, patch_merge_type="spatial_unpad")
    torch.manual_seed(0)
    with torch.device(args.device):  # a 7B shape: random init where it runs
        return LLaVA(config).to(dtype).eval()


@torch.inference_mode()
def _ttft_ours(model, image, ids, device):
    """(first token, seconds: preprocessing, tower + projector + merge, prefill to the first token): what
    inference.generate_llava does, phase by phase."""
    c, phases = model.config, []
    _sync(device); start = time.perf_counter()
    pixels = preprocess_anyres(image, c.image_size, c.image_grid_pinpoints).to(device, model.llm.norm.weight.dtype)
    _sync(device); phases.append(time.perf_counter())
    embeds = model.embed(ids, pixels, [image.size])  # (1, T, D)
    _sync(device); phases.append(time.perf_counter())
    model.llm.setup_cache(1, ids.shape[1] + 1)
    token = next(generate(model.llm, inputs_embeds=embeds, max_new_tokens=1))
    _sync(device); phases.append(time.perf_counter())
    model.llm.reset_cache()
    return token, [b - a for a, b in zip([start] + phases, phases)]


@torch.inference_mode()
def _ttft_hf(hf, processor, image, ids, device):
    """(first token, seconds: preprocessing, the model's forward to the first token), transformers' way: the image
    processor, then one forward with a cache and the last position's logits (what generate's prefill does)."""
    _sync(device); start = time.perf_counter()
    inputs = processor(images=image, return_tensors="pt")  # pixel_values (1, 1 + tiles, 3, S, S), image_sizes (h, w)
    pixels = inputs["pixel_values"].to(device, hf.dtype)
    _sync(device); middle = time.perf_counter()
    out = hf(input_ids=ids, pixel_values=pixels, image_sizes=inputs["image_sizes"].to(device), use_cache=True,
             logits_to_keep=1)
    token = int(out.logits[0, -1].argmax())
    _sync(device); end = time.perf_counter()
    return token, [middle - start, end - middle]


def bench_anyres(args):
    """Time to first token of one anyres image (LLaVA-1.6), against LlavaNextForConditionalGeneration."""
    import tempfile

    import numpy as np
    from PIL import Image

    import formats
    dtype, device = getattr(torch, args.dtype), args.device
    model = _anyres_model(args, dtype)
    c = model.config
    width, height = (int(x) for x in args.image.split("x"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    n_image = c.image_tokens(image.size)
    text = torch.randint(3, c.llm.vocab_size, (args.text_tokens,), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([text[:5], torch.full((n_image,), IMAGE_TOKEN_INDEX), text[5:]])[None].to(device)  # (1, T)
    runs = {"llava.py": lambda: _ttft_ours(model, image, ids, device)}
    transformers, folder = _reference(args), tempfile.TemporaryDirectory()
    if transformers:
        formats.export_hf(model, folder.name)  # the llava-hf folder transformers loads alone
        hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(folder.name, dtype=dtype).to(device).eval()
        # without torchvision, transformers 5 uses the PIL processor (LlavaNextImageProcessorPil) anyway
        processor = (getattr(transformers, "LlavaNextImageProcessorPil", None) or
                     transformers.LlavaNextImageProcessor).from_pretrained(folder.name)
        hf_ids = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, hf.config.image_token_index)
        runs[f"transformers {transformers.__version__}"] = lambda: _ttft_hf(hf, processor, image, hf_ids, device)
    times, cpu, tokens = {name: [] for name in runs}, {name: [] for name in runs}, {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is dropped; order alternating
        for name, run in list(runs.items())[::1 if repeat % 2 == 0 else -1]:
            start = time.process_time()  # CPU seconds of all threads: less moved than wall time by other jobs
            tokens[name], phases = run()
            if repeat:
                times[name].append(phases)
                cpu[name].append(time.process_time() - start)
    folder.cleanup()
    n_params = sum(p.numel() for p in model.llm.parameters())
    print(f"anyres time to first token: {args.tower} tower + {n_params / 1e6:.0f}M-parameter LLM "
          f"({c.llm.num_hidden_layers} layers, hidden {c.llm.hidden_size}), a {width}x{height} image: "
          f"{1 + math.prod(anyres_grid(image.size, c.image_grid_pinpoints, c.image_size))} tower passes, "
          f"{n_image} image + {args.text_tokens} text tokens; {device} {args.dtype}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, median of {args.repeats}")
    labels = {"llava.py": ("preprocess", "tower+projector+merge", "prefill"), "hf": ("preprocess", "model")}
    totals = {}
    for name, runs_ in times.items():
        totals[name] = [sum(p) for p in runs_]
        parts = "  ".join(f"{label} {statistics.median(p[k] for p in runs_):.2f} s"
                          for k, label in enumerate(labels["llava.py" if name == "llava.py" else "hf"]))
        print(f"  {name:24s} {statistics.median(totals[name]):7.2f} s  ({parts}; runs "
              f"{' '.join(f'{t:.2f}' for t in totals[name])}; process CPU time {statistics.median(cpu[name]):.2f} s)")
    if len(totals) == 2:
        (ours, t_ours), (ref, t_ref) = totals.items()
        paired = statistics.median(r / o for o, r in zip(t_ours, t_ref))
        c_ours, c_ref = (statistics.median(cpu[name]) for name in (ours, ref))
        print(f"  speed ratio {ours} / transformers: {statistics.median(t_ref) / statistics.median(t_ours):.2f}x "
              f"of medians, {paired:.2f}x median of pairs, {c_ref / c_ours:.2f}x of CPU times; first tokens "
              f"{tokens[ours]} and {tokens[ref]}: {'equal' if tokens[ours] == tokens[ref] else 'DIFFERENT'}")
