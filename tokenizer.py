"""The sentencepiece tokenizer of LLaMA-family checkpoints (tokenizer.model), and a streaming decoder for chat.

    tok = Tokenizer("path/to/vicuna-7b-v1.5")       # the folder's tokenizer.model, or the file itself
    ids = tok.encode("Hello")                         # [bos] + pieces
    stream = tok.stream(); text = "".join(stream.push(i) for i in ids) + stream.flush()
"""
import os

import sentencepiece as spm


class Tokenizer:
    def __init__(self, path):
        file = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else os.fspath(path)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no sentencepiece tokenizer at {file}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=file)
        except (RuntimeError, OSError) as e:  # sentencepiece's own message names neither the file nor the cause
            raise ValueError(f"{file}: not a sentencepiece model ({e})") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()  # LLaVA pads with unk
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str, bos=True, eos=False) -> list:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:  # ids past the vocabulary (llava-hf pads its 32000 to 32064 rows) decode to ""
        return self.sp.decode([i for i in map(int, ids) if 0 <= i < self.vocab_size])

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


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
