"""The one image-safety policy of every decoder path (file streams, CSV image and caption
manifests): which files may be read, how large, and how each pixel mode becomes 8-bit.

- **Where**: a listed or found image must resolve (symlinks followed) inside its root
  (:func:`inside_root`); a symlink, ``..`` or absolute path leading out is refused unless
  the stream's ``allow_outside_root`` says so. A shared manifest or a tree with a planted
  link must not read files elsewhere on the machine.
- **How large**: the header's width x height is checked against PIL's decompression-bomb
  limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485 pixels unless a program changes it)
  before a pixel is decoded, on every decoder (torchvision's ``decode_image`` has no such
  check: a 15000x15000 PNG of a few KB would be decoded to 675 MB).
- **Modes** (the result is 8-bit ``L`` or ``RGB``, then ``[0, 1]`` by dividing by 255):
  ``I;16`` (16-bit PNG/TIFF) and ``I`` read from a PNG (whose samples have at most 16 bits)
  are scaled by ``255 / 65535``, as 8-bit images are by ``1 / 255``, never clipped at 255;
  ``I`` from other formats and ``F`` do not say their range: refused. ``1`` (bilevel) reads
  as 0/255. Alpha (``RGBA``, ``LA``, ``PA``, a palette or gray/RGB PNG with a
  ``transparency`` entry) is **composited on black**: a pixel is its colour times its
  opacity (premultiplied), so a fully transparent pixel is 0 whatever colour it stores, as
  padding elsewhere in Mneme is 0. ``CMYK``, ``YCbCr``, ``P`` and other modes convert with
  PIL's ``convert``; RGB to gray uses PIL's ITU-R 601-2 luma.

Every refusal is one :class:`ConfigError` line naming the file, where it was named
(``where``: the field, and the manifest line when there is one) and the fix.
"""

from __future__ import annotations

import io
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mneme.app.core.errors import ConfigError
from torch import Tensor

OPT_OUT = "data.benchmark_args.allow_outside_root: true"
TARGET_MODES = {1: "L", 3: "RGB"}
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
# Decoders raise these for unreadable data: PIL's UnidentifiedImageError is an OSError;
# truncated data OSError or SyntaxError ("broken PNG file"); bad deflate data zlib.error;
# torchvision's libjpeg/libpng RuntimeError.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, RuntimeError)


def inside_root(raw: str | Path, root: Path, where: str, allow_outside_root: bool) -> Path:
    """``root / raw`` resolved (symlinks followed); refused when it leaves ``root`` (an
    absolute path, ``..``, or a symlink pointing out) unless ``allow_outside_root``, and
    when it cannot be resolved (a NUL byte, a symlink loop)."""
    inside = root.resolve()
    try:
        path = (root / raw).resolve()
    except (OSError, RuntimeError, ValueError) as err:
        raise ConfigError(f"{where}: image path {str(raw)!r} cannot be resolved ({err})") from None
    if not allow_outside_root and not path.is_relative_to(inside):
        how = (
            "an absolute path"
            if Path(raw).is_absolute()
            else "'..' leads out"
            if ".." in Path(raw).parts
            else "a symlink leads out"
        )
        raise ConfigError(
            f"{where}: image '{raw}' is outside root '{inside}' ({how}, to '{path}'); keep "
            f"images under the root (copy the file in, not a link), or set {OPT_OUT}"
        )
    return path


def _read_error(path: Path | str, where: str, err: BaseException) -> ConfigError:
    reason = " ".join(str(err).split())[:200]
    return ConfigError(
        f"{where}: cannot read image '{path}' ({reason}); replace the file or remove it"
    )


def open_checked(data: bytes, path: Path | str, where: str) -> Any:
    """The PIL image of ``data`` with only its header read, refused when its pixel count
    is over ``PIL.Image.MAX_IMAGE_PIXELS`` (nothing decoded yet)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # the limit is checked below, as an error
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # over twice the limit: PIL's own refusal
        raise _too_large(path, where, str(err)) from None
    except DECODE_ERRORS as err:
        raise _read_error(path, where, err) from None
    limit = Image.MAX_IMAGE_PIXELS
    width, height = img.size
    if limit is not None and width * height > limit:
        img.close()
        raise _too_large(path, where, f"{width}x{height} = {width * height:,} pixels")
    return img


def _too_large(path: Path | str, where: str, what: str) -> ConfigError:
    from PIL import Image

    return ConfigError(
        f"{where}: image '{path}' is too large ({what}; over the decompression-bomb limit "
        f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS:,}); shrink the image"
    )


def eight_bit(img: Any, channels: int, path: Path | str, where: str) -> Any:
    """``img`` (a PIL image) as 8-bit ``L`` (``channels`` 1) or ``RGB`` (3), by the mode
    rules of the module docstring."""
    from PIL import Image

    target = TARGET_MODES[channels]
    mode = img.mode
    if mode in SIXTEEN_BIT or (mode == "I" and img.format == "PNG"):
        values = np.asarray(img, dtype=np.float64)
        scaled = np.clip(values * (255.0 / 65535.0), 0, 255).round().astype(np.uint8)
        return Image.fromarray(scaled, "L").convert(target)
    if mode in ("I", "F"):
        raise ConfigError(
            f"{where}: image '{path}' is {mode} mode (32-bit values of unknown range); save "
            "it as an 8- or 16-bit image"
        )
    if mode == "1":
        return img.convert("L").convert(target)
    if "A" in mode or "a" in mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert(target)
    return img if mode == target else img.convert(target)


def decode_pil(path: Path | str, channels: int, where: str) -> Any:
    """The image at ``path`` as a loaded 8-bit ``L``/``RGB`` PIL image (the policy's own
    decoder: timm transforms and the CSV caption stream take PIL images)."""
    data = _read_bytes(path, where)
    img = open_checked(data, path, where)
    try:  # no file to close: PIL reads from memory
        img.load()
        return eight_bit(img, channels, path, where)
    except DECODE_ERRORS as err:
        raise _read_error(path, where, err) from None


def decode_uint8(path: Path | str, channels: int, where: str) -> Tensor:
    """The image at ``path`` as a uint8 ``(channels, H, W)`` tensor. Plain 8-bit gray or RGB
    JPEG/PNG files (the common case) decode with ``torchvision.io.decode_image``; every
    other mode goes through :func:`decode_pil`, so both decoders follow one policy."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import pil_to_tensor

    data = _read_bytes(path, where)
    img = open_checked(data, path, where)
    with img:
        plain = (
            img.format in ("JPEG", "PNG")
            and img.mode in ("L", "RGB")
            and "transparency" not in img.info
        )
    if plain:
        mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        try:
            with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec, each call
                warnings.simplefilter("ignore", DeprecationWarning)
                image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode)
        except DECODE_ERRORS as err:
            raise _read_error(path, where, err) from None
        if image.dtype == torch.uint8:
            return image
        # a 16-bit PNG that PIL reports as RGB: PIL's decoding states the depth
    return pil_to_tensor(decode_pil(path, channels, where))


def _read_bytes(path: Path | str, where: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise _read_error(path, where, err) from None
