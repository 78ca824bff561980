"""Fréchet distance between Gaussians fitted to Inception features.

FID = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), computed
in float64 with SciPy's matrix square root exactly as pytorch-fid defines it:
if the square root of the product is not finite, eps (1e-6) is added to both
diagonals and it is retried; a complex result whose diagonal has an imaginary
part above 1e-3 is an error, otherwise the real part is kept.

Statistics files are `.npz` with arrays `mu` [D] and `sigma` [D, D], the same
keys pytorch-fid's `--save-stats` writes, so either side can read the other's.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any, Mapping

import numpy as np
from scipy import linalg

from imagen_jax import paths

log = logging.getLogger(__name__)


def _check_stats(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mean vectors must be [D] and equal in shape, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"covariances must be [{d}, {d}] to match the means, got {sigma1.shape} and {sigma2.shape}")
    return mu1, sigma1, mu2, sigma2


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    mu*: [D]; sigma*: [D, D]. Returns a Python float (float64 arithmetic).
    Raises ValueError on mismatched shapes or a significant imaginary part.
    """
    mu1, sigma1, mu2, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    # The product of two PSD matrices can be nearly singular; sqrtm then returns
    # inf/nan, and a small ridge on both factors is the standard remedy.
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        log.warning("FID: singular product of covariances; adding %g to their diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    # Round-off can leave a tiny imaginary part; a large one means the inputs are not PSD.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"FID: matrix square root has an imaginary component of "
                f"{np.max(np.abs(covmean.imag)):g} (expected < 1e-3): are the covariances PSD?")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """features [N, D] -> (mu [D], sigma [D, D]) in float64; sigma unbiased (N - 1)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def fid_from_features(features1, features2) -> float:
    """FID between two feature sets [N1, D] and [N2, D]."""
    return frechet_distance(*statistics(features1), *statistics(features2))


def save_statistics(path: str | os.PathLike, mu, sigma, meta: Mapping[str, Any] | None = None) -> None:
    """Write `mu` [D], `sigma` [D, D] (and string-valued `meta`) to an .npz (local or gs://), atomically."""
    path = os.fspath(path)
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    for k, v in (meta or {}).items():
        arrays[f"meta_{k}"] = np.array(str(v))
    paths.write_npz(path, arrays)  # readers never see a half-written file


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read (mu [D], sigma [D, D]) float64 from an .npz with keys `mu` and `sigma`."""
    path = os.fspath(path)
    if not paths.isfile(path):
        raise FileNotFoundError(f"FID statistics file not found: {path!r}")
    with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as z:
        if "mu" not in z.files or "sigma" not in z.files:
            raise ValueError(f"{path!r} has arrays {z.files}; expected 'mu' and 'sigma'")
        mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    _check_stats(mu, sigma, mu, sigma)
    return mu, sigma


def load_statistics_meta(path: str | os.PathLike) -> dict[str, str]:
    """The `meta` strings stored by `save_statistics`."""
    with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as z:
        return {k[len("meta_"):]: str(z[k]) for k in z.files if k.startswith("meta_")}


def kernel_inception_distance(features1, features2, *, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): the unbiased estimate of the squared MMD between two feature sets
    [N1, D] and [N2, D] under the polynomial kernel k(x, y) = (x.y / D + 1)^3, averaged over
    `num_subsets` subsets of min(subset_size, N1, N2) rows drawn without replacement from each set
    (np.random.default_rng(seed); the draw for set 1 then set 2, subset after subset).

    Returns (mean, std over the subsets), in float64. The same estimator and defaults as
    torch-fidelity and clean-fid (100 subsets of 1000), so the numbers are comparable."""
    x = np.asarray(features1, np.float64)
    y = np.asarray(features2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be [N, D] with equal D, got {x.shape} and {y.shape}")
    m = min(int(subset_size), x.shape[0], y.shape[0])
    if m < 2 or num_subsets < 1:
        raise ValueError(f"KID needs subsets of at least 2 rows and at least one subset; got {m} rows "
                         f"({x.shape[0]} and {y.shape[0]} features, subset_size={subset_size}) and "
                         f"{num_subsets} subsets")
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        a = x[rng.choice(x.shape[0], m, replace=False)]
        b = y[rng.choice(y.shape[0], m, replace=False)]
        kxx = (a @ a.T / d + 1) ** 3
        kyy = (b @ b.T / d + 1) ** 3
        kxy = (a @ b.T / d + 1) ** 3
        # Diagonals left out of the within-set sums: that is what makes the estimate unbiased.
        values[i] = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) \
            - 2 * kxy.sum() / m ** 2
    return float(values.mean()), float(values.std())


__all__ = [
    "fid_from_features", "frechet_distance", "kernel_inception_distance", "load_statistics",
    "load_statistics_meta", "save_statistics", "statistics",
]
