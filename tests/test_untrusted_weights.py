"""Crafted torch.save files against the built-in Inception weights reader: every tensor view that
does not lie inside its storage is refused with one clear message (an unchecked view read memory
before the buffer and a stride of -2**30 crashed the process); the weights file is pinned by SHA-256."""
import hashlib
import io
import pickle
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from imagen_jax.evaluation import inception

torch = pytest.importorskip("torch")


class _StorageRef:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class _View:
    """Pickles as torch's `_rebuild_tensor_v2(storage, offset, size, stride, ...)` of a float storage."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, OrderedDict())

    def __reduce__(self):
        import torch._utils

        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def craft(path, offset=0, size=(2, 3), stride=(3, 1), numel=6, data_bytes=None):
    """A zip-format torch.save file of {'w': a view of one float32 storage}, with any view fields."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(OrderedDict(w=_View(_StorageRef("0", numel), offset, size, stride)))
    raw = np.arange(6, dtype="<f4").tobytes() if data_bytes is None else data_bytes
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        z.writestr("archive/data/0", raw)
    return str(path)


def test_well_formed_view_reads_like_torch(tmp_path):
    p = craft(tmp_path / "ok.pth", offset=1, size=(2, 2), stride=(1, 2))
    got = inception.read_torch_state_dict(p)["w"]
    want = torch.load(p, weights_only=True)["w"].numpy()  # torch reads the same bytes the same way
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, np.array([[1, 3], [2, 4]], np.float32))


@pytest.mark.parametrize("case,fields,message", [
    ("negative offset", dict(offset=-4), "negative offset"),
    ("negative stride", dict(stride=(-2**30, 1)), "negative offset, size or stride"),
    ("huge stride", dict(stride=(2**40, 1)), "runs past its storage"),
    ("huge size", dict(size=(2**31, 3)), "runs past its storage"),
    ("negative size", dict(size=(-1, 3)), "negative offset, size or stride"),
    ("offset past the end", dict(offset=6, size=(1,), stride=(1,)), "runs past its storage"),
    ("view past the end", dict(size=(3, 3)), "runs past its storage"),
    ("storage shorter than declared", dict(data_bytes=b"\0" * 8), "holds 8 bytes but declares 6 elements"),
    ("storage longer than declared", dict(numel=2), "holds 24 bytes but declares 2 elements"),
    ("non-integer stride", dict(stride=(3.5, 1)), "malformed tensor view"),
])
def test_crafted_views_are_refused(tmp_path, case, fields, message):
    p = craft(tmp_path / "bad.pth", **fields)
    with pytest.raises(ValueError, match=message):
        inception.read_torch_state_dict(p)
    # Through the loader the evaluation uses: one line that names the file.
    with pytest.raises(ValueError) as e:
        inception.load(p, use_torch=False)
    assert "bad.pth" in str(e.value) and message.split()[0] in str(e.value) and "\n" not in str(e.value)


def test_weights_pinned_by_sha256(tmp_path):
    p = craft(tmp_path / "pt_inception-2015-12-05-6726825d.pth")  # the right name is not enough
    digest = hashlib.sha256(open(p, "rb").read()).hexdigest()
    with pytest.raises(ValueError, match=f"SHA-256 {digest}.*--inception_sha256 {digest}"):
        inception.check_sha256(p)
    assert inception.check_sha256(p, digest) == digest
    assert inception.check_sha256(p, digest.upper()) == digest
    assert inception.check_sha256(p, "any") == digest
    assert inception.WEIGHTS_SHA256.startswith("6726825d")  # torch.hub's name prefix of the release file


def test_old_torch_is_not_used():
    assert not inception._torch_version_ok("2.9.1")
    assert not inception._torch_version_ok("1.13.0+cu117")
    assert inception._torch_version_ok("2.10.0") and inception._torch_version_ok("2.14.1+cu130")
    assert inception._torch_version_ok("3.0.0")


def test_old_torch_falls_back_to_the_safe_reader(tmp_path, monkeypatch):
    """An installed torch < 2.10 is never asked to unpickle the file: by default the built-in
    reader reads it, and asking for torch explicitly is refused naming the version."""
    p = craft(tmp_path / "w.pth")
    monkeypatch.setattr(torch, "__version__", "2.9.1")
    assert not inception._torch_available()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used"))
    with pytest.raises(ImportError, match=r"torch 2\.9\.1 is too old"):
        inception.load(p, use_torch=True)
    used = []
    monkeypatch.setattr(inception, "read_torch_state_dict", lambda path: used.append(path) or {})
    with pytest.raises(Exception):  # an empty state dict is not the Inception network
        inception.load(p)
    assert used == [p]
