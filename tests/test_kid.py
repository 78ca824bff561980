"""KID against an independent NumPy implementation: the MMD^2 U-statistic written out pair by pair."""
import itertools

import numpy as np
import pytest

from imagen_jax.evaluation import fid


def _mmd2_pairwise(a, b):
    """Unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3, as explicit sums over index pairs."""
    d, m, n = a.shape[1], len(a), len(b)
    k = lambda u, v: (float(np.dot(u, v)) / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(a[i], a[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_pairwise_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6))
    y = rng.normal(0.3, 1.2, size=(35, 6))
    mean, std = fid.kernel_inception_distance(x, y, num_subsets=7, subset_size=12, seed=5)
    draw = np.random.default_rng(5)  # the documented draw: set 1 then set 2, subset after subset
    ref = []
    for _ in range(7):
        ia = draw.choice(40, 12, replace=False)
        ib = draw.choice(35, 12, replace=False)
        ref.append(_mmd2_pairwise(x[ia], y[ib]))
    assert mean == pytest.approx(np.mean(ref), rel=1e-12, abs=1e-14)
    assert std == pytest.approx(np.std(ref), rel=1e-10, abs=1e-14)


def test_kid_full_sets_and_separation():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
    # One subset of every row: the U-statistic of the whole sets (a permutation does not change it).
    mean, std = fid.kernel_inception_distance(x, y, num_subsets=1, subset_size=100)
    assert mean == pytest.approx(_mmd2_pairwise(x, y), rel=1e-12) and std == 0.0
    same, _ = fid.kernel_inception_distance(rng.normal(size=(400, 4)), rng.normal(size=(400, 4)),
                                            num_subsets=10, subset_size=200)
    apart, _ = fid.kernel_inception_distance(rng.normal(size=(400, 4)), rng.normal(1.0, 1.0, size=(400, 4)),
                                             num_subsets=10, subset_size=200)
    assert abs(same) < 0.05 < apart  # unbiased: about 0 for one distribution, clearly positive for two


def test_kid_bad_input():
    with pytest.raises(ValueError, match="equal D"):
        fid.kernel_inception_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        fid.kernel_inception_distance(np.zeros((1, 3)), np.zeros((4, 3)))
