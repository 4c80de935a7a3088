"""Decoding image bytes and the eval preprocessing, with per-image errors.

One bad file must never fail a job: :func:`decode_image` raises :class:`RejectedImage`
with a short machine-readable reason, and callers record it.

Every reader of images (the labeler, the trainer's feeds, evaluation) decodes through
:func:`decode_image`, so an image means the same pixels everywhere: as an image viewer shows
it (EXIF orientation applied; transparency flattened onto :data:`BACKGROUND`).
"""

from __future__ import annotations

import base64
import io
import logging
import math
import warnings
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps, UnidentifiedImageError

from core.phash import SIDE, hash_input, phash_many
from core.storage import read_bytes

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
# Transparent pixels become white, as image viewers and browsers show them on a page. Flattening
# (rather than dropping alpha, PIL's convert("RGB")) keeps drawings that live only in the alpha
# channel: black RGB everywhere with ink in alpha would otherwise decode as a blank image.
BACKGROUND = (255, 255, 255)
# Reasons a row can be rejected before decoding, set by the readers (``read_error`` starts with one)
READ_REASONS = ("unreadable", "no_image", "damaged_shard")


class RejectedImage(Exception):
    """An image that cannot be used; ``reason`` is one of the documented reject reasons."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _to_mode(img: Image.Image, in_chans: int) -> Image.Image:
    """Convert odd modes (CMYK, 16-bit, palette, LA, ...) rather than reject them; any
    transparency (RGBA, LA, PA, palette or single-colour ``transparency``) is flattened onto
    :data:`BACKGROUND` first."""
    target = "L" if in_chans == 1 else "RGB"
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) or 1.0
        img = Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray((np.asarray(img) * 255.0).clip(0, 255).astype(np.uint8), "L")
    elif img.has_transparency_data:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba)
    return img.convert(target)


def _upright(img: Image.Image) -> Image.Image:
    """The pixels as a viewer shows them: the EXIF Orientation tag applied (phones store photos
    rotated and set the tag). A malformed EXIF block leaves the pixels as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a broken tag is not a broken image
        return img


def decode_image(
    data: bytes, in_chans: int = 3, max_pixels: int = DEFAULT_MAX_PIXELS, scale_size: int | None = None
) -> Image.Image:
    """Decode bytes into a PIL image in ``L`` (``in_chans`` 1) or ``RGB`` mode, upright (EXIF
    orientation applied) and with transparency flattened onto :data:`BACKGROUND`.

    ``scale_size``: the shorter side the caller will resize the image to (:func:`resize_center_crop`);
    the image is then also rejected, from its header and before anything is decoded, when that resize
    would make more than ``max_pixels`` pixels (:func:`resized_size`: a 2,000,000 x 1 strip, 2 Mpx and a
    few KB, becomes 512,000,000 x 256 = 131 Gpx for a 224 px model). So ``max_pixels`` bounds what
    decoding and resizing allocate alike (about 4 bytes a pixel, a few copies).

    Raises:
        RejectedImage: ``empty``, ``too_large`` (over ``max_pixels`` pixels, decoded or resized to
            ``scale_size``; or out of memory while decoding), ``not_an_image``, ``truncated``,
            ``undecodable`` or ``unsupported_mode``.
    """
    if not data:
        raise RejectedImage("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise RejectedImage("too_large", f"{img.width}x{img.height} > {max_pixels} pixels")
            if scale_size is not None:
                _check_resize(img.size, scale_size, max_pixels)
            img.load()
    except RejectedImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RejectedImage("too_large", str(err)) from err
    except MemoryError as err:
        raise RejectedImage("too_large", "out of memory while decoding") from err
    except UnidentifiedImageError as err:
        raise RejectedImage("not_an_image", str(err)) from err
    except OSError as err:
        reason = "truncated" if "truncated" in str(err) else "undecodable"
        raise RejectedImage(reason, str(err)) from err
    except Exception as err:  # any decoder bug is still one bad file, not a failed job
        raise RejectedImage("undecodable", f"{type(err).__name__}: {err}") from err
    try:
        return _to_mode(_upright(img), in_chans)
    except MemoryError as err:
        raise RejectedImage("too_large", f"out of memory converting {img.width}x{img.height} {img.mode}") from err
    except Exception as err:
        raise RejectedImage("unsupported_mode", f"{img.mode}: {err}") from err


def resized_size(size: tuple[int, int], scale_size: int) -> tuple[int, int]:
    """(width, height) of an image of ``size`` with its shorter side resized to ``scale_size`` (timm's
    eval geometry, :func:`resize_center_crop`); the longer side grows with it."""
    w, h = size
    if w <= h:
        return scale_size, max(scale_size, int(round(h * scale_size / w)))
    return max(scale_size, int(round(w * scale_size / h))), scale_size


def _check_resize(size: tuple[int, int], scale_size: int, max_pixels: int) -> None:
    """Raise ``too_large`` when resizing an image of ``size`` to a shorter side of ``scale_size``
    would make more than ``max_pixels`` pixels (PIL holds 4 bytes a pixel in RGB)."""
    if min(size) < 1:
        return  # PIL refuses a zero-sized image itself (undecodable)
    new_w, new_h = resized_size(size, scale_size)
    if new_w * new_h > max_pixels:
        raise RejectedImage(
            "too_large",
            f"{size[0]}x{size[1]} resized to a shorter side of {scale_size} would be {new_w}x{new_h} = "
            f"{new_w * new_h:,} pixels (about {new_w * new_h * 4 / 2**20:,.0f} MB) > max_pixels {max_pixels:,}",
        )


# WebDataset shard names: a tar archive, plain or compressed as Python's tarfile reads it (labeler.tar_reader)
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
CONTAINER_SUFFIXES = (*SHARD_SUFFIXES, ".parquet")


def is_container(path: str) -> bool:
    """True for a shard or Parquet file: a pseudo-labeled row's ``path`` that is not one image."""
    return path.lower().endswith(CONTAINER_SUFFIXES)


def read_failure(reason: str, detail: str) -> str:
    """The ``read_error`` text of a row a reader could not produce: ``"<reason>: <detail>"``."""
    assert reason in READ_REASONS, reason
    return f"{reason}: {detail}"[:300]


def read_reason(read_error: str) -> str:
    """The reject reason of a ``read_error`` text (``unreadable`` when it names none)."""
    reason = read_error.split(":", 1)[0]
    return reason if reason in READ_REASONS else "unreadable"


def resize_center_crop(
    img: Image.Image, image_size: int, crop_pct: float = 1.0, interpolation: str = "bilinear"
) -> np.ndarray:
    """Eval geometry as timm's ``transforms_factory`` does it: shorter side to
    ``floor(image_size / crop_pct)`` with ``interpolation`` (a timm name: bilinear, bicubic, ...), then a
    centre crop of ``image_size``.

    Returns uint8 HxWxC (C = 1 or 3); normalisation happens next to the model.
    """
    # our own loop over PIL rather than torchvision's Resize/CenterCrop: it runs per image inside Ray
    # Data decode tasks on numpy arrays; the geometry (floor of the scale size) is timm's
    from timm.data.transforms import str_to_pil_interp

    scale_size = math.floor(image_size / crop_pct)
    new_w, new_h = resized_size(img.size, scale_size)
    img = img.resize((new_w, new_h), str_to_pil_interp(interpolation))
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def normalize(batch_hwc: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]):
    """uint8 NHWC numpy -> float32 NCHW torch tensor, normalised."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(batch_hwc)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def decode_into(
    out: np.ndarray,
    read: Callable,
    src,
    image_size: int,
    in_chans: int,
    crop_pct: float = 1.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    interpolation: str = "bilinear",
    hash_out: np.ndarray | None = None,
) -> str | None:
    """Decode ``read(src)`` into ``out`` (uint8 ``(image_size, image_size, in_chans)``) with the eval
    geometry (:func:`decode_image`, then :func:`resize_center_crop`); the one decode step of the
    labeler and of both training feeds, so an image is rejected for the same reasons everywhere.
    ``hash_out``: uint8 ``(32, 32)`` to fill with the decoded image's perceptual-hash input
    (:func:`core.phash.hash_input`, from the whole image, not the crop).

    Returns the reject reason (``out`` then untouched), or None when it decoded. An image whose
    resize would exceed ``max_pixels`` is ``too_large`` before it is decoded, and running out of memory
    while decoding or resizing is ``too_large`` too, never a failed task. ``read`` may raise
    :class:`RejectedImage` too (``unreadable``); any other exception propagates.
    """
    try:
        img = decode_image(read(src), in_chans, max_pixels, scale_size=math.floor(image_size / crop_pct))
        out[...] = resize_center_crop(img, image_size, crop_pct, interpolation)
        if hash_out is not None:
            hash_out[...] = hash_input(img)
        return None
    except RejectedImage as err:
        return err.reason
    except MemoryError:
        return "too_large"


def decode_batch(
    batch: dict[str, np.ndarray],
    image_size: int,
    crop_pct: float,
    in_chans: int,
    max_pixels: int,
    keep_bytes: bool = False,
    interpolation: str = "bilinear",
    phash: bool = False,
) -> dict[str, np.ndarray]:
    """bytes -> fixed-size uint8 images; a bad image becomes a row with a reject reason.

    A row whose optional ``read_error`` is set (the reader could not produce its bytes) is
    rejected with the reason that ``read_error`` starts with (one of :data:`READ_REASONS`).
    With ``keep_bytes`` the encoded bytes ride along as ``encoded`` (for ``LabelOptions.keep_image_bytes``);
    with ``phash``, ``phash`` holds each image's 64-bit perceptual hash (uint64; 0 where rejected:
    :mod:`core.phash`).
    """
    n = len(batch["path"])
    images = np.zeros((n, image_size, image_size, in_chans), dtype=np.uint8)
    hash_inputs = np.zeros((n, SIDE, SIDE), dtype=np.uint8) if phash else None
    reasons = np.full(n, "", dtype=object)
    read_errors = batch.get("read_error")
    for i, data in enumerate(batch["bytes"]):
        if read_errors is not None and isinstance(read_errors[i], str):  # nulls may arrive as None or NaN
            reasons[i] = read_reason(read_errors[i])
            continue
        src = data if data is not None else b""
        into = None if hash_inputs is None else hash_inputs[i]
        reason = decode_into(images[i], bytes, src, image_size, in_chans, crop_pct, max_pixels, interpolation, into)
        reasons[i] = reason or ""
    out = {"id": batch["id"], "path": batch["path"], "image": images, "reject_reason": reasons}
    if hash_inputs is not None:
        out["phash"] = np.where(reasons == "", phash_many(hash_inputs), np.uint64(0))
    if keep_bytes:
        out["encoded"] = batch["bytes"]
    if "unit" in batch:  # the input unit (labeler.units), for resumable writes
        out["unit"] = batch["unit"]
    return out


def thumbnail(path: str, size: int = 48, data: bytes | None = None) -> str | None:
    """A ``data:image/png;base64,...`` thumbnail (``size`` px on the long side) of the image
    ``data`` (bytes the labeler kept), else of the image file at ``path``; None when neither can
    be read as an image (e.g. a row from a Parquet or tar corpus labeled without its bytes)."""
    if data is None and is_container(path):
        return None  # a row of a shard or Parquet corpus without its bytes: never read the whole shard
    try:
        img = decode_image(data if data is not None else read_bytes(path))
    except (OSError, RejectedImage) as err:
        logger.debug(f"no thumbnail for {path}: {err}")
        return None
    scale = size / max(img.width, img.height)
    resample = Image.NEAREST if scale >= 2 else Image.BILINEAR  # small images (digits) stay crisp
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), resample)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_bytes(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """An image column as plain bytes: binary as is, or the ``bytes`` field of a Hugging Face struct
    (null where the struct itself is null)."""
    if pa.types.is_struct(col.type):
        return pa.chunked_array([pc.struct_field(c, "bytes") for c in col.chunks], type=col.type.field("bytes").type)
    return col
