"""Distances between sets of outputs: pixels (PSNR) and judge features (Fréchet, pairwise spread)."""

from __future__ import annotations

import math

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB between two arrays of the same shape on the scale `peak` (255 for uint8, 2 for [-1, 1]);
    identical arrays give +inf."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets `a` and `b`."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(linalg.sqrtm(s1 @ s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def mean_pairwise(feats: np.ndarray) -> float:
    """Mean Euclidean distance between every two rows of `feats`."""
    d = np.sqrt(((feats[:, None] - feats[None]) ** 2).sum(-1))
    n = len(feats)
    return float(d.sum() / (n * (n - 1)))
