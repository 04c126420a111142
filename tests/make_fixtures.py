"""Build the reference fixtures under tests/fixtures/ with Hugging Face transformers.

Run by hand (`pip install transformers protobuf scikit-image`, then `python tests/make_fixtures.py [llama clip llava]`);
the tests read the committed files and never import transformers. Each reference model is tiny, random-init, with
weights perturbed so that norms and biases matter.
"""
import os
import sys

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

# ---- llama ----
def tokenizer_corpus(n=3000, seed=0):
    """Varied English in the shapes of the project's text: chat turns, colours, shapes, counts, punctuation."""
    import random
    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "pink", "brown"]
    shapes = ["circle", "square", "triangle", "star", "rectangle", "hexagon", "ellipse", "cross", "diamond"]
    nouns = ["image", "picture", "photo", "dog", "cat", "person", "car", "table", "street", "tree", "window", "sky"]
    verbs = ["shows", "contains", "depicts", "has", "is near", "sits on", "is left of", "is above", "looks like"]
    questions = ["What colour is the {s}?", "How many {s}s are there?", "Where is the {c} {s}?",
                 "What is in the {n}?", "Describe the {n} in detail.", "Is there a {c} {s} in the {n}?"]
    answers = ["The {s} is {c}.", "There are {k} {s}s.", "The {c} {s} is in the top left corner.",
               "The {n} {v} a {c} {s}.", "Yes, there is a {c} {s} next to the {s2}.", "No.", "{K}."]
    words = ["the", "a", "an", "of", "and", "to", "in", "is", "it", "that", "with", "for", "on", "as", "this",
             "be", "at", "by", "from", "or", "what", "which", "there", "their", "can", "would", "about", "people",
             "time", "large", "small", "bright", "dark", "left", "right", "top", "bottom", "center", "corner"]
    lines = []
    for _ in range(n):
        f = dict(c=rng.choice(colours), s=rng.choice(shapes), s2=rng.choice(shapes), n=rng.choice(nouns),
                 v=rng.choice(verbs), k=rng.randint(0, 12), K=rng.choice(["Red", "Two", "Three", "Square", "Blue"]))
        kind = rng.random()
        if kind < 0.4:
            lines.append(f"USER: {rng.choice(questions).format(**f)} ASSISTANT: {rng.choice(answers).format(**f)}")
        elif kind < 0.7:
            lines.append(rng.choice(answers).format(**f) + " " + " ".join(rng.choices(words, k=rng.randint(3, 12))))
        else:
            sentence = " ".join(rng.choices(words + colours + shapes + nouns, k=rng.randint(4, 16)))
            lines.append(sentence.capitalize() + rng.choice([".", "!", "?", ",", ";", ":", " (1990-2024)."]))
    return lines


def make_tokenizer(out_dir, vocab_size=512):
    """A LLaMA-style sentencepiece BPE model (byte fallback, unk=0 bos=1 eos=2, no normalisation), ~10 KB."""
    import sentencepiece as spm
    path = os.path.join(out_dir, "tokenizer.model")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()), model_prefix=path[:-len(".model")], vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2)
    os.remove(path[:-len(".model")] + ".vocab")
    return path


def make_llama_reference(out_dir, name, seed, shard=False, mistral=False, **config):
    """A tiny perturbed LlamaForCausalLM (or MistralForCausalLM; saved in HF layout) + input ids, logits and 20
    greedy tokens."""
    import torch
    import transformers
    from safetensors.torch import save_file
    prefix = "Mistral" if mistral else "Llama"
    torch.manual_seed(seed)
    model_config = getattr(transformers, prefix + "Config")(attn_implementation="eager", **config)
    model = getattr(transformers, prefix + "ForCausalLM")(model_config).eval()
    with torch.no_grad():  # weights far from init so that every norm, head and position matters
        for key, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 1.0 if "embed" in key else p.shape[1] ** -0.5)
    folder = os.path.join(out_dir, name)
    model.save_pretrained(os.path.join(folder, "model"), max_shard_size="100KB" if shard else "1GB")
    input_ids = torch.randint(0, config["vocab_size"], (2, 12))  # (B, T)
    prompt = torch.randint(0, config["vocab_size"], (1, 8))  # (1, T)
    with torch.no_grad():
        logits = model(input_ids).logits  # (B, T, V)
        greedy = prompt
        for _ in range(20):  # full forward each step: the plainest greedy reference
            next_logits = model(greedy).logits[0, -1]
            top2 = next_logits.topk(2).values
            assert top2[0] - top2[1] > 1e-3, "near-tie in the greedy reference: pick another seed"
            greedy = torch.cat([greedy, next_logits.argmax().view(1, 1)], dim=1)
    save_file({"input_ids": input_ids, "logits": logits.contiguous(), "prompt": prompt,
               "greedy": greedy[:, prompt.shape[1]:].contiguous()}, os.path.join(folder, "reference.safetensors"))


def make_llama(out_dir):
    make_tokenizer(out_dir)
    # grouped-query attention, untied head, rope_theta at default, saved as several shards
    make_llama_reference(out_dir, "llama_gqa", seed=0, shard=True, vocab_size=256, hidden_size=64,
                         intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, rms_norm_eps=1e-5)
    # tied embeddings, explicit head_dim != hidden/heads, linear RoPE scaling, large theta
    make_llama_reference(out_dir, "llama_tied", seed=1, vocab_size=256, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                         tie_word_embeddings=True, max_position_embeddings=64, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0})
    # Mistral (LLaVA-1.6's LLM): rope_theta 1e6, GQA, a sliding window longer than every reference sequence
    make_llama_reference(out_dir, "mistral_tiny", seed=2, mistral=True, vocab_size=256, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                         max_position_embeddings=128, rms_norm_eps=1e-5, sliding_window=32,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})

# ---- clip ----
# Tower: one tiny CLIPVisionModel (odd sizes, 3 layers) saved three ways with identical vision weights:
#   clip_tiny/      the published vision-only layout ("vision_model." prefix, plus the position_ids buffer that
#                   older checkpoints carry), made by renaming what transformers 5 writes;
#   clip_tiny_hf5/  exactly what transformers 5 CLIPVisionModel.save_pretrained writes (no prefix);
#   clip_full/      a full CLIPModel (tiny text tower, projections, logit_scale), like openai/clip-vit-large-patch14.
# clip_outputs/tower.safetensors: a fixed pixel input, every hidden state, LLaVA's features (layer -2, CLS dropped).
# clip_outputs/images + preprocess.safetensors: CLIPImageProcessorPil (the PIL processor LLaVA used; in
# transformers 5 the default CLIPImageProcessor is the torchvision one) on small images of every mode, plain and
# after LLaVA's expand2square with the mean colour.
CLIP_IMAGE_SIZE = 24


def make_clip(out_dir):
    import json
    import shutil

    import numpy as np
    import skimage.data
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=30,
                  patch_size=6, layer_norm_eps=1e-5, hidden_act="quick_gelu")
    model = CLIPVisionModel(CLIPVisionConfig(**vision)).eval()
    with torch.no_grad():  # perturb everything so that layer norms, biases and the class embedding matter
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.02))
    dirs = {k: os.path.join(out_dir, f"clip_{k}") for k in ("tiny", "tiny_hf5", "full", "outputs")}
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)

    model.save_pretrained(dirs["tiny_hf5"])
    hf5 = load_file(os.path.join(dirs["tiny_hf5"], "model.safetensors"))
    assert not any(k.startswith("vision_model.") for k in hf5), "transformers 5 layout expected (no prefix)"
    published = {f"vision_model.{k}": v for k, v in hf5.items()}
    published["vision_model.embeddings.position_ids"] = model.embeddings.position_ids.clone()  # (1, N+1) int64
    save_file(published, os.path.join(dirs["tiny"], "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(dirs["tiny_hf5"], "config.json"), os.path.join(dirs["tiny"], "config.json"))

    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=8)
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    full.vision_model.load_state_dict(model.state_dict())
    full.save_pretrained(dirs["full"])

    pixel_values = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True)
        assert len(out.hidden_states) == 4
        tensors = {"pixel_values": pixel_values, "features": out.hidden_states[-2][:, 1:]}  # LLaVA's selection
        tensors.update({f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)})
        reloaded = CLIPVisionModel.from_pretrained(dirs["tiny"]).eval()  # transformers reads the published layout
        assert torch.equal(reloaded(pixel_values).last_hidden_state, out.last_hidden_state)
        reloaded = CLIPModel.from_pretrained(dirs["full"]).vision_model.eval()
        assert torch.equal(reloaded(pixel_values).last_hidden_state, out.last_hidden_state)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dirs["outputs"], "tower.safetensors"))

    # small images, so that both up- and downscaling and odd sizes (truncated long edge, odd crop offsets) occur
    def small(array, size, crop=None):
        image = Image.fromarray(array)
        return (image.crop(crop) if crop else image).resize(size, Image.LANCZOS)
    astronaut, coffee, chelsea, camera = (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
                                          skimage.data.camera())
    rgba = small(astronaut, (33, 45)).convert("RGBA")
    alpha = np.linspace(0, 255, 33 * 45).round().astype(np.uint8).reshape(45, 33)  # fully clear .. fully opaque
    rgba.putalpha(Image.fromarray(alpha))
    la = small(camera, (26, 20)).convert("LA")
    la.putalpha(Image.fromarray(alpha[:20, :26][:, ::-1].copy()))
    palette = small(chelsea, (30, 26)).quantize(16)
    images = {
        "square.png": small(astronaut, (40, 40)),
        "landscape.png": small(coffee, (52, 31)),
        "portrait.png": small(chelsea, (19, 35), crop=(100, 0, 300, 300)),
        "tiny.png": small(coffee, (7, 5)),
        "gray.png": small(camera, (37, 29)),
        "rgba.png": rgba,
        "la.png": la,
        "palette.png": palette,
        "cmyk.tiff": small(coffee, (28, 36)).convert("CMYK"),
    }
    palette_clear = palette.copy()
    palette_clear.info["transparency"] = 3  # one palette entry is transparent
    images["palette_transparent.png"] = palette_clear
    os.makedirs(os.path.join(dirs["outputs"], "images"))
    for name, image in images.items():
        kwargs = {"transparency": 3} if name == "palette_transparent.png" else {}
        image.save(os.path.join(dirs["outputs"], "images", name), **kwargs)

    S = CLIP_IMAGE_SIZE
    processor = CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    mean_color = tuple(int(x * 255) for x in processor.image_mean)

    def expand2square(image, color):  # LLaVA's pad-to-square, applied to the RGB image before the processor
        w, h = image.size
        if w == h:
            return image
        square = Image.new(image.mode, (max(w, h), max(w, h)), color)
        square.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
        return square

    def to_rgb(image):  # the processor's own conversion, so that padding happens after it as in LLaVA
        return Image.fromarray(processor.convert_to_rgb(image))

    expected, modes = {}, {}
    for name in images:
        with Image.open(os.path.join(dirs["outputs"], "images", name)) as image:
            image.load()
        modes[name] = image.mode
        expected[f"{name}.plain"] = processor(image, return_tensors="pt")["pixel_values"][0]
        padded = expand2square(to_rgb(image), mean_color)
        expected[f"{name}.pad"] = processor(padded, return_tensors="pt")["pixel_values"][0]
    save_file(expected, os.path.join(dirs["outputs"], "preprocess.safetensors"))
    with open(os.path.join(dirs["outputs"], "preprocess.json"), "w") as f:
        json.dump({"image_size": S, "pad_color": mean_color, "modes": modes}, f, indent=2)
    total = sum(os.path.getsize(os.path.join(r, f)) for d in dirs.values() for r, _, fs in os.walk(d) for f in fs)
    print(f"clip fixtures: {total / 1e6:.2f} MB")

# ---- llava ----
LLAVA_IMAGE_TOKEN = 120  # the image token id of the tiny llava-hf reference (vocab 128 = 120 text ids padded to 64s)


def make_llava(out_dir):
    """tests/fixtures/llava_hf: a tiny LlavaForConditionalGeneration as transformers saves it.
    tests/fixtures/llava_ref: its inputs and outputs, and the key names/shapes of the published llava-hf layout."""
    import json
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=30, patch_size=6, projection_dim=16)  # 25 patches + CLS
    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=LLAVA_IMAGE_TOKEN,
                         image_seq_length=25, projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # perturb every tensor so that norms, biases and the projector all matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_dir = os.path.join(out_dir, "llava_hf")
    model.save_pretrained(hf_dir)

    img = [LLAVA_IMAGE_TOKEN] * 25
    ids1 = torch.tensor([[1, 17, 30] + img + [40, 50, 60, 70]])  # (1, 32)
    ids2 = torch.tensor([[1, 9] + img + [11, 12] + img + [13, 14]])  # (1, 56), two images
    pix1, pix2 = torch.randn(1, 3, 30, 30), torch.randn(2, 3, 30, 30)
    labels1 = ids1.masked_fill(ids1 == LLAVA_IMAGE_TOKEN, -100)
    labels1[:, :3] = -100  # the loss covers only the text after the image
    with torch.no_grad():
        out1 = model(input_ids=ids1, pixel_values=pix1, labels=labels1)
        logits1 = out1.logits
        logits2 = model(input_ids=ids2, pixel_values=pix2).logits
        out = model.generate(input_ids=ids1, pixel_values=pix1, max_new_tokens=20, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    greedy1 = out[:, ids1.shape[1]:]
    assert greedy1.shape[1] == 20
    ref_dir = os.path.join(out_dir, "llava_ref")
    os.makedirs(ref_dir, exist_ok=True)
    save_file({"input_ids_1": ids1, "pixel_values_1": pix1, "logits_1": logits1.contiguous(), "greedy_1": greedy1,
               "labels_1": labels1, "loss_1": out1.loss.reshape(1),
               "input_ids_2": ids2, "pixel_values_2": pix2, "logits_2": logits2.contiguous()},
              os.path.join(ref_dir, "reference.safetensors"))

    # export_hf writes the published llava-1.5-7b-hf names (loadable by transformers 4.x and 5.x alike);
    # check that transformers loads them strictly before recording them
    sd = {k: v for k, v in model.state_dict().items()}
    published = {}
    for k, v in sd.items():
        k = k.replace("model.language_model.", "language_model.model.").replace("model.vision_tower.",
                                                                                 "vision_tower.vision_model.")
        k = "language_model.lm_head.weight" if k == "lm_head.weight" else k
        published[k.replace("model.multi_modal_projector.", "multi_modal_projector.")] = v
    check_dir = os.path.join(out_dir, "llava_ref", "_check")
    os.makedirs(check_dir, exist_ok=True)
    model.config.save_pretrained(check_dir)
    save_file({k: v.contiguous() for k, v in published.items()}, os.path.join(check_dir, "model.safetensors"),
              metadata={"format": "pt"})
    _, info = LlavaForConditionalGeneration.from_pretrained(check_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    import shutil
    shutil.rmtree(check_dir)
    with open(os.path.join(ref_dir, "export_keys.json"), "w") as f:
        json.dump({k: list(v.shape) for k, v in sorted(published.items())}, f, indent=0)
    check_llava_export(out_dir)


def check_llava_export(out_dir):
    """When llava.py is importable: formats.export_hf output loads in transformers strictly and gives the same logits,
    both for the reference model and for a model whose vocabulary export_hf must pad; and a model exported with its
    tokenizer answers from the folder alone (AutoProcessor + LlavaForConditionalGeneration): the same prompt ids as
    data.py's renderer, the same pixels as clip.preprocess, the same logits and greedy tokens as ours."""
    try:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import formats
        from llava import IMAGE_TOKEN_INDEX, LLaVA, LLaVAConfig
    except ImportError as e:
        print(f"llava export check skipped: {e}")
        return
    import tempfile
    import torch
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    ref = load_file(os.path.join(out_dir, "llava_ref", "reference.safetensors"))
    ours = formats.load_llava(os.path.join(out_dir, "llava_hf"))
    ids = ref["input_ids_1"].masked_fill(ref["input_ids_1"] == LLAVA_IMAGE_TOKEN, IMAGE_TOKEN_INDEX)
    with tempfile.TemporaryDirectory() as tmp:
        formats.export_hf(ours, tmp)
        theirs, info = LlavaForConditionalGeneration.from_pretrained(tmp, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        with torch.no_grad():
            got = theirs(input_ids=ref["input_ids_1"], pixel_values=ref["pixel_values_1"]).logits
        assert torch.allclose(got, ref["logits_1"], atol=1e-5), (got - ref["logits_1"]).abs().max()
    # a model with 100 text ids: export adds the image token (id 100) and pads the vocabulary to 128
    cfg = LLaVAConfig(**{**ours.config.__dict__, "image_token_index": None})
    cfg.llm = type(cfg.llm)(**{**cfg.llm.__dict__, "vocab_size": 100})
    torch.manual_seed(1)
    small = LLaVA(cfg).eval()
    with torch.no_grad():
        want, _ = small(ids, ref["pixel_values_1"])
    with tempfile.TemporaryDirectory() as tmp:
        formats.export_hf(small, tmp)
        theirs, info = LlavaForConditionalGeneration.from_pretrained(tmp, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert theirs.config.image_token_index == 100 and theirs.config.text_config.vocab_size == 128
        with torch.no_grad():
            got = theirs(input_ids=ids.masked_fill(ids == IMAGE_TOKEN_INDEX, 100), pixel_values=ref["pixel_values_1"]).logits
        assert torch.allclose(got[..., :100], want, atol=1e-5), (got[..., :100] - want).abs().max()
    check_llava_processor_export(out_dir, ours.config)
    print("llava export check: transformers loads export_hf output strictly, same logits; the processor answers alone")


def check_llava_processor_export(out_dir, config):
    """A tiny LLaVA over the fixture tokenizer (512 pieces, so <image> = 512), exported with it: transformers'
    AutoProcessor renders and tokenizes the chat and preprocesses the image, and the model generates, from the
    exported folder alone."""
    import tempfile
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    import formats
    from clip import preprocess
    from data import TEMPLATES, render, with_image
    from inference import generate_llava
    from llava import IMAGE_TOKEN_INDEX, LLaVA, LLaVAConfig
    from tokenizer import Tokenizer

    tokenizer_file = os.path.join(out_dir, "tokenizer.model")
    tokenizer = Tokenizer(tokenizer_file)
    cfg = LLaVAConfig(**{**config.__dict__, "image_token_index": None, "image_aspect_ratio": "pad"})
    cfg.llm = type(cfg.llm)(**{**cfg.llm.__dict__, "vocab_size": tokenizer.vocab_size})
    torch.manual_seed(2)
    model = LLaVA(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    image = Image.open(os.path.join(out_dir, "clip_outputs", "images", "landscape.png")).convert("RGB")
    question = "What colour is the circle?"
    chat = [{"role": "system", "content": TEMPLATES["vicuna_v1"].system},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    with tempfile.TemporaryDirectory() as tmp:
        formats.export_hf(model, tmp, tokenizer=tokenizer_file)
        processor = AutoProcessor.from_pretrained(tmp)
        theirs = LlavaForConditionalGeneration.from_pretrained(tmp).eval()
        assert processor.image_token_id == tokenizer.vocab_size
        inputs = processor(text=processor.apply_chat_template(chat, add_generation_prompt=True), images=image,
                           return_tensors="pt")
        with torch.no_grad():
            logits = theirs(**inputs).logits
            greedy = theirs.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    ids, _ = render([{"from": "human", "value": with_image(question)}], "vicuna_v1", tokenizer,
                    cfg.num_image_tokens, for_generation=True)
    hf_ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == processor.image_token_id, IMAGE_TOKEN_INDEX)
    assert hf_ids[0].tolist() == list(ids), "the processor's prompt ids differ from data.render's"
    pixel_values = preprocess(image, cfg.image_size, pad_to_square=True)
    assert torch.equal(inputs["pixel_values"], pixel_values), "the processor's pixels differ from clip.preprocess"
    with torch.no_grad():
        want, _ = model(hf_ids, pixel_values)
    assert torch.allclose(logits[..., :tokenizer.vocab_size], want, atol=1e-5), (logits[..., :512] - want).abs().max()
    model.llm.setup_cache(1, hf_ids.shape[1] + 12)
    assert list(generate_llava(model, hf_ids, pixel_values, max_new_tokens=12)) == greedy.tolist()

# ---- llava-next (LLaVA-1.6, anyres) ----
# tests/fixtures/llava_next_hf: a tiny LlavaNextForConditionalGeneration over the fixture tokenizer (<image> = 512, the
# vocabulary padded to 576), grid pinpoints NEXT_PINPOINTS["a"]; weights exact in fp16 and stored so (half the bytes).
# tests/fixtures/llava_next_ref: more images; LlavaNextImageProcessorPil's pixels (preprocess.safetensors: every image
# with set "a", NEXT_LOGITS["b"]'s with set "b"); per image and set, the logits of a short prompt's last position,
# from transformers ("spatial_unpad") and from the original's llava_arch.py merges, restated below ("flat",
# "spatial"); a vicuna_v1 prompt and the greedy ids of transformers' generate; config_b.json for the other set.
NEXT_TILE, NEXT_PATCH, NEXT_IMAGE_TOKEN = 12, 4, 512
NEXT_PINPOINTS = {  # (width, height), as the original writes them; transformers' configs take (height, width)
    "a": [[12, 24], [24, 12], [24, 24], [36, 12], [12, 36]],  # LLaVA-1.6's set, for a 12 px tower
    "b": [[24, 36], [48, 12], [12, 24], [36, 24]],  # not symmetric: a (height, width) mix-up changes the tiles
}
NEXT_IMAGES = ["square.png", "landscape.png", "portrait.png", "tiny.png", "gray.png", "rgba.png",  # clip_outputs'
               "wide.png", "tall.png", "big.png"]  # made here: 15:1, 1:16, larger than every grid resolution
NEXT_LOGITS = {"a": NEXT_IMAGES, "b": ["landscape.png", "wide.png", "tall.png", "big.png"]}  # spatial_unpad cases
NEXT_MERGES = {"flat": ["wide.png", "portrait.png"], "spatial": ["wide.png", "portrait.png"]}  # set "a"
NEXT_PROMPT = ([1, 17, 30], [40, 50, 60, 70])  # text ids around the image; the last one's logits are kept
NEXT_QUESTION, NEXT_ANSWER_IMAGE = "What colour is the circle?", "landscape.png"


def next_image_path(out_dir, name):
    folder = "llava_next_ref" if name in ("wide.png", "tall.png", "big.png") else "clip_outputs"
    return os.path.join(out_dir, folder, "images", name)


def original_best_resolution(size, pinpoints):  # llava/mm_utils.py select_best_resolution, (w, h) throughout
    w0, h0 = size
    best, most, least = None, 0, float("inf")
    for w, h in pinpoints:
        scale = min(w / w0, h / h0)
        kept = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        if kept > most or (kept == most and w * h - kept < least):
            best, most, least = (w, h), kept, w * h - kept
    return best


def original_anyres_pixels(image, processor, pinpoints):  # mm_utils.process_anyres_image, restated
    import math
    import torch
    from PIL import Image
    width, height = original_best_resolution(image.size, pinpoints)
    w0, h0 = image.size
    scale_w, scale_h = width / w0, height / h0
    if scale_w < scale_h:
        new_w, new_h = width, min(math.ceil(h0 * scale_w), height)
    else:
        new_w, new_h = min(math.ceil(w0 * scale_h), width), height
    padded = Image.new("RGB", (width, height), (0, 0, 0))
    padded.paste(image.resize((new_w, new_h)), ((width - new_w) // 2, (height - new_h) // 2))
    tiles = [padded.crop((x, y, x + NEXT_TILE, y + NEXT_TILE)) for y in range(0, height, NEXT_TILE)
             for x in range(0, width, NEXT_TILE)]
    tiles = [image.resize((NEXT_TILE, NEXT_TILE))] + tiles
    return torch.stack([processor(t, return_tensors="pt")["pixel_values"][0] for t in tiles])


def original_unpad_rows(size, height, width, rounded=False):  # llava_arch.unpad_image (transformers: rounded)
    w0, h0 = size
    if w0 / h0 > width / height:
        new = h0 * (width / w0)
        new = int(round(new, 7)) if rounded else int(new)
        pad = (height - new) // 2
        return slice(pad, height - pad), slice(0, width)
    new = w0 * (height / h0)
    new = int(round(new, 7)) if rounded else int(new)
    pad = (width - new) // 2
    return slice(0, height), slice(pad, width - pad)


def original_merge(features, size, pinpoints, merge, newline):  # llava_arch.py (1.6) for one image, restated
    import torch
    if merge == "flat":
        return features.flatten(0, 1)
    side = NEXT_TILE // NEXT_PATCH
    width, height = original_best_resolution(size, pinpoints)
    tiles = features[1:].view(height // NEXT_TILE, width // NEXT_TILE, side, side, -1)
    if merge == "spatial_unpad":
        tiles = tiles.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)  # (D, H, W)
        rows, cols = original_unpad_rows(size, tiles.shape[1], tiles.shape[2])
        tiles = tiles[:, rows, cols]
        tiles = torch.cat((tiles, newline[:, None, None].expand(*tiles.shape[:-1], 1)), dim=-1)
        tiles = tiles.flatten(1, 2).transpose(0, 1)
    else:
        tiles = tiles.permute(0, 2, 1, 3, 4).contiguous().flatten(0, 3)
    return torch.cat((features[0], tiles), dim=0)


def make_llava_next(out_dir):
    import json
    import shutil
    import skimage.data
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from data import render, with_image  # the prompt's text ids (render is checked against transformers 4.37)
    from tokenizer import Tokenizer

    hf_dir, ref_dir = os.path.join(out_dir, "llava_next_hf"), os.path.join(out_dir, "llava_next_ref")
    for d in (hf_dir, ref_dir):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(os.path.join(ref_dir, "images"))
    made = {"wide.png": (skimage.data.coffee(), (120, 8)), "tall.png": (skimage.data.chelsea(), (7, 112)),
            "big.png": (skimage.data.astronaut(), (80, 53))}
    for name, (array, size) in made.items():
        Image.fromarray(array).resize(size, Image.LANCZOS).save(next_image_path(out_dir, name))

    def hf_pinpoints(name):
        return [[h, w] for w, h in NEXT_PINPOINTS[name]]

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=NEXT_TILE, patch_size=NEXT_PATCH, projection_dim=8)
    text = LlamaConfig(vocab_size=576, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=False)
    configs = {k: LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=NEXT_IMAGE_TOKEN,
                                  image_grid_pinpoints=hf_pinpoints(k), vision_feature_layer=-2,
                                  vision_feature_select_strategy="default") for k in NEXT_PINPOINTS}
    model = LlavaNextForConditionalGeneration(configs["a"]).eval()
    with torch.no_grad():  # perturb every tensor so that norms, biases, the projector and image_newline all matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.half().save_pretrained(hf_dir)
    model.float()  # the weights are exact in fp16: the reference runs in fp32 on the stored values
    configs["b"].to_json_file(os.path.join(ref_dir, "config_b.json"))
    models = {"a": model, "b": LlavaNextForConditionalGeneration(configs["b"]).eval()}
    models["b"].load_state_dict(model.state_dict())

    images = {}
    for name in NEXT_IMAGES:
        with Image.open(next_image_path(out_dir, name)) as image:
            image.load()
        images[name] = image
    pixels, logits, meta = {}, {}, {"tile": NEXT_TILE, "pinpoints": NEXT_PINPOINTS, "tokens": {}, "sizes": {}}
    for key, pinpoints in NEXT_PINPOINTS.items():
        processor = LlavaNextImageProcessorPil(image_grid_pinpoints=hf_pinpoints(key),
                                               size={"shortest_edge": NEXT_TILE},
                                               crop_size={"height": NEXT_TILE, "width": NEXT_TILE})
        clip_processor = CLIPImageProcessorPil(size={"shortest_edge": NEXT_TILE},
                                               crop_size={"height": NEXT_TILE, "width": NEXT_TILE})
        for name, image in images.items():
            out = processor(image, return_tensors="pt")
            rgb = Image.fromarray(processor.convert_to_rgb(image))
            assert torch.equal(out["pixel_values"][0], original_anyres_pixels(rgb, clip_processor, pinpoints)), name
            assert out["image_sizes"][0].tolist() == [image.size[1], image.size[0]]
            if key == "a" or name in NEXT_LOGITS[key]:  # the fixture's size
                pixels[f"{key}.{name}"] = out["pixel_values"][0]
            meta["sizes"][name] = list(image.size)
            width, height = original_best_resolution(image.size, pinpoints)
            side = NEXT_TILE // NEXT_PATCH
            shape = (height // NEXT_TILE * side, width // NEXT_TILE * side)
            assert original_unpad_rows(image.size, *shape) == original_unpad_rows(image.size, *shape, rounded=True), \
                f"{name}: the original's int() and transformers' round() disagree: pick another size"
    transposed = [[h, w] for w, h in NEXT_PINPOINTS["b"]]
    assert any(original_best_resolution(images[n].size, NEXT_PINPOINTS["b"]) !=
               original_best_resolution(images[n].size, transposed)[::-1] for n in NEXT_LOGITS["b"])

    def prompt(n):
        return torch.tensor([NEXT_PROMPT[0] + [NEXT_IMAGE_TOKEN] * n + NEXT_PROMPT[1]])

    newline = model.model.image_newline.detach()
    for key, names in NEXT_LOGITS.items():
        for name in names:
            pix, size = pixels[f"{key}.{name}"][None], torch.tensor([[images[name].size[1], images[name].size[0]]])
            with torch.no_grad():
                n = models[key].model.get_image_features(pix, size).pooler_output[0].shape[0]
                out = models[key](input_ids=prompt(n), pixel_values=pix, image_sizes=size).logits
            meta["tokens"][f"{key}.spatial_unpad.{name}"] = n
            logits[f"{key}.spatial_unpad.{name}"] = out[0, -1:].contiguous()
    for merge, names in [("spatial_unpad", NEXT_LOGITS["a"])] + list(NEXT_MERGES.items()):
        for name in names:  # the original's merges on transformers' tower and projector
            with torch.no_grad():
                hidden = model.model.vision_tower(pixels[f"a.{name}"], output_hidden_states=True).hidden_states[-2]
                features = model.model.multi_modal_projector(hidden[:, 1:])
                merged = original_merge(features, images[name].size, NEXT_PINPOINTS["a"], merge, newline)
                ids = prompt(len(merged))
                embeds = model.get_input_embeddings()(ids)
                embeds[ids == NEXT_IMAGE_TOKEN] = merged
                out = model(inputs_embeds=embeds).logits[0, -1:]
            if merge == "spatial_unpad":  # the original and transformers agree on every fixture size
                assert torch.allclose(out, logits[f"a.spatial_unpad.{name}"], atol=1e-5), name
            else:
                meta["tokens"][f"a.{merge}.{name}"] = len(merged)
                logits[f"a.{merge}.{name}"] = out.contiguous()

    tokenizer = Tokenizer(os.path.join(out_dir, "tokenizer.model"))
    name = NEXT_ANSWER_IMAGE
    pix, size = pixels[f"a.{name}"][None], torch.tensor([[images[name].size[1], images[name].size[0]]])
    with torch.no_grad():
        n = model.model.get_image_features(pix, size).pooler_output[0].shape[0]
    ids, _ = render([{"from": "human", "value": with_image(NEXT_QUESTION)}], "vicuna_v1", tokenizer, n,
                    for_generation=True)
    ids = torch.tensor([[NEXT_IMAGE_TOKEN if i == -200 else i for i in ids]])
    with torch.no_grad():
        greedy = model.generate(input_ids=ids, pixel_values=pix, image_sizes=size, max_new_tokens=12, do_sample=False,
                                eos_token_id=2, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    for scores in greedy.scores:
        top2 = scores[0].topk(2).values
        assert top2[0] - top2[1] > 1e-3, "near-tie in the greedy reference: pick another seed"
    save_file({k: v.contiguous() for k, v in pixels.items()}, os.path.join(ref_dir, "preprocess.safetensors"))
    logits.update({"answer_ids": ids, "answer_greedy": greedy.sequences[:, ids.shape[1]:].contiguous()})
    save_file(logits, os.path.join(ref_dir, "reference.safetensors"))
    with open(os.path.join(ref_dir, "meta.json"), "w") as f:
        json.dump({**meta, "question": NEXT_QUESTION, "answer_image": NEXT_ANSWER_IMAGE}, f, indent=1)
    total = sum(os.path.getsize(os.path.join(r, f)) for d in (hf_dir, ref_dir) for r, _, fs in os.walk(d) for f in fs)
    print(f"llava-next fixtures: {total / 1e3:.0f} KB; greedy {greedy.sequences[0, ids.shape[1]:].tolist()}")


# ---- render ----
RENDER_CONVERSATIONS = [  # (has_image, turns human, gpt, ...): multi-turn, so that rounds follow "</s>"
    (True, ["What is in the picture?\n<image>", "A red circle on the left.", "How many shapes are there?",
            "There is 1 shape.", "Where is the square?", "The square is in the top left corner."]),
    (False, ["Describe a small blue star.", "It is blue.", "And the circle?", "The circle is red and large."]),
]


def make_render_reference(out_dir):
    """tests/fixtures/render_reference.json: the original LLaVA's training ids and labels (its tokenizer_image_token
    and preprocess_v1 / preprocess_llama_2 / preprocess_plain, restated below) under transformers 4.37 (the version
    LLaVA pins), with legacy true and false, for tokenizer_user.model: the fixture corpus with "USER" as one piece,
    as LLaMA's vocabulary has it ("▁USER" is two pieces there), which preprocess_v1's non-legacy -1 assumes."""
    import json
    import shutil
    import tempfile
    import sentencepiece as spm
    import transformers
    from transformers import LlamaTokenizer
    assert transformers.__version__.startswith("4.37."), "the reference is transformers 4.37 (LLaVA's pin)"
    path = os.path.join(out_dir, "tokenizer_user.model")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()), model_prefix=path[:-len(".model")], vocab_size=512,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True, user_defined_symbols=["USER"],
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    os.remove(path[:-len(".model")] + ".vocab")
    image, ignore = -200, -100

    def image_token_ids(prompt, tok):  # the original's tokenizer_image_token
        chunks = [tok(chunk).input_ids for chunk in prompt.split("<image>")]
        ids, offset = [], 0
        if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
            ids, offset = [chunks[0][0]], 1
        for k, chunk in enumerate(chunks):
            ids += ([image] * (offset + 1))[offset:] if k else []
            ids += chunk[offset:]
        return ids

    def prompt_of(template, turns, has_image):
        turns = list(turns)
        if has_image:  # preprocess_multimodal: the image first, on its own line
            turns[0] = ("<image>\n" + turns[0].replace("<image>", "").strip()).strip()
        if template == "vicuna_v1":
            system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                      "helpful, detailed, and polite answers to the user's questions.")
            out = system + " "
            for k, turn in enumerate(turns):
                out += ("USER: " + turn + " ") if k % 2 == 0 else ("ASSISTANT: " + turn + "</s>")
            return out
        out = ""  # llama_2 (conv_llava_llama_2's system)
        system = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                  "that the user provides, and assist the user with a variety of tasks using natural language.")
        for k, turn in enumerate(turns):
            if k % 2 == 0:
                turn = (f"<<SYS>>\n{system}\n<</SYS>>\n\n" + turn) if k == 0 else turn
                out += "<s>" + f"[INST] {turn} [/INST]"
            else:
                out += " " + turn + " " + "</s>"
        return out[len("<s>"):]  # ret.lstrip("<s>") of the original strips the leading "<s>" characters

    def labels_of(template, prompt, ids, tok):  # preprocess_v1 / preprocess_llama_2 masking, 4.37 era
        sep = " ASSISTANT: " if template == "vicuna_v1" else "[/INST] "
        labels, cur = list(ids), 1
        labels[:1] = [ignore]
        for k, rou in enumerate(prompt.split("</s>")):
            if rou == "":
                break
            parts = rou.split(sep)
            if len(parts) != 2:
                break
            parts[0] += sep
            round_len = len(image_token_ids(rou, tok))
            instruction_len = len(image_token_ids(parts[0], tok)) - 2
            if k != 0 and not tok.legacy and template == "vicuna_v1":
                round_len, instruction_len = round_len - 1, instruction_len - 1
            labels[cur:cur + instruction_len] = [ignore] * instruction_len
            cur += round_len
        labels[cur:] = [ignore] * (len(labels) - cur)
        assert cur == len(ids), f"tokenization mismatch {cur} vs {len(ids)}: the original would mask the sample"
        return labels

    cases = []
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(path, os.path.join(folder, "tokenizer.model"))
        for legacy in (True, False):
            tok = LlamaTokenizer.from_pretrained(folder, legacy=legacy)
            for has_image, turns in RENDER_CONVERSATIONS:
                for template in ("vicuna_v1", "llama_2"):
                    prompt = prompt_of(template, turns, has_image)
                    ids = image_token_ids(prompt, tok)
                    cases.append({"template": "llava_llama_2" if template == "llama_2" else template, "legacy": legacy,
                                  "turns": turns, "prompt": prompt, "input_ids": ids,
                                  "labels": labels_of(template, prompt, ids, tok)})
                if has_image:  # preprocess_plain: "<image>" + caption + "\n", the caption and "\n" labelled
                    ids = image_token_ids("<image>" + turns[1] + "\n", tok)
                    n = len(image_token_ids("<image>", tok))
                    cases.append({"template": "plain", "legacy": legacy, "turns": turns[:2], "input_ids": ids,
                                  "labels": [ignore] * n + ids[n:]})
    with open(os.path.join(out_dir, "render_reference.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "cases": cases}, f, indent=1)


def make_render_1_6_reference(out_dir):
    """tests/fixtures/render_1_6.json: the prompt ids of LLaVA-1.6's conv_mistral_instruct and conv_chatml_direct
    (their get_prompt() strings, written out) through the original's tokenizer_image_token and the slow
    LlamaTokenizer of transformers 4.37, legacy true and false; ChatML with <|im_start|> / <|im_end|> as added
    special tokens and no bos, as the Yi-34B tokenizer has them."""
    import json
    import shutil
    import tempfile
    import transformers
    from transformers import LlamaTokenizer
    assert transformers.__version__.startswith("4.37."), "the reference is transformers 4.37 (LLaVA's pin)"
    prompts = {
        "mistral_instruct": "[INST] <image>\nWhat is in the picture? [/INST] A red circle on the left. </s>[INST] How "
                            "many? [/INST]",
        "chatml_direct": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is in "
                         "the picture?<|im_end|><|im_start|>assistant\nA red circle on the left.<|im_end|><|im_start|>"
                         "user\nHow many?<|im_end|><|im_start|>assistant\n"}

    def image_token_ids(prompt, tok):  # the original's tokenizer_image_token, one placeholder per image
        chunks = [tok(chunk).input_ids for chunk in prompt.split("<image>")]
        offset = int(bool(chunks[0]) and chunks[0][0] == tok.bos_token_id)
        ids = chunks[0][:offset]
        for k, chunk in enumerate(chunks):
            ids += [-200] * (k > 0) + chunk[offset:]
        return ids

    cases = []
    for legacy in (True, False):
        for name, prompt in prompts.items():
            with tempfile.TemporaryDirectory() as folder:
                shutil.copy(os.path.join(out_dir, "tokenizer.model"), folder)
                settings = {"legacy": legacy}
                if name == "chatml_direct":
                    settings["add_bos_token"] = False
                    with open(os.path.join(folder, "added_tokens.json"), "w") as f:
                        json.dump({"<|im_start|>": 512, "<|im_end|>": 513}, f)
                    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
                        json.dump({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, f)
                tok = LlamaTokenizer.from_pretrained(folder, **settings)
                cases.append({"template": name, "legacy": legacy, "settings": settings, "prompt": prompt,
                              "input_ids": image_token_ids(prompt, tok)})
    with open(os.path.join(out_dir, "render_1_6.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "cases": cases}, f)


# llava's fixture uses the llama tokenizer, so order matters
MAKERS = [
    ("llama", make_llama),
    ("clip", make_clip),
    ("llava", make_llava),
    ("llava_next", make_llava_next),
    ("render", make_render_reference),
    ("render_1_6", make_render_1_6_reference),
]

if __name__ == "__main__":
    wanted = sys.argv[1:] or [name for name, _ in MAKERS]
    for name, make in MAKERS:
        if name in wanted:
            make(FIXTURES)
            print(f"wrote {name} fixtures")
