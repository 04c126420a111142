"""train.py's command line: flags for paths and actions, `--set key=value` typed by the config dataclass's fields,
and the checks that stop bad input before anything trains. Errors are exceptions that name the flag or the key;
train.main turns them into one message and an exit code."""
import argparse
import json
import math
import os
from dataclasses import fields

import formats

PATH_FIELDS = ("model", "vision_tower", "projector", "data", "image_folder", "tokenizer", "out", "resume")
FLAGGED = ("recipe", "stage", "demo", *PATH_FIELDS)  # set by flags (or the demo), never by --set
FRESH_PROJECTOR = "scratch"  # --projector value: stage 2 from a base LLM with a new projector, no stage 1
KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "text",
         list | None: "a JSON list (e.g. [[64,128],[128,64]]) or null"}
BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def make_parser(description, recipes):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    listed = ", ".join(f"{name} (stage {' and '.join(map(str, stages))})" for name, stages in recipes.items())
    p.add_argument("--recipe", choices=recipes, metavar="NAME",
                   help=f"named values (default: demo; required with --data/--model): {listed}")
    p.add_argument("--stage", type=int, choices=(1, 2), help="1 or 2; left out: the whole demo, stage 1 then 2")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override TrainConfig fields, e.g. --set lr=1e-4 micro_batch_size=8 (see --dry-run)")
    p.add_argument("--model", help="base LLM directory (HF LLaMA/Vicuna), or a LLaVA checkpoint to go on from")
    p.add_argument("--vision-tower", help="CLIP directory (HF layout); not needed with a LLaVA checkpoint")
    p.add_argument("--projector", help="stage-1 output directory; required in stage 2 from a base LLM, where "
                   f"'{FRESH_PROJECTOR}' trains a fresh one instead (the paper's Table 8 ablation)")
    p.add_argument("--data", help="LLaVA JSON: a list of {id, image, conversations}")
    p.add_argument("--image-folder", help="folder the image paths in --data are relative to")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one in --model)")
    p.add_argument("--out", help="output directory (default runs/stage<N>; demo: <demo_dir>/stage<N>)")
    p.add_argument("--resume", nargs="?", const="latest", help="a training state directory (default: the latest)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as one JSON object and exit")
    return p


def is_demo(args) -> bool:
    """Whether the flags ask for the built-in demo (no data and model paths); refuses the combinations that mix."""
    demo = args.data is None and args.model is None and args.recipe in (None, "demo")
    if args.stage is None and (not demo or args.out or args.resume or args.projector or args.dry_run):
        raise ValueError("--stage 1 or --stage 2 is required with --data, --model, --out, --resume, --projector or "
                         "--dry-run")
    if not demo and args.recipe is None:
        raise ValueError("--recipe is required with --data/--model")
    if not demo and not args.dry_run and (args.data is None or args.model is None):
        raise ValueError("give both --data and --model, or neither (and no --recipe but demo) to run the built-in demo")
    return demo


def apply_sets(config, items, choices) -> None:
    """Each KEY=VALUE of `items` in order onto the dataclass `config`, VALUE read as the field's type."""
    kinds = {f.name: f.type for f in fields(config) if f.name not in FLAGGED}
    for item in items:
        key, sep, text = item.partition("=")
        if key in FLAGGED:
            raise ValueError(f"--set {item}: give {key} with its flag, --{key.replace('_', '-')}")
        if not sep or key not in kinds:
            raise ValueError(f"--set {item}: expected KEY=VALUE with KEY one of {', '.join(kinds)}")
        try:
            value = BOOLS[text.lower()] if kinds[key] is bool else json.loads(text) if kinds[key] == list | None \
                else kinds[key](text)
        except (KeyError, ValueError):
            raise ValueError(f"--set {item}: {key} must be {KINDS[kinds[key]]}, not {text!r}") from None
        if key in choices and value not in choices[key]:
            raise ValueError(f"--set {item}: {key} is one of {', '.join(choices[key])}")
        setattr(config, key, value)


# the allowed values of every number in TrainConfig: (test, what it says); floats must also be finite
POSITIVE, AT_LEAST_0, AT_LEAST_1 = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0"), (lambda v: v >= 1, ">= 1")
RANGES = {"lr": POSITIVE, "projector_lr": AT_LEAST_0, "batch_size": AT_LEAST_1, "micro_batch_size": AT_LEAST_0,
          "epochs": POSITIVE, "warmup_ratio": (lambda v: 0 <= v <= 1, "in 0..1"), "weight_decay": AT_LEAST_0,
          "grad_clip": AT_LEAST_0, "loss_group": AT_LEAST_0, "image_size": AT_LEAST_0, "max_length": AT_LEAST_1,
          "lora_r": AT_LEAST_0, "lora_alpha": AT_LEAST_0, "lora_dropout": (lambda v: 0 <= v < 1, "in 0..1, below 1"),
          "num_workers": AT_LEAST_0, "seed": AT_LEAST_0, "save_every": AT_LEAST_0, "stop_after": AT_LEAST_0,
          "dist_timeout": POSITIVE, "threads": AT_LEAST_0, "peak_tflops": AT_LEAST_0, "eval_limit": AT_LEAST_0}


def check_settings(config) -> None:
    """Every number in its range (a name and the range in the message), and values that parse but cannot train."""
    for key, (test, allowed) in RANGES.items():
        value = getattr(config, key)
        if not (math.isfinite(value) and test(value)):
            raise ValueError(f"{key}={value!r} is out of range: {key} must be {allowed}"
                             + (" (0: no clipping)" if key == "grad_clip" else ""))
    if config.loss_group and config.batch_size % config.loss_group:
        raise ValueError(f"loss_group={config.loss_group} must divide batch_size={config.batch_size} (the original's "
                         "per-device batch)")
    if config.lora_r and config.stage == 1:
        raise ValueError(f"lora_r={config.lora_r} in stage 1: LoRA adapts the LLM, which stage 1 leaves frozen (it "
                         f"trains only the projector); give lora_r in stage 2")


def check_model(config, model_config) -> None:
    """The recipe's projector type, tower input size and sample length against the model's: a mismatch is named, not
    trained on."""
    for key, have in (("projector_type", model_config.projector_type), ("image_size", model_config.image_size),
                      ("select_layer", model_config.select_layer)):
        if getattr(config, key) and getattr(config, key) != have:
            raise ValueError(f"--model/--vision-tower give {key} {have}, recipe {config.recipe} has "
                             f"{getattr(config, key)}: --set {key}={have} to train with it")
    window = model_config.llm.sliding_window
    if window and config.max_length > window:  # longer samples would need windowed attention, which llama.py lacks
        raise ValueError(f"max_length {config.max_length} exceeds the LLM's sliding_window {window}: "
                         f"--set max_length={window}")


def is_llava_checkpoint(path) -> bool:
    """A LLaVA checkpoint to go on from (ours, the original release, llava-hf), not a base LLM."""
    return formats.detect_format(path) in (formats.OWN, "llava-original", "llava-hf")


def check_inputs(config, world=1) -> None:
    """Every input path of a run, and the batch's split over `world` processes, before anything loads or trains."""
    if config.batch_size % world or (config.batch_size // world) % (config.micro_batch_size or 1):
        raise ValueError(f"batch_size {config.batch_size} must split evenly over {world} processes x "
                         "micro_batch_size")
    if config.demo and config.stage == 2 and not os.path.isfile(os.path.join(config.projector,
                                                                              "projector.safetensors")):
        raise FileNotFoundError(f"no stage-1 output in {config.projector}: run `python train.py --stage 1` first")
    for key, kind in (("data", "file"), ("image_folder", "dir"), ("model", "dir"), ("vision_tower", "dir"),
                      ("projector", "dir"), ("tokenizer", "file")):
        path = getattr(config, key)
        if path is not None and not (key == "projector" and path == FRESH_PROJECTOR) and not (
                os.path.isfile(path) if kind == "file" else os.path.isdir(path)):
            raise FileNotFoundError(f"--{key.replace('_', '-')}: no such {'file' if kind == 'file' else 'directory'}:"
                                    f" {path}")
    if config.projector not in (None, FRESH_PROJECTOR) and not any(
            os.path.isfile(os.path.join(config.projector, f)) for f in ("projector.safetensors", "mm_projector.bin")):
        raise FileNotFoundError(f"--projector: {config.projector} holds no projector.safetensors (stage-1 output) or "
                                "mm_projector.bin")
    base = not is_llava_checkpoint(config.model)
    if base and config.vision_tower is None:
        raise ValueError(f"--model {config.model} is a base LLM: give --vision-tower (a CLIP directory) too")
    if base and config.stage == 2 and config.projector is None:
        raise ValueError("stage 2 from a base LLM needs the stage-1 projector: give --projector <stage-1 output "
                         f"directory> (or --projector {FRESH_PROJECTOR} for a fresh one)")
