"""The evaluation's measures as pure functions of CLIP features: arrays in, numbers out.

CLIP score, zero-shot attribute accuracy, CLIP-IQA, and FID / KID on image features (what each
means and why it is measured is in :mod:`adapter.evaluate`). They need no model, file or
device, so they live apart from the run that generates and embeds the images: each is tested on
hand-made vectors, and reading one does not mean reading the pipeline around it.
"""

from __future__ import annotations

import numpy as np


def attribute_correct(image_features: np.ndarray, option_features: np.ndarray) -> np.ndarray:
    """(N,) bool: image ``i`` is closest to option 0 (its true attribute) among its options.
    ``image_features`` (N, d) and ``option_features`` (N, K, d), both L2-normalised."""
    similarity = np.einsum("nd,nkd->nk", image_features, option_features)
    return similarity.argmax(axis=1) == 0


def clip_score(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """CLIPScore per pair: 100 x max(cosine, 0)."""
    return 100.0 * np.maximum((image_features * text_features).sum(-1), 0.0)


def clip_iqa(image_features: np.ndarray, good: np.ndarray, bad: np.ndarray) -> np.ndarray:
    logits = 100.0 * np.stack([image_features @ good, image_features @ bad], axis=1)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights[:, 0] / weights.sum(axis=1)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float | None:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of two feature sets; None with fewer
    than 2 samples in either. Tr((S_a S_b)^1/2) is computed as the trace of the square root of
    the symmetric S_a^1/2 S_b S_a^1/2 (same eigenvalues), which stays real and stable for the
    singular covariances of small sets."""
    if len(a) < 2 or len(b) < 2:
        return None
    a, b = a.astype(np.float64), b.astype(np.float64)
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    spread = np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root
    return float(((mean_a - mean_b) ** 2).sum() + spread)


def kernel_distance(
    a: np.ndarray, b: np.ndarray, subsets: int = 10, subset_size: int = 100, seed: int = 0
) -> tuple[float | None, float | None]:
    """KID: the unbiased MMD^2 with the kernel (x.y / d + 1)^3, mean and std over subsets of
    ``subset_size`` (fewer when a set is smaller; then the std only reflects the resampling of
    the larger set). None, None with fewer than 2 samples in either."""
    rng = np.random.default_rng(seed)
    size = min(subset_size, len(a), len(b))
    if size < 2:
        return None, None
    dim = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), size, replace=False)].astype(np.float64)
        y = b[rng.choice(len(b), size, replace=False)].astype(np.float64)
        kxx, kyy, kxy = (((p @ q.T) / dim + 1.0) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        off = size * (size - 1)
        mmd = (kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off
        values.append(mmd - 2.0 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))
