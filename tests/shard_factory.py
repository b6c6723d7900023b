"""Building WebDataset shards in tests, including the broken ones real corpora contain."""

from __future__ import annotations

import io
import tarfile

import numpy as np
from PIL import Image


def encode(image: Image.Image | np.ndarray, fmt: str = "JPEG", **kwargs) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar with the given (name, bytes) members, in order, with fixed metadata."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sample_members(key: str, image_bytes: bytes, caption: str | None, ext: str = "jpg") -> list[tuple[str, bytes]]:
    members = [(f"{key}.{ext}", image_bytes)]
    if caption is not None:
        members.append((f"{key}.txt", caption.encode()))
    return members


def photo_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct RGB crops of scikit-image's bundled photos, varied sizes."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(rng.integers(160, min(h, 320) + 1)), int(rng.integers(160, min(w, 400) + 1))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out.append(np.ascontiguousarray(photo[top : top + ch, left : left + cw]))
    return out


# ---- hostile input: what a billion-image crawl holds -----------------------------------------
def member_block(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    """One member as it lies in a tar: its header block(s), then its data padded to 512 bytes."""
    info.mtime, info.mode = 0, 0o644
    info.size = len(data) if info.isreg() else 0
    header = info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape")
    return header + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def special_member(name: str, kind: bytes, target: str = "") -> bytes:
    """A symlink, hard link, fifo, device or directory member (kind: tarfile.SYMTYPE, ...)."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return member_block(info)


def sparse_member(name: str, stored: bytes, declared: int) -> bytes:
    """A GNU sparse member ('S') whose one data region is `stored` at offset 0 but whose real size is
    `declared`: tarfile's extractfile would hand out `declared` bytes (zeros past the region)."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    block = bytearray(member_block(info, stored))
    block[124:136] = b"%011o\0" % len(stored)  # the stored size (member_block set 0: not a regular type)
    block[386:410] = b"%011o\0" % 0 + b"%011o\0" % len(stored)  # sparse map: (offset 0, numbytes)
    block[483:495] = b"%011o\0" % declared  # real size
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block[:512])
    return bytes(block)


def blocks_tar(blocks: list[bytes]) -> bytes:
    """A tar from member blocks (`member_block`, `special_member`, ...) and its end-of-archive."""
    return b"".join(blocks) + b"\0" * (2 * tarfile.BLOCKSIZE)


def members_blocks(members: list[tuple[str, bytes]]) -> list[bytes]:
    return [member_block(tarfile.TarInfo(name), data) for name, data in members]


def png_with_ztxt(image: np.ndarray, text_bytes: int) -> bytes:
    """A valid PNG carrying a zTXt chunk that inflates to `text_bytes` (a few KB on disk)."""
    import struct
    import zlib

    png = encode(image, "PNG")
    payload = b"Comment\0\0" + zlib.compress(b"A" * text_bytes, 9)
    chunk = struct.pack(">I", len(payload)) + b"zTXt" + payload
    chunk += struct.pack(">I", zlib.crc32(b"zTXt" + payload) & 0xFFFFFFFF)
    head = 8 + 25  # signature + IHDR chunk
    return png[:head] + chunk + png[head:]


IMAGE_FORMATS = {"jpg": ("JPEG", {"quality": 85}), "png": ("PNG", {}), "webp": ("WEBP", {}),
                 "gif": ("GIF", {}), "tiff": ("TIFF", {"compression": "tiff_lzw"})}


def mutate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One seeded mutation of valid image bytes: (what was done, the mutant)."""
    n = len(data)
    kind = ("truncate", "flip", "splice", "header_cut", "zero_run", "repeat")[int(rng.integers(6))]
    if kind == "truncate":
        return kind, data[: int(rng.integers(1, n))]
    if kind == "header_cut":
        return kind, data[: int(rng.integers(1, min(n, 64)))]
    if kind == "flip":
        out = bytearray(data)
        for pos in rng.integers(0, min(n, 2048) if rng.random() < 0.7 else n, size=int(rng.integers(1, 9))):
            out[pos] ^= int(rng.integers(1, 256))
        return kind, bytes(out)
    a, b = sorted(int(x) for x in rng.integers(0, n, size=2))
    if kind == "splice":  # a chunk of the file moved elsewhere
        at = int(rng.integers(0, n))
        return kind, data[:at] + data[a:b] + data[at:]
    if kind == "zero_run":
        return kind, data[:a] + b"\0" * (b - a) + data[b:]
    return kind, data[:b] + data[a:b] * int(rng.integers(2, 5)) + data[b:]
