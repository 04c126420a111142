"""The sentencepiece tokenizer of LLaMA-family checkpoints (tokenizer.model), and a streaming decoder for chat.

    tok = Tokenizer("path/to/vicuna-7b-v1.5")       # the folder's tokenizer.model, or the file itself
    ids = tok.encode("Hello")                         # [bos] + pieces
    stream = tok.stream(); text = "".join(stream.push(i) for i in ids) + stream.flush()
"""
import json
import os
import shutil

import sentencepiece as spm

from fileio import read_json

# ModelProto field 3 (normalizer_spec) holding add_dummy_prefix = false; protobuf merges a repeated message field
BARE = b"\x1a\x02\x18\x00"
FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
SETTINGS = {"legacy": (True, False, None), "add_bos_token": (True, False), "add_eos_token": (False,)}  # allowed


class Tokenizer:
    """`legacy`, `add_bos_token` and `add_eos_token` come from tokenizer_config.json beside tokenizer.model, read as
    transformers 4.37 (the version LLaVA pins) reads them: no `legacy` key means legacy. A non-legacy tokenizer puts
    no dummy-prefix space before text that follows a special token ("</s>USER" -> "US", "ER", not "▁USER")."""

    def __init__(self, path):
        file = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else os.fspath(path)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no sentencepiece tokenizer at {file}")
        config = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        settings = read_json(config) if os.path.isfile(config) else {}
        if not isinstance(settings, dict):
            raise ValueError(f"{config}: expected a JSON object")
        for key, allowed in SETTINGS.items():  # "add_eos_token": LLaVA's templates end each turn themselves
            if key in settings and not any(settings[key] is value for value in allowed):
                raise ValueError(f"{config}: {key}={json.dumps(settings[key])} is not supported (supported: "
                                 f"{', '.join(map(json.dumps, allowed))})")
        self.legacy, self.add_bos = settings.get("legacy") is not False, settings.get("add_bos_token", True)
        try:
            with open(file, "rb") as f:
                proto = f.read()
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
            self.sp_bare = self.sp if self.legacy else spm.SentencePieceProcessor(model_proto=proto + BARE)
        except (RuntimeError, OSError) as e:  # sentencepiece's own message names neither the file nor the cause
            raise ValueError(f"{file}: not a sentencepiece model ({e})") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()  # LLaVA pads with unk
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str, bos=True, eos=False) -> list:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def encode_text(self, text: str, prefix=True) -> list:
        """Pieces of a text chunk: with sentencepiece's dummy prefix (a word start), or bare (non-legacy, after a
        special token)."""
        return (self.sp if prefix else self.sp_bare).encode(text)

    def decode(self, ids) -> str:  # ids past the vocabulary (llava-hf pads its 32000 to 32064 rows) decode to ""
        return self.sp.decode([i for i in map(int, ids) if 0 <= i < self.vocab_size])

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


def copy_tokenizer(file, folder):
    """tokenizer.model and the settings files beside it (those that exist) into `folder`."""
    for name in FILES:
        source = os.path.join(os.path.dirname(file), name) if name != "tokenizer.model" else file
        if os.path.isfile(source):
            shutil.copy(source, os.path.join(folder, name))


class StreamDecoder:
    """Incremental decoding: push ids one by one, get the new text. Decoding the whole sequence every time (not
    piece by piece) keeps sentencepiece's leading-space rule and byte-fallback characters exactly as decode()."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token_id) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete: wait for its next byte
            return ""
        new, self.text = text[len(self.text):], text
        return new

    def flush(self) -> str:  # what push held back if the ids end inside a character (decode shows U+FFFD)
        text = self.tokenizer.decode(self.ids)
        new, self.text = text[len(self.text):], text
        return new
