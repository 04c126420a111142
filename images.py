"""Image files where they enter (data rows, chat, evaluation): read the way LLaVA reads them, with errors that name the
file, and refused from their header alone when their shape would make preprocessing blow up.
"""
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

# Padding or cropping to a square costs memory quadratic in the long side (a 157-byte 1x20000 PNG asked for 1.6 GB),
# and nothing in LLaVA's data is more than a few times wider than high: beyond this ratio an image is refused.
MAX_ASPECT_RATIO = 20
# Preprocessing is the processor's, bit for bit, up to this many times the output size (and, when cropping, this
# aspect ratio). Beyond, memory would grow with the input: bounded() reduces a larger image first.
EXACT_UP_TO = 4
READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def check_aspect_ratio(size, where) -> None:
    w, h = size
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ValueError(f"{where}: an image of {w}x{h} pixels is refused: more than {MAX_ASPECT_RATIO} times wider "
                         "than high or higher than wide (images.MAX_ASPECT_RATIO)")


def open_image(path) -> Image.Image:
    """The file opened lazily: its header read (size, mode), no pixel decoded yet."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        return Image.open(path)
    except READ_ERRORS as e:
        raise ValueError(f"cannot read image file {path}: {e}") from e


def header_problem(path):
    """None for a file whose header reads as an image of a sane aspect ratio, else (reason, message); no pixel is
    decoded, so it is cheap enough to check every row of a data file before training."""
    try:
        with open_image(path) as image:
            size = image.size
    except FileNotFoundError:
        return "image not found", f"no image file {path}"
    except (OSError, ValueError) as e:
        return "image unreadable", str(e)
    try:
        check_aspect_ratio(size, f"image file {path}")
    except ValueError as e:
        return "image aspect ratio", str(e)
    return None


def load_image(path) -> Image.Image:
    """The image file as RGB, like LLaVA's `Image.open(path).convert("RGB")` (alpha is dropped, not composited);
    16-bit grayscale is scaled to 8 bits first (to_8bit). Its aspect ratio is checked before a pixel is decoded."""
    with open_image(path) as image:
        check_aspect_ratio(image.size, f"image file {path}")
        try:
            image = to_8bit(image).convert("RGB")  # convert() decodes the whole file, so truncation shows up here
        except READ_ERRORS as e:
            raise ValueError(f"cannot read image file {path}: {e}") from e
    # a transparent colour (palette or tRNS) stays in info; LLaVA's processor (transformers 4.31) ignored it
    image.info.pop("transparency", None)
    return image


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale (modes I;16*, and I holding values past 255) as 8-bit L, 65535 -> 255: convert() clips at
    255, which turned a 16-bit PNG white. Other modes are returned as they are."""
    if not (image.mode == "I" or image.mode.startswith("I;16")):
        return image
    values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)  # (H, W)
    if image.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = (values * 255 + 32767) // 65535  # rounded
    return Image.fromarray(values.astype(np.uint8))


def bounded(image: Image.Image, size: int, pad_to_square: bool) -> Image.Image:
    """The image made small enough that preprocessing it to size x size costs a few times the output's memory, not
    the input's: a strip to be cropped keeps only its centre square, and a side past EXACT_UP_TO * size is box-reduced
    by an integer factor to 2-3x the size (pixels then differ from the processor's by about a level)."""
    w, h = image.size
    if not pad_to_square and max(w, h) > EXACT_UP_TO * min(w, h):  # only the centre survives the crop
        left, top = (w - min(w, h)) // 2, (h - min(w, h)) // 2
        image = image.crop((left, top, left + min(w, h), top + min(w, h)))
    side = max(image.size) if pad_to_square else min(image.size)  # the side that becomes `size`
    if side > EXACT_UP_TO * size:  # a pad canvas is side^2
        image = image.reduce(side // (2 * size))
    return image
