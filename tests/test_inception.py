"""FID Inception: parity with pytorch-fid on the same (random) weights, the safe
weights reader, the cache, data parallel over a mesh, and bad inputs."""

import os
import pickle
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.evaluation import inception

torch = pytest.importorskip("torch")
pfi = pytest.importorskip("pytorch_fid.inception")
torchvision = pytest.importorskip("torchvision")
F = torch.nn.functional


def _random_fid_inception():
    """pytorch-fid's FID Inception3 with random weights, built without downloading.

    fid_inception_v3() builds the network and then loads the released weights;
    the loader is replaced by a no-op so the random initialisation stays.
    BatchNorm affine parameters are randomised, then the running statistics are
    set from a train-mode pass (momentum=None: exact batch statistics) so every
    layer sees well-scaled activations and the features are not degenerate.
    """
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(torchvision.models.inception.Inception3, "load_state_dict",
                   lambda self, *a, **k: None)
        net = pfi.fid_inception_v3()
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0.0, 0.2, generator=g)
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.rand(4, 3, 299, 299, generator=g) * 2 - 1)
    return net.eval()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    d = tmp_path_factory.mktemp("fid_weights")
    net = _random_fid_inception()
    state = net.state_dict()
    path = str(d / "pt_inception-random.pth")
    torch.save(state, path)  # zip format, Inception3 layout like the released file
    legacy = str(d / "pt_inception-random-legacy.pth")
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    # pytorch-fid's own wrapper (resize + [-1, 1] + blocks), given our weights.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)
        wrapper = pfi.InceptionV3([3], use_fid_inception=True).eval()
    params = inception.load(path)
    return types.SimpleNamespace(dir=d, path=path, legacy=legacy, state=state,
                                 wrapper=wrapper, params=params)


def _torch_features(wrapper, images_u8):
    # pytorch-fid's get_activations: ToTensor (/255, NCHW) then the model.
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        return wrapper(x)[0][:, :, 0, 0].numpy()


@pytest.mark.parametrize("h,w", [(64, 64), (256, 256), (80, 120)])
def test_features_match_pytorch_fid(ref, h, w):
    images = np.random.default_rng(h * w).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    ours = inception.features(ref.params, images, batch_size=2)
    theirs = _torch_features(ref.wrapper, images)
    assert ours.shape == (2, 2048) and ours.dtype == np.float32
    assert np.abs(theirs).max() > 1.0  # the random network is not degenerate
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert rel < 1e-4, rel


@pytest.mark.parametrize("in_hw", [(64, 64), (512, 300), (37, 299), (299, 299), (1, 5)])
def test_resize_matches_torch_interpolate(in_hw):
    x = np.random.default_rng(0).random((1, *in_hw, 3), dtype=np.float32)
    ours = np.asarray(inception.resize_bilinear(jnp.asarray(x)))
    theirs = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                           mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_batching_padding_and_bf16(ref):
    images = np.random.default_rng(3).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    whole = inception.features(ref.params, images, batch_size=3)
    padded = inception.features(ref.params, images, batch_size=2)  # last batch padded
    np.testing.assert_allclose(padded, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())
    bf16 = inception.features(ref.params, images, batch_size=3, dtype=jnp.bfloat16)
    assert bf16.dtype == np.float32
    assert np.abs(bf16 - whole).max() / np.abs(whole).max() < 5e-2
    # precision="default" is the backend's choice (TF32 on NVIDIA GPUs; full float32 on this CPU).
    default = inception.features(ref.params, images, batch_size=3, precision="default")
    assert np.abs(default - whole).max() / np.abs(whole).max() < 1e-2


def test_data_parallel_over_mesh(ref):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    images = np.random.default_rng(4).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    single = inception.features(ref.params, images, batch_size=3)
    sharded = inception.features(ref.params, images, batch_size=2, mesh=mesh)  # rounds up to 8
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5 * np.abs(single).max())


def _assert_same_params(a, b):
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb):
        assert x.dtype == y.dtype == np.float32 and np.array_equal(x, y), p


def test_safe_reader_matches_torch_load(ref, monkeypatch):
    expected = {k: v.numpy() for k, v in ref.state.items()}
    for path in (ref.path, ref.legacy):
        got = inception.read_torch_state_dict(path)
        assert sorted(got) == sorted(expected)
        for k in expected:
            assert got[k].dtype == expected[k].dtype and np.array_equal(got[k], expected[k]), k
    # Without torch at all: `import torch` fails, the safe reader is chosen.
    monkeypatch.setitem(sys.modules, "torch", None)
    _assert_same_params(inception.load(ref.path), ref.params)
    _assert_same_params(inception.load(ref.legacy), ref.params)


def test_wrapper_state_dict_and_cache(ref, tmp_path, monkeypatch):
    # pytorch-fid's InceptionV3 wrapper names layers blocks.<i>.<j>.
    wpath = str(tmp_path / "wrapper.pth")
    torch.save(ref.wrapper.state_dict(), wpath)
    _assert_same_params(inception.load(wpath), ref.params)

    cache = str(tmp_path / "cache" / "fid_inception.npz")
    _assert_same_params(inception.load(ref.path, cache_path=cache), ref.params)
    assert os.path.isfile(cache)
    # Second time the cache is used: no state-dict reader may run.
    def boom(*a, **k):
        raise AssertionError("cache not used")
    monkeypatch.setattr(inception, "_torch_state_dict", boom)
    monkeypatch.setattr(inception, "read_torch_state_dict", boom)
    _assert_same_params(inception.load(ref.path, cache_path=cache), ref.params)
    _assert_same_params(inception.load(cache), ref.params)


def test_missing_weights_file(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth.*pt_inception-2015-12-05"):
        inception.load(missing)


def test_not_the_fid_inception(ref, tmp_path):
    other = str(tmp_path / "linear.pth")
    torch.save(torch.nn.Linear(3, 4).state_dict(), other)
    for use_torch in (True, False):
        with pytest.raises(ValueError, match="linear.pth.*not the FID Inception.*missing keys"):
            inception.load(other, use_torch=use_torch)

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"<html>404 Not Found</html>")  # e.g. a failed download
    for use_torch in (True, False):
        with pytest.raises(ValueError, match="junk.pth.*torch state dict"):
            inception.load(str(junk), use_torch=use_torch)

    wrong = dict(ref.state)
    wrong["Mixed_6b.branch1x1.conv.weight"] = torch.zeros(192, 768, 3, 3)
    wpath = str(tmp_path / "wrong_shape.pth")
    torch.save(wrong, wpath)
    with pytest.raises(ValueError, match=r"Mixed_6b\.branch1x1\.conv\.weight: \(192, 768, 3, 3\)"):
        inception.load(wpath)

    imagenet = dict(ref.state)
    imagenet["fc.weight"] = torch.zeros(1000, 2048)
    ipath = str(tmp_path / "imagenet.pth")
    torch.save(imagenet, ipath)
    with pytest.raises(ValueError, match=r"fc.weight of shape \(1000, 2048\)"):
        inception.load(ipath)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_safe_reader_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "evil.pth")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"x": _Evil()}, protocol=2))
        zf.writestr("archive/version", "3\n")
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global (posix|os|nt)\.system"):
        inception.read_torch_state_dict(path)
    with pytest.raises(ValueError, match="evil.pth"):
        inception.load(path, use_torch=False)
    assert not os.path.exists(tmp_path / "pwned_by_pickle")


def test_bad_images(ref):
    with pytest.raises(TypeError, match="uint8"):
        inception.features(ref.params, np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\].*\(1, 8, 8\)"):
        inception.features(ref.params, np.zeros((1, 8, 8), np.uint8))
    assert inception.features(ref.params, np.zeros((0, 8, 8, 3), np.uint8)).shape == (0, 2048)
    with pytest.raises(ValueError, match="precision must be one of.*'tf32'"):
        inception.features(ref.params, np.zeros((1, 8, 8, 3), np.uint8), precision="tf32")
