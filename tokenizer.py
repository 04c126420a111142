"""The sentencepiece tokenizer of LLaMA-family checkpoints (tokenizer.model), and a streaming decoder for chat.

    tok = Tokenizer("path/to/vicuna-7b-v1.5")       # the folder's tokenizer.model, or the file itself
    ids = tok.encode("Hello")                         # [bos] + pieces
    stream = tok.stream(); text = "".join(stream.push(i) for i in ids) + stream.flush()
"""
import json
import os
import re
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
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()  # LLaVA pads with unk
        self.vocab_size = self.sp.get_piece_size()
        self.added_file = os.path.join(os.path.dirname(file), "added_tokens.json")
        self.added = read_added_tokens(self.added_file, self.vocab_size)  # {token: id}, ids after the pieces
        # bos and eos by name, special_tokens_map.json over tokenizer_config.json as transformers reads them: LLaVA
        # v0's tokenizer names "</s>" its bos, so the original's prompts for those weights start with id 2
        names_file = os.path.join(os.path.dirname(file), "special_tokens_map.json")
        names = read_json(names_file) if os.path.isfile(names_file) else {}
        if not isinstance(names, dict):
            raise ValueError(f"{names_file}: expected a JSON object")
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        for attr, key in (("bos_id", "bos_token"), ("eos_id", "eos_token")):
            source, token = (names_file, names[key]) if key in names else (config, settings.get(key))
            token = token.get("content") if isinstance(token, dict) else token  # an AddedToken's fields
            if token not in (None, ""):  # "": how early LLaMA conversions wrote a token they left unset
                setattr(self, attr, self.piece_id(token, f"{source}: {key}"))

    def piece_id(self, token, where) -> int:
        """The id of a token named in a settings file (a sentencepiece piece or an added token)."""
        known = isinstance(token, str) and (token in self.added or self.sp.piece_to_id(token) != self.sp.unk_id()
                                            or token == self.sp.id_to_piece(self.sp.unk_id()))
        if not known:
            raise ValueError(f"{where}={json.dumps(token)} is neither a piece of tokenizer.model nor an added token")
        return self.added.get(token, self.sp.piece_to_id(token))

    def single_id(self, text: str):
        """The id of a text that is one token of its own (an added token or a piece: ChatML's <|im_end|>), else None."""
        if text in self.added:
            return self.added[text]
        i = self.sp.piece_to_id(text) if text else self.sp.unk_id()
        return None if i == self.sp.unk_id() else i

    def token_id(self, token: str) -> int:
        """The id of an added token (added_tokens.json beside tokenizer.model: LLaVA v0's <im_start>, <im_end>)."""
        if token not in self.added:
            raise KeyError(f"{self.added_file}: no added token {token!r} (has: {', '.join(self.added) or 'none'})")
        return self.added[token]

    def encode(self, text: str, bos=True, eos=False) -> list:
        """Added tokens written in the text are their ids, and each chunk around them is encoded on its own, as the
        HF slow tokenizer does (legacy: with the dummy prefix; not legacy: bare after an added token)."""
        if not self.added:
            return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos
        ids = [self.bos_id] * bos
        for n, chunk in enumerate(re.split("(" + "|".join(map(re.escape, self.added)) + ")", text)):
            ids += [self.added[chunk]] if n % 2 else self.encode_text(chunk, n == 0 or self.legacy) if chunk else []
        return ids + [self.eos_id] * eos

    def encode_text(self, text: str, prefix=True) -> list:
        """Pieces of a text chunk: with sentencepiece's dummy prefix (a word start), or bare (non-legacy, after a
        special token)."""
        return (self.sp if prefix else self.sp_bare).encode(text)

    def decode(self, ids) -> str:  # ids past the vocabulary (llava-hf pads its 32000 to 32064 rows) decode to ""
        return self.sp.decode([i for i in map(int, ids) if 0 <= i < self.vocab_size])

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


def read_added_tokens(file, vocab_size) -> dict:
    """added_tokens.json ({token: id}, transformers' file for tokens added after the sentencepiece pieces), or {}.
    The ids must follow the pieces: vocab_size, vocab_size + 1, ... (the rows the model's embeddings grew by)."""
    if not os.path.isfile(file):
        return {}
    added = read_json(file)
    if not isinstance(added, dict) or not all(isinstance(k, str) and k and type(v) is int for k, v in added.items()):
        raise ValueError(f"{file}: expected a JSON object {{token: integer id}}")
    if sorted(added.values()) != list(range(vocab_size, vocab_size + len(added))):
        raise ValueError(f"{file}: ids {sorted(added.values())} do not follow the tokenizer's {vocab_size} pieces "
                         f"({vocab_size}..{vocab_size + len(added) - 1} expected)")
    return added


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
