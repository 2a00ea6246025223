"""The crop store: atomic, durable per batch, no temp files left, same API with or without
Linux's syncfs."""

from __future__ import annotations

import pytest

import icl.orchestrator.crops as crops_module
from icl.images import encode_png
from icl.orchestrator.crops import CropMissing, CropStore
from tests.helpers import unit_vectors

pytestmark = pytest.mark.unit  # pure and fast: no server


def _png(seed: int) -> bytes:
    pixels = (unit_vectors(16 * 8, 3, seed=seed).reshape(16, 8, 3) * 127 + 128).astype("uint8")
    return encode_png(pixels)


@pytest.mark.parametrize("syncfs", ["syncfs", "per-file fsync"])
def test_put_many_load_delete(tmp_path, monkeypatch, syncfs):
    if syncfs != "syncfs":
        monkeypatch.setattr(crops_module, "_syncfs", None)
    store = CropStore(tmp_path / "crops")
    store.put_many([("cam-1/a.png", _png(1)), ("b", _png(2)), ("b", _png(3))])  # later b wins
    store.put("c", _png(4))
    a, b, c = store.load(["cam-1/a.png", "b", "c"])
    assert a.shape == c.shape == (16, 8, 3)
    only_third = CropStore(tmp_path / "third")
    only_third.put("b", _png(3))
    assert (b == only_third.load(["b"])[0]).all()
    assert not list((tmp_path / "crops").rglob("*.tmp"))
    store.delete(["b"])
    with pytest.raises(CropMissing):
        store.load(["b"])
    store.put_many([])


def test_a_failed_batch_leaves_no_temp_files(tmp_path):
    store = CropStore(tmp_path / "crops")
    store.put("keep", _png(1))

    def items():
        yield "new", _png(2)
        raise OSError("disk full")

    with pytest.raises(OSError):
        store.put_many(items())
    assert not list((tmp_path / "crops").rglob("*.tmp"))
    with pytest.raises(CropMissing):  # nothing of the failed batch is visible
        store.load(["new"])
    assert store.load(["keep"])[0].shape == (16, 8, 3)


def test_loaded_crops_keep_the_bytes_they_were_enrolled_with(tmp_path):
    """THI's MLLM client sends these bytes as they are (no decode-encode round trip), so they
    must be exactly what was stored, and only the unchanged array may carry them."""
    import io

    import numpy as np
    from PIL import Image

    from icl.images import encoded_bytes

    buf = io.BytesIO()
    Image.new("RGB", (8, 16), (200, 30, 60)).save(buf, format="JPEG", quality=90)
    stored = {"png": _png(5), "jpeg": buf.getvalue()}
    store = CropStore(tmp_path / "crops")
    store.put_many(stored.items())
    for (name, data), image in zip(stored.items(), store.load(list(stored)), strict=True):
        assert encoded_bytes(image) == data, name
        with Image.open(io.BytesIO(data)) as img:
            assert (np.asarray(img.convert("RGB")) == image).all()
        assert not image.flags.writeable  # the pixels cannot drift from the bytes
        assert encoded_bytes(image[1:]) is None and encoded_bytes(image.copy()) is None
        assert encoded_bytes(np.asarray(image)) is None
