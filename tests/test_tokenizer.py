"""tokenizer.py: the sentencepiece tokenizer equals raw sentencepiece, round-trips every text, and streams text that
never splits a character."""
import json
import os
import re
import shutil

import pytest
import sentencepiece as spm
import torch

from tokenizer import Tokenizer, copy_tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FIXTURE = os.path.join(FIXTURES, "tokenizer.model")


TEXTS = ["USER: What colour is the circle?\nASSISTANT: Red.", "  two leading spaces,   runs    of spaces  ",
         "line one\n\nline three\n", "naïve café, Größe, 東京, Ελληνικά", "emoji 🐍🎉 and 👩‍👩‍👧 family", "\t tab\t",
         "", "1234567890 3.14"]


def test_tokenizer_special_ids():
    tokenizer = Tokenizer(FIXTURES)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size) == (1, 2, 0, 512)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_equals_raw_sentencepiece_and_round_trips(text):
    tokenizer = Tokenizer(FIXTURES)
    raw = spm.SentencePieceProcessor(model_file=os.path.join(FIXTURES, "tokenizer.model"))
    ids = tokenizer.encode(text, bos=False)
    assert ids == raw.encode(text)
    assert tokenizer.encode(text, bos=True, eos=True) == [1] + ids + [2]
    assert tokenizer.decode(ids) == text  # byte fallback and identity normalisation keep everything


@pytest.mark.parametrize("text", TEXTS)
def test_ids_past_the_pieces_decode_to_nothing(text):
    # a model with a padded vocabulary (llava-hf: 32064 rows, 32000 pieces) may sample an id past the pieces
    tokenizer = Tokenizer(FIXTURES)
    ids = tokenizer.encode(text, bos=False)
    assert tokenizer.decode(ids + [512, 600]) == text and tokenizer.stream().push(511 + 64) == ""


def test_emoji_become_byte_pieces():
    tokenizer = Tokenizer(FIXTURES)
    assert any(tokenizer.sp.id_to_piece(i).startswith("<0x") for i in tokenizer.encode(TEXTS[4]))


def test_corrupt_tokenizer_model_names_the_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model" * 10)
    with pytest.raises(ValueError, match=r"tokenizer\.model: not a sentencepiece model"):
        Tokenizer(tmp_path)


def test_stream_equals_full_decode_and_never_splits_a_character():
    tokenizer = Tokenizer(os.path.join(FIXTURES, "tokenizer.model"))
    sequences = [tokenizer.encode(text, bos=False) for text in TEXTS]
    generator = torch.Generator().manual_seed(0)
    sequences += [torch.randint(3, 512, (40,), generator=generator).tolist() for _ in range(20)]  # any id order
    for ids in sequences:
        stream = tokenizer.stream()
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == tokenizer.decode(ids)


def test_stream_never_splits_a_character():
    tokenizer = Tokenizer(os.path.join(FIXTURES, "tokenizer.model"))
    stream = tokenizer.stream()
    pieces = [stream.push(i) for i in tokenizer.encode("a 🐍 b", bos=False)]
    assert "" in pieces and any("🐍" in p for p in pieces)  # held back until the emoji's last byte arrives
    assert not any("\ufffd" in p for p in pieces)


def test_missing_tokenizer_names_the_path():
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer("/nowhere/tokenizer.model")


def test_tokenizer_takes_pathlib_folders_and_files():
    from pathlib import Path
    tokenizer = Tokenizer(FIXTURES)
    for path in [Path(FIXTURES), Path(FIXTURES) / "tokenizer.model"]:
        assert Tokenizer(path).encode("red circle") == tokenizer.encode("red circle")


# ----------------------------------------------------------------------------------------------------- sampling


def tokenizer_folder(tmp_path, **settings):
    shutil.copy(FIXTURE, tmp_path / "tokenizer.model")
    if settings:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    return Tokenizer(tmp_path)


def test_no_tokenizer_config_means_legacy_with_bos(tmp_path):
    tok = tokenizer_folder(tmp_path)
    assert tok.legacy and tok.add_bos


def test_legacy_null_means_legacy_as_transformers_reads_it(tmp_path):
    assert tokenizer_folder(tmp_path, legacy=None).legacy


def test_non_legacy_encodes_text_after_a_special_token_without_the_dummy_prefix(tmp_path):
    tok = tokenizer_folder(tmp_path, legacy=False)
    assert tok.sp.id_to_piece(tok.encode_text("USER: hi", prefix=False)[0]) == "US"
    assert tok.sp.id_to_piece(tok.encode_text("USER: hi")[0]) == "▁USER"  # a word start keeps it


@pytest.mark.parametrize("settings, message", [
    ({"add_eos_token": True}, "add_eos_token=true is not supported"),
    ({"legacy": "no"}, 'legacy="no" is not supported'),
    ({"add_bos_token": 1}, "add_bos_token=1 is not supported"),
])
def test_unsupported_tokenizer_settings_name_the_file_and_key(tmp_path, settings, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        tokenizer_folder(tmp_path, **settings)
    assert "tokenizer_config.json" in str(e.value)


def test_copy_tokenizer_takes_the_settings_files_beside_the_model(tmp_path):
    (tmp_path / "a").mkdir()
    tokenizer_folder(tmp_path / "a", legacy=False)
    (tmp_path / "b").mkdir()
    copy_tokenizer(str(tmp_path / "a" / "tokenizer.model"), str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path / "b")) == ["tokenizer.model", "tokenizer_config.json"]
    assert not Tokenizer(tmp_path / "b").legacy


def added_tokens_folder(tmp_path, added):
    shutil.copy(FIXTURE, tmp_path / "tokenizer.model")
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    return tmp_path


V0_ADDED = {"<im_patch>": 512, "<im_start>": 513, "<im_end>": 514}  # LLaVA v0's, after LLaMA's pieces


def test_added_tokens_encode_to_their_ids(tmp_path):
    tok = Tokenizer(added_tokens_folder(tmp_path, V0_ADDED))
    assert tok.encode("<im_start>", bos=False) == [513] and tok.token_id("<im_end>") == 514
    # each chunk around them on its own, with its dummy prefix, as transformers' (legacy) slow tokenizer splits them
    assert tok.encode("a <im_start><im_patch><im_end>\nb") == [1, *tok.sp.encode("a "), 513, 512, 514,
                                                              *tok.sp.encode("\nb")]


def test_added_token_ids_decode_to_nothing(tmp_path):  # as skip_special_tokens: they are never text
    tok = Tokenizer(added_tokens_folder(tmp_path, V0_ADDED))
    assert tok.decode(tok.encode("hi <im_start>", bos=False)) == "hi "


def test_a_missing_added_token_names_the_file(tmp_path):
    with pytest.raises(KeyError, match=r"added_tokens\.json: no added token '<im_start>'"):
        Tokenizer(FIXTURES).token_id("<im_start>")


@pytest.mark.parametrize("added", [{"<im_start>": 600}, {"<a>": 512, "<b>": 512}, {"<a>": "512"}, ["<a>"]])
def test_added_token_ids_must_follow_the_pieces(tmp_path, added):
    with pytest.raises(ValueError, match=r"added_tokens\.json: "):
        Tokenizer(added_tokens_folder(tmp_path, added))


V0_NAMES = {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "[PAD]", "unk_token": "<unk>"}  # LLaVA v0's


def test_special_tokens_map_names_the_bos_as_transformers_reads_it(tmp_path):
    """LLaVA v0's special_tokens_map.json names "</s>" its bos, and wins over tokenizer_config.json's "<s>"."""
    folder = added_tokens_folder(tmp_path, {**V0_ADDED, "[PAD]": 515})
    (folder / "special_tokens_map.json").write_text(json.dumps(V0_NAMES))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"__type": "AddedToken", "content": "<s>"}}))
    # recorded from transformers 4.37.2: LlamaTokenizer.from_pretrained(folder)("a <im_start>...").input_ids
    assert Tokenizer(folder).encode("a <im_start><im_patch><im_end>\nb") == [2, 264, 449, 513, 512, 514, 449, 13, 465]


def test_an_unknown_special_token_names_file_and_key(tmp_path):
    folder = added_tokens_folder(tmp_path, V0_ADDED)
    (folder / "special_tokens_map.json").write_text(json.dumps({**V0_NAMES, "eos_token": "<eos>"}))
    with pytest.raises(ValueError, match=r"special_tokens_map\.json: eos_token=\"<eos>\" is neither a piece"):
        Tokenizer(folder)
