"""Image bytes → a uint8 RGB array at the model's input size (pure Pillow/numpy, no Ray).

:func:`decode_image` is the one entry point. It either returns
``(pixels, width, height)`` — ``pixels`` a uint8 ``size×size×3`` RGB array, ``width``/``height``
the image's size *as displayed* (after EXIF rotation) — or raises :class:`ImageDecodeError`
whose message starts with a short kind (``empty file``, ``not an image``, ``truncated or corrupt``,
``decompression bomb``, ``unsupported``) followed by the detail. The scoring job turns that
message into a ``status='error'`` row; it never crashes a job.

Conversion rules (documented in docs/scoring-job.md, recorded in run.json as ``resize``):

* Formats: JPEG/MPO, PNG, WebP, BMP, GIF, TIFF only (others are refused as ``not an image``:
  a scoring corpus has no business exercising Pillow's rarer decoders). Multi-frame files
  (animated GIF/WebP, multi-page TIFF) use their first frame.
* Pillow's decompression-bomb guard is kept at Pillow's own limit (``Image.MAX_IMAGE_PIXELS``):
  its *warning* (more than the limit) and its *error* (more than twice it) both become
  ``decompression bomb`` errors. Images below the limit, however large, are decoded (JPEGs
  through Pillow's draft mode, which decodes at a reduced scale close to the target size).
* EXIF orientation is applied (``ImageOps.exif_transpose``); unreadable EXIF is ignored.
* Modes: ``L``/``1``/``P``/``CMYK``/``YCbCr``/``LAB``/``HSV`` → RGB by Pillow's ``convert``
  (grayscale replicated; CMYK by Pillow's naive formula, ICC profiles are not applied).
  16-bit integer modes (``I;16*``, ``I``) are scaled by 255/65535; float ``F`` is taken as
  [0, 1] when its maximum is ≤ 1, else as [0, 255], and clipped.
  Anything with transparency (``RGBA``, ``LA``, ``PA``, ``P``/``RGB``/``L`` with a
  ``transparency`` key) is alpha-composited on an opaque **white** background
  (:data:`BACKGROUND`).
* Resize policies (:data:`RESIZE_POLICIES`), all with Pillow's antialiased BILINEAR filter:
  ``crop`` (default): the largest centred square is resized to ``size×size``;
  ``stretch``: the whole image is resized to ``size×size`` (aspect ratio not kept).
  An image already ``size×size`` is passed through unchanged; a 1×1 image is upsampled.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from odin_engine.errors import short_error

BACKGROUND = (255, 255, 255)
RESIZE_POLICIES = ("crop", "stretch")
Image.init()  # register every plugin so that the names below resolve
FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF") if f in Image.OPEN)
_MAX_ERROR_CHARS = 300


class ImageDecodeError(ValueError):
    """The bytes cannot be turned into a well-defined RGB image; the message says why."""


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → ``RGB`` following the rules in the module docstring."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            top = 1.0 if (arr.size and np.nanmax(arr) <= 1.0) else 255.0
        else:
            top = 65535.0
        arr = np.nan_to_num(arr, nan=0.0, posinf=top, neginf=0.0)
        gray = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def _crop_box(width: int, height: int, policy: str) -> tuple[int, int, int, int]:
    if policy == "stretch":
        return (0, 0, width, height)
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return (left, top, left + side, top + side)


def decode_image(data: bytes, size: int, policy: str = "crop") -> tuple[np.ndarray, int, int]:
    """Decode ``data`` to ``(uint8 size×size×3 RGB array, width, height)``.

    ``width``/``height`` are the displayed size (after EXIF rotation), before resizing.
    Raises :class:`ImageDecodeError` with a one-line message for anything that is not a
    decodable image; raises ``ValueError`` for a bad ``size``/``policy`` (a caller bug).
    """
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}; got {policy!r}")
    if int(size) < 1:
        raise ValueError(f"size must be >= 1; got {size!r}")
    size = int(size)
    if not data:
        raise ImageDecodeError("empty file: 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = img.size  # the file's full size, before any draft-mode reduction
            if img.format in ("JPEG", "MPO"):
                # Decode at the smallest libjpeg scale still >= the target size.
                img.draft("RGB", (size, size))
            img.load()
            try:
                turned = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001 - unreadable EXIF: keep the stored orientation
                turned = img
            if turned.size != img.size and turned.size == img.size[::-1]:
                width, height = height, width
            img = turned
            rgb = _to_rgb(img)
            if rgb.size != (size, size):
                box = _crop_box(rgb.width, rgb.height, policy)
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, box=box)
            arr = np.asarray(rgb, dtype=np.uint8)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"not an image (or not one of {', '.join(FORMATS)}): {short_error(exc, _MAX_ERROR_CHARS)}") from None
    except (OSError, SyntaxError, EOFError, IndexError, struct.error) as exc:
        raise ImageDecodeError(f"truncated or corrupt: {short_error(exc, _MAX_ERROR_CHARS)}") from None
    except (ValueError, TypeError, MemoryError, NotImplementedError) as exc:
        raise ImageDecodeError(f"unsupported: {short_error(exc, _MAX_ERROR_CHARS)}") from None
    except Exception as exc:  # noqa: BLE001 - a decoder bug on hostile bytes is still a row error
        raise ImageDecodeError(f"undecodable: {short_error(exc, _MAX_ERROR_CHARS)}") from None
    if arr.shape != (size, size, 3):  # defensive: never hand the model a wrong shape
        raise ImageDecodeError(f"unsupported: decoded to shape {arr.shape}, expected {(size, size, 3)}")
    return arr, width, height
