"""train.py's config: the named recipes hold the original LLaVA scripts' values, --set overrides by type and
refuses what it cannot parse, the learning-rate schedule is HF's, the command line stays small. No training here."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train
import train_cli

REPO = Path(__file__).resolve().parent.parent
# every real script; seed: HF TrainingArguments' default; no clipping: the DeepSpeed configs (zero2.json, zero3.json)
# have no gradient_clipping key, so DeepSpeed's default 0 (off) holds
SHARED = dict(warmup_ratio=0.03, weight_decay=0.0, max_length=2048, grad_checkpointing=True, seed=42)
DEEPSPEED = dict(grad_clip=0.0, **SHARED)
# haotian-liu/LLaVA scripts/pretrain.sh, finetune.sh (the paper's 3 epochs, batch 32), v1_5/pretrain.sh,
# v1_5/finetune.sh, finetune_sqa.sh; loss_group: the per-device batch (HF Trainer averages per-device token means).
# The paper's own runs (April 2023) were torchrun + FSDP: HF Trainer's max_grad_norm 1.0, 8 GPUs x 16, then x 4
ORIGINAL = {
    ("llava-v1", 1): dict(lr=2e-3, batch_size=128, epochs=1, projector_type="linear", template="plain",
                          image_aspect_ratio="square", image_size=224, grad_clip=1.0, loss_group=16, **SHARED),
    ("llava-v1", 2): dict(lr=2e-5, batch_size=32, epochs=3, projector_type="linear", template="vicuna_v1",
                          image_aspect_ratio="square", image_size=224, grad_clip=1.0, loss_group=4, **SHARED),
    ("llava-v1.5", 1): dict(lr=1e-3, batch_size=256, epochs=1, projector_type="mlp2x_gelu", template="plain",
                            image_aspect_ratio="square", group_by_length=False, image_size=336, loss_group=32,
                            **DEEPSPEED),
    ("llava-v1.5", 2): dict(lr=2e-5, batch_size=128, epochs=1, projector_type="mlp2x_gelu", template="vicuna_v1",
                            image_aspect_ratio="pad", group_by_length=True, image_size=336, loss_group=16,
                            **DEEPSPEED),
    # v1_5/finetune_lora.sh: finetune.sh's values but lr 2e-4, mm_projector_lr 2e-5, lora r 128 alpha 256; dropout
    # is LLaVA's TrainingArguments default lora_dropout 0.05
    ("llava-v1.5-lora", 2): dict(lr=2e-4, projector_lr=2e-5, batch_size=128, epochs=1, projector_type="mlp2x_gelu",
                                 template="vicuna_v1", image_aspect_ratio="pad", group_by_length=True, image_size=336,
                                 lora_r=128, lora_alpha=256, lora_dropout=0.05, loss_group=16, **DEEPSPEED),
    ("scienceqa", 2): dict(lr=2e-5, batch_size=128, epochs=12, projector_type="linear", template="vicuna_v1",
                           image_size=224, loss_group=16, **DEEPSPEED),
    # the demo: the values that gave 96-100 % in under 4 min on 2 CPU cores
    ("demo", 1): dict(lr=1e-3, projector_lr=1e-3, batch_size=32, epochs=3, template="plain", num_workers=0,
                      threads=1, grad_checkpointing=False, image_aspect_ratio="pad", group_by_length=True,
                      grad_clip=1.0, loss_group=0, seed=0),
    ("demo", 2): dict(lr=2e-3, projector_lr=1e-2, batch_size=16, epochs=4, template="vicuna_v1", num_workers=0,
                      threads=1, grad_checkpointing=False, image_aspect_ratio="pad", group_by_length=True,
                      grad_clip=1.0, loss_group=0, seed=0),
}
REQUIRED_KEYS = ("recipe", "stage", "lr", "projector_lr", "batch_size", "epochs", "warmup_ratio", "weight_decay",
                 "max_length", "projector_type", "template", "image_aspect_ratio", "group_by_length",
                 "grad_checkpointing", "lora_r", "lora_alpha", "lora_dropout", "grad_clip", "loss_group", "seed")


def dry_run(capsys, *argv):
    train.main([*argv, "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines  # one JSON object, nothing else
    return json.loads(lines[0])


@pytest.mark.parametrize("recipe, stage", ORIGINAL)
def test_dry_run_shows_the_original_scripts_values(capsys, recipe, stage):
    config = dry_run(capsys, "--recipe", recipe, "--stage", str(stage))
    assert {k: config[k] for k in ORIGINAL[recipe, stage]} == ORIGINAL[recipe, stage]


@pytest.mark.parametrize("recipe, stage", ORIGINAL)
def test_dry_run_has_the_documented_keys(capsys, recipe, stage):
    config = dry_run(capsys, "--recipe", recipe, "--stage", str(stage))
    assert set(REQUIRED_KEYS) <= config.keys() and (config["recipe"], config["stage"]) == (recipe, stage)


def test_projector_lr_defaults_to_lr(capsys):
    assert dry_run(capsys, "--recipe", "llava-v1.5", "--stage", "1", "--set", "lr=3e-4")["projector_lr"] == 3e-4


@pytest.mark.parametrize("recipe, start", [("scienceqa", "llava-v1"), ("llava-v1.5-lora", "llava-v1.5")])
def test_a_stage_2_only_recipe_names_the_stage_1_recipe_whose_projector_fits(recipe, start):
    # scienceqa: the paper's linear projector on 224 px; llava-v1.5-lora: LLaVA-1.5's MLP on 336 px
    message = f"recipe {recipe} has no stage 1: it starts from a stage-1 projector (--recipe {start} --stage 1)"
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.main(["--recipe", recipe, "--stage", "1", "--dry-run"])


def test_help_and_docstring_list_every_recipe():
    recipe_help = next(a.help for a in train_cli.make_parser(train.__doc__, train.RECIPES)._actions if a.dest == "recipe")  # before wrapping
    for name, stages in train.RECIPES.items():
        assert f"`{name}`" in train.__doc__, name
        assert f"{name} (stage {' and '.join(map(str, stages))})" in recipe_help, name


def test_full_tuning_unless_lora_r_is_set(capsys):
    assert dry_run(capsys, "--recipe", "llava-v1.5", "--stage", "2")["lora_r"] == 0


def test_lora_r_works_with_any_stage_2_recipe_and_alpha_defaults_to_2r(capsys):
    config = dry_run(capsys, "--stage", "2", "--set", "lora_r=16")  # the demo
    assert (config["lora_r"], config["lora_alpha"], config["lora_dropout"]) == (16, 32.0, 0.05)
    config = dry_run(capsys, "--recipe", "llava-v1", "--stage", "2", "--set", "lora_r=8", "lora_alpha=4")
    assert (config["lora_r"], config["lora_alpha"]) == (8, 4.0)


def test_lora_in_stage_1_is_an_error():
    with pytest.raises(SystemExit, match="lora_r=8 in stage 1: LoRA adapts the LLM, which stage 1 leaves frozen"):
        train.main(["--recipe", "llava-v1.5", "--stage", "1", "--set", "lora_r=8", "--dry-run"])


def test_set_overrides_by_the_fields_type(capsys):
    config = dry_run(capsys, "--stage", "2", "--set", "lr=1e-4", "batch_size=64", "group_by_length=false",
                     "--set", "template=plain", "epochs=0.5", "dist_timeout=60")
    assert config["lr"] == 1e-4 and config["batch_size"] == 64 and config["group_by_length"] is False
    assert config["template"] == "plain" and config["epochs"] == 0.5 and config["dist_timeout"] == 60.0


def test_set_reads_image_grid_pinpoints_as_a_json_list(capsys):
    config = dry_run(capsys, "--stage", "2", "--set", "image_aspect_ratio=anyres",
                     "image_grid_pinpoints=[[64,128],[128,64],[128,128]]")
    assert config["image_grid_pinpoints"] == [[64, 128], [128, 64], [128, 128]]
    assert config["image_aspect_ratio"] == "anyres" and config["patch_merge_type"] == "spatial_unpad"


def test_a_later_set_wins(capsys):
    assert dry_run(capsys, "--stage", "1", "--set", "seed=1", "--set", "seed=2")["seed"] == 2


def test_set_rejects_an_unknown_key_and_lists_the_known_ones():
    with pytest.raises(SystemExit, match=r"--set lrate=1: .*one of lr, projector_lr, batch_size"):
        train.main(["--stage", "1", "--set", "lrate=1", "--dry-run"])


@pytest.mark.parametrize("item, message", [
    ("lr=fast", "lr must be a number, not 'fast'"),
    ("batch_size=1.5", "batch_size must be an integer, not '1.5'"),
    ("group_by_length=maybe", "group_by_length must be true or false, not 'maybe'"),
    ("projector_type=conv", "projector_type is one of linear, mlp2x_gelu"),
    ("image_grid_pinpoints=[[64,128]", r"image_grid_pinpoints must be a JSON list .* not '\[\[64,128\]'"),
    ("lr", "expected KEY=VALUE"),
    ("data=x.json", "give data with its flag, --data"),
])
def test_set_rejects_a_bad_value_naming_the_key(item, message):
    with pytest.raises(SystemExit, match=message):
        train.main(["--stage", "1", "--set", item, "--dry-run"])


@pytest.mark.parametrize("item, message", [
    ("batch_size=-16", "batch_size=-16 is out of range: batch_size must be >= 1"),
    ("batch_size=0", "batch_size=0 is out of range"), ("epochs=-1", "epochs=-1.0 is out of range: epochs must be > 0"),
    ("micro_batch_size=-1", "micro_batch_size=-1 is out of range"), ("lr=nan", "lr=nan is out of range"),
    ("lr=inf", "lr=inf is out of range"), ("lora_dropout=1.5", "lora_dropout must be in 0..1, below 1"),
    ("threads=-1", "threads must be >= 0"), ("num_workers=-1", "num_workers must be >= 0"),
    ("warmup_ratio=-1", "warmup_ratio must be in 0..1"), ("save_every=-1", "save_every must be >= 0"),
    ("grad_clip=-1", r"grad_clip must be >= 0 \(0: no clipping\)"), ("lora_alpha=-2", "lora_alpha must be >= 0"),
])
def test_an_out_of_range_setting_is_refused_naming_it_and_its_range(item, message):
    with pytest.raises(SystemExit, match=message):
        train.main(["--stage", "2", "--set", item, "--dry-run"])


def test_grad_clip_0_is_accepted_as_no_clipping(capsys):
    assert dry_run(capsys, "--stage", "2", "--set", "grad_clip=0")["grad_clip"] == 0.0


def test_stage_is_required_with_paths():
    with pytest.raises(SystemExit, match="--stage 1 or --stage 2 is required"):
        train.main(["--data", "x.json", "--model", "m"])


def test_real_paths_require_a_recipe():
    with pytest.raises(SystemExit, match="--recipe is required with --data/--model"):
        train.main(["--stage", "1", "--data", "x.json", "--model", "m"])


def test_a_real_recipe_needs_real_paths():
    with pytest.raises(SystemExit, match="give both --data and --model"):
        train.main(["--stage", "1", "--recipe", "llava-v1.5"])


def test_at_most_15_flags():
    actions = train_cli.make_parser(train.__doc__, train.RECIPES)._actions  # --help included
    assert len(actions) <= 15, [a.option_strings for a in actions]


def test_warmup_starts_at_zero_and_reaches_the_peak_at_warmup_steps():
    config = train.make_config("llava-v1.5", 2)
    total = 1000
    warmup = math.ceil(0.03 * total)  # HF Trainer's get_warmup_steps
    assert train.lr_at(0, total, config) == 0.0
    assert train.lr_at(warmup // 2, total, config) == pytest.approx(2e-5 * (warmup // 2) / warmup)
    assert train.lr_at(warmup, total, config) == pytest.approx(2e-5)
    assert all(train.lr_at(s, total, config) < train.lr_at(s + 1, total, config) for s in range(warmup))


def test_cosine_decays_from_the_peak_to_zero():
    config = train.make_config("llava-v1.5", 2)
    total, warmup = 1000, 30
    lrs = [train.lr_at(s, total, config) for s in range(warmup, total)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert train.lr_at((warmup + total) // 2, total, config) == pytest.approx(1e-5)  # half way: half the peak
    assert lrs[-1] < 1e-4 * 2e-5  # the last step's lr is ~0


@pytest.mark.slow
def test_cli_dry_run_prints_one_json_object_and_exits():
    result = subprocess.run([sys.executable, "train.py", "--recipe", "llava-v1", "--stage", "2", "--set",
                             "micro_batch_size=4", "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["recipe"] == "llava-v1" and config["micro_batch_size"] == 4 and config["epochs"] == 3


def test_a_loss_group_that_does_not_divide_the_batch_is_refused():
    with pytest.raises(SystemExit, match="loss_group=5 must divide batch_size=16"):
        train.main(["--stage", "2", "--set", "loss_group=5", "--dry-run"])


def test_samples_longer_than_the_llms_sliding_window_are_refused():
    from types import SimpleNamespace
    from llama import LlamaConfig
    llm = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, max_position_embeddings=4096, sliding_window=1024)
    model_config = SimpleNamespace(projector_type="mlp2x_gelu", image_size=336, select_layer=-2, llm=llm)
    config = train.TrainConfig(recipe="llava-v1.5", stage=2, **train.RECIPES["llava-v1.5"][2])
    with pytest.raises(ValueError, match="max_length 2048 exceeds the LLM's sliding_window 1024"):
        train_cli.check_model(config, model_config)
    train_cli.check_model(train.TrainConfig(**{**train.RECIPES["llava-v1.5"][2], "max_length": 1024}),
                          model_config)
