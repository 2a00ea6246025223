"""The crop store: the enrolled image bytes, kept so THI can show candidates to the MLLM.

Milvus holds embeddings and metadata, not pixels. Enroll writes each accepted crop here
before it acknowledges the batch; THI reads the top-K candidates back. Files are named by a
hash of the image id (ids are caller strings; a hash can never escape the directory) and
written atomically (temp file + rename), so a crash never leaves a half-written crop. Durable
per batch, not per file: an fsync per crop cost 3 ms (300 crops/s, a sixth of the encoder's
rate); `put_many` writes every temp file, syncs the store's filesystem once (data before any
rename, so no crop can appear under its final name without its bytes, even after a power
loss), renames, and syncs once more so the renames are on disk before Enroll acknowledges. A
production deployment with several orchestrators points every instance at one shared
directory (or replaces this class with an object-store adapter of the same shape).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from icl.images import EncodedImage


class CropMissing(LookupError):
    """A candidate's crop is not in the store (enrolled elsewhere, or deleted)."""


class CropStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, image_id: str) -> Path:
        digest = hashlib.sha256(image_id.encode("utf-8")).hexdigest()
        return self.root / digest[:2] / f"{digest}.img"

    def put(self, image_id: str, data: bytes) -> None:
        self.put_many([(image_id, data)])

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Store every crop, durably, before returning (a later item with the same id wins)."""
        suffix = f".{os.getpid()}.{secrets.token_hex(4)}.tmp"  # unique per call: streams race
        staged: dict[Path, Path] = {}
        try:
            for image_id, data in items:
                path = self._path(image_id)
                path.parent.mkdir(exist_ok=True)
                tmp = staged.get(path) or path.with_suffix(suffix)
                tmp.write_bytes(data)
                staged[path] = tmp
            if not staged:
                return
            self._sync(files=list(staged.values()))  # the bytes first ...
            for path, tmp in staged.items():
                tmp.replace(path)
            dirs = {path.parent for path in staged}
            staged.clear()
            self._sync(dirs=list(dirs))  # ... then the names
        finally:
            for tmp in staged.values():  # a failed batch leaves no temp files behind
                tmp.unlink(missing_ok=True)

    def _sync(self, files: Sequence[Path] = (), dirs: Sequence[Path] = ()) -> None:
        """Flush the store's filesystem: one syncfs call where Linux has it, else each path."""
        if _syncfs is not None:
            fd = os.open(self.root, os.O_RDONLY)
            try:
                if _syncfs(fd) == 0:
                    return
            finally:
                os.close(fd)
        for path in [*files, *dirs]:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def load(self, image_ids: Sequence[str]) -> list[np.ndarray]:
        """RGB uint8 arrays at the crops' own size, in the given order; each keeps the bytes
        it was decoded from (`EncodedImage`), so the MLLM client sends them as they are."""
        out: list[np.ndarray] = []
        for image_id in image_ids:
            path = self._path(image_id)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise CropMissing(f"no stored crop for image {image_id!r}") from None
            out.append(EncodedImage.decode(data))
        return out

    def read(self, image_id: str) -> bytes | None:
        """The crop's bytes as enrolled, or None when none is stored."""
        try:
            return self._path(image_id).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, image_ids: Iterable[str]) -> None:
        for image_id in image_ids:
            self._path(image_id).unlink(missing_ok=True)


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()

__all__ = ["CropMissing", "CropStore"]
