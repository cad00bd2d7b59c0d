"""JPEG decoding on the scoring GPU (``odin-audit score --decode-device cuda``).

The CPU tasks only read bytes (:func:`read_bytes`); the scoring actor
(:class:`GpuDecodeScoreBatch`) decodes the batch's JPEGs on its GPU in one call
(``torchvision.io.decode_jpeg(list, device="cuda")``), crops/resizes there (bilinear,
antialiased, as the CPU path) and scores. Whatever nvJPEG should not or cannot take — PNG and
other formats, EXIF-rotated or CMYK JPEGs, files over Pillow's pixel limit, a failed GPU
decode — goes through the CPU decoder (:func:`odin_engine.io.images.decode_image`) inside the
actor, so every row still comes out exactly once with the same statuses.

Pixels differ from the CPU path by resampling only (the CPU path decodes JPEGs at a reduced
libjpeg scale first): a throughput option, recorded in run.json's ``execution``.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from jobs.options import DECODE_DEVICES  # noqa: F401 (re-exported; the CLI choices live with the other options)
from jobs.pipeline import MAX_FILE_BYTES, ScoreBatch
from odin_engine.io.images import ImageDecodeError, _crop_box, decode_image

_READ_FIELDS = [pa.field("status", pa.string()), pa.field("error", pa.string()), pa.field("data", pa.binary())]


def read_bytes(batch: pa.Table, max_bytes: int = MAX_FILE_BYTES) -> pa.Table:
    """Ray Data stage 1 for GPU decoding (CPU tasks): uri → file bytes, or an error message.

    The same reads and verdicts as :func:`jobs.pipeline.read_and_decode` (transient failures
    retried, ``listing_error`` rows failed without a read), minus the decode.
    """
    from odin_engine.io.corpus import LISTING_ERROR
    from odin_engine.io.reading import ReadError, read_object

    listed = batch.column(LISTING_ERROR).to_pylist() if LISTING_ERROR in batch.column_names else None
    status, error, data = [], [], []
    for k, uri in enumerate(batch.column("uri").to_pylist()):
        if listed is not None and listed[k]:
            status.append("error"), error.append(listed[k]), data.append(None)
            continue
        try:
            blob = read_object(uri, max_bytes)
        except ReadError as exc:
            status.append("error"), error.append(str(exc)), data.append(None)
            continue
        status.append("ok"), error.append(None), data.append(blob)
    out = batch
    for f, values in zip(_READ_FIELDS, (status, error, data)):
        out = out.append_column(f, pa.array(values, f.type))
    return out


def gpu_decodable(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` if nvJPEG can decode ``data`` exactly as the CPU path would, else None."""
    from PIL import Image

    if not data or data[:2] != b"\xff\xd8":
        return None
    try:
        img = Image.open(io.BytesIO(data), formats=("JPEG",))
        if img.mode not in ("RGB", "L") or img.width * img.height > (Image.MAX_IMAGE_PIXELS or 1 << 62):
            return None
        if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation: the CPU path turns the image
            return None
        return img.size
    except Exception:  # noqa: BLE001 - let the CPU decoder word the error
        return None


def decode_batch_on_gpu(blobs: list[bytes], size: int, policy: str, device: str = "cuda") -> list[np.ndarray | None]:
    """Decode and resize JPEGs on ``device``; ``None`` where a file failed (decode it on the CPU)."""
    import warnings

    import torch
    import torch.nn.functional as F

    with warnings.catch_warnings():  # torchvision >= 0.29 points to TorchCodec; nvJPEG through it is the same
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    try:
        images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad file fails the batch call: decode one by one
        images = []
        for t in tensors:
            try:
                images.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(None)
    out: list[np.ndarray | None] = []
    for img in images:
        if img is None:
            out.append(None)
            continue
        h, w = img.shape[-2:]
        left, top, right, bottom = _crop_box(w, h, policy)
        x = img[:, top:bottom, left:right].unsqueeze(0).float()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy())
    return out


class GpuDecodeScoreBatch(ScoreBatch):
    """Ray Data stage 2 for GPU decoding (GPU actors): decode the batch's JPEGs on the GPU, then score."""

    def __init__(self, *args, policy: str = "crop", **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = policy
        self.decode_device = str(self.scorer.device)

    def decode(self, batch: pa.Table) -> pa.Table:
        """bytes → the columns :func:`jobs.pipeline.read_and_decode` makes (status, error, width, height, pixels)."""
        n = batch.num_rows
        status = batch.column("status").to_pylist()
        error = batch.column("error").to_pylist()
        blobs = batch.column("data").to_pylist()
        width, height, pixels = [None] * n, [None] * n, [None] * n
        on_gpu = {}
        for i in range(n):
            if status[i] == "ok":
                dims = gpu_decodable(blobs[i])
                if dims is not None:
                    on_gpu[i] = dims
        decoded = decode_batch_on_gpu([blobs[i] for i in on_gpu], self.size, self.policy, self.decode_device) \
            if on_gpu else []
        for (i, (w, h)), arr in zip(on_gpu.items(), decoded):
            if arr is not None:
                width[i], height[i], pixels[i] = w, h, arr.tobytes()
        for i in range(n):
            if status[i] == "ok" and pixels[i] is None:
                try:
                    arr, width[i], height[i] = decode_image(blobs[i], self.size, self.policy)
                    pixels[i] = arr.tobytes()
                except ImageDecodeError as exc:
                    status[i], error[i] = "error", str(exc)
        out = batch.drop_columns(["status", "error", "data"])
        for name, typ, values in (("status", pa.string(), status), ("error", pa.string(), error),
                                  ("width", pa.int32(), width), ("height", pa.int32(), height),
                                  ("pixels", pa.binary(), pixels)):
            out = out.append_column(name, pa.array(values, typ))
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        return super().__call__(self.decode(batch))


def decode_stages(decode_device: str, size: int, policy: str):
    """``(read stage, its fn_kwargs, scoring actor class, extra actor kwargs)`` for ``decode_device``."""
    from jobs.pipeline import read_and_decode

    if decode_device == "cuda":
        return read_bytes, {}, GpuDecodeScoreBatch, {"policy": policy}
    return read_and_decode, {"size": size, "policy": policy}, ScoreBatch, {}
