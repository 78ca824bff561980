"""Fréchet distance (parity with pytorch-fid, closed forms), statistics files,
and the resumable feature-shard store."""

import logging
import os
import warnings

import numpy as np
import pytest

from imagen_jax.evaluation import fid
from imagen_jax.evaluation.features import FeatureStore


def _random_stats(rng, n, d, shift=0.0):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + shift
    return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_distance_matches_pytorch_fid():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(0)
    for d in (2, 8, 64):  # (pytorch-fid's d=1 path breaks on SciPy >= 1.16's sqrtm)
        s1 = _random_stats(rng, 200, d)
        s2 = _random_stats(rng, 150, d, shift=0.3)
        ours = fid.frechet_distance(*s1, *s2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # their sqrtm(disp=False) is deprecated in SciPy
            theirs = float(fid_score.calculate_frechet_distance(*s1, *s2))
        assert isinstance(ours, float)
        assert ours == pytest.approx(theirs, rel=1e-10, abs=1e-10)


def test_closed_form_diagonal():
    # Diagonal covariances commute: sqrt(S1 S2) = diag(sqrt(a b)).
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    m1, m2 = rng.normal(size=16), rng.normal(size=16)
    expected = np.sum((m1 - m2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert fid.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # Scalars are 1-D Gaussians, as in pytorch-fid (atleast_1d / atleast_2d).
    expected_1d = (0.5 - 2.0) ** 2 + 2.0 + 3.0 - 2 * np.sqrt(6.0)
    assert fid.frechet_distance(0.5, 2.0, 2.0, 3.0) == pytest.approx(expected_1d, rel=1e-12)


def test_fid_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(2).normal(size=(300, 32)).astype(np.float32)
    mu, sigma = fid.statistics(feats)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)
    assert abs(fid.fid_from_features(feats, feats)) < 1e-8 * np.trace(sigma)


def test_statistics_float64_and_unbiased():
    feats = np.random.default_rng(3).normal(size=(10, 4)).astype(np.float32)
    mu, sigma = fid.statistics(feats)
    assert mu.dtype == sigma.dtype == np.float64
    x = feats.astype(np.float64)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(sigma, (x - x.mean(0)).T @ (x - x.mean(0)) / 9, rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        fid.statistics(feats[:1])
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        fid.statistics(feats[0])


def test_singular_product_falls_back_to_eps(monkeypatch, caplog):
    real_sqrtm = fid.linalg.sqrtm
    calls = []

    def flaky_sqrtm(a):  # the first product looks singular, like a rank-deficient estimate
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fid.linalg, "sqrtm", flaky_sqrtm)
    s = np.diag([1.0, 2.0])
    with caplog.at_level(logging.WARNING):
        out = fid.frechet_distance(np.zeros(2), s, np.zeros(2), s)
    assert len(calls) == 2 and "singular" in caplog.text
    np.testing.assert_allclose(calls[1], (s + 1e-6 * np.eye(2)) @ (s + 1e-6 * np.eye(2)))
    assert abs(out) < 1e-5


def test_bad_statistics():
    with pytest.raises(ValueError, match="imaginary component"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), -np.eye(2))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"\[2, 2\]"):
        fid.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


def test_statistics_file_roundtrip(tmp_path):
    mu, sigma = _random_stats(np.random.default_rng(4), 20, 5)
    path = str(tmp_path / "sub" / "ref.npz")
    fid.save_statistics(path, mu, sigma, meta={"source": "coco", "count": 20})
    got_mu, got_sigma = fid.load_statistics(path)
    assert np.array_equal(got_mu, mu) and np.array_equal(got_sigma, sigma)
    assert fid.load_statistics_meta(path) == {"source": "coco", "count": "20"}
    assert [f for f in os.listdir(tmp_path / "sub")] == ["ref.npz"]  # no temp files left
    # pytorch-fid's --save-stats files hold the same two arrays.
    np.savez(tmp_path / "theirs.npz", mu=mu.astype(np.float32), sigma=sigma)
    assert fid.load_statistics(tmp_path / "theirs.npz")[0].dtype == np.float64
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        fid.load_statistics(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", m=mu)
    with pytest.raises(ValueError, match="expected 'mu' and 'sigma'"):
        fid.load_statistics(tmp_path / "other.npz")


# --- feature store --------------------------------------------------------------


def _feats(start, stop, dim=8):
    return np.arange(start, stop, dtype=np.float32)[:, None] * np.ones((1, dim), np.float32)


def test_feature_store_resumes(tmp_path):
    work = tmp_path / "feats"
    store = FeatureStore(work, total=10, shard_size=4, dim=8)
    assert store.num_shards == 3 and store.missing() == [0, 1, 2]
    assert store.shard_range(2) == (8, 10)

    def crash_at_1(index, start, stop):
        if index == 1:
            raise KeyboardInterrupt("preempted")
        return _feats(start, stop)

    with pytest.raises(KeyboardInterrupt):
        store.fill(crash_at_1)
    (work / ".tmp-leftover").write_bytes(b"half a shard")  # as a kill mid-write would leave
    assert store.finished() == [0] and not store.is_complete()
    with pytest.raises(ValueError, match="incomplete.*2 of 3"):
        store.concatenate()

    resumed = FeatureStore(work, total=10, shard_size=4, dim=8)
    computed = []

    def compute(index, start, stop):
        computed.append(index)
        return _feats(start, stop)

    out = resumed.fill(compute)
    assert computed == [1, 2]  # shard 0 was not redone
    assert out.shape == (10, 8) and out.dtype == np.float32
    np.testing.assert_array_equal(out, _feats(0, 10))
    assert resumed.fill(compute).shape == (10, 8) and computed == [1, 2]


def test_feature_store_bad_input(tmp_path):
    store = FeatureStore(tmp_path, total=5, shard_size=2, dim=4)
    with pytest.raises(ValueError, match=r"shard 2 must hold features \[1, 4\].*\(2, 4\)"):
        store.write(2, np.zeros((2, 4)))
    with pytest.raises(IndexError, match="shard index 3"):
        store.write(3, np.zeros((1, 4)))
    with pytest.raises(FileNotFoundError, match="shard 0 is not finished"):
        store.read(0)
    with pytest.raises(ValueError, match="was created with"):
        FeatureStore(tmp_path, total=6, shard_size=2, dim=4)
