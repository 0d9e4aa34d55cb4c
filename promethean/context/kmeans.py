"""k-means on embedding vectors, and the blocked products it (and the memory tree's routing) is
made of.

`k_means` fits up to k centroids (k-means++ start, Lloyd steps) on a sample; `two_means_centroids`
is its cheap k = 2 case (a farthest-point start), and `two_means` the hyperplane between those two
centroids, which is what splits a full leaf of the memory tree (`promethean.context.tree`).
`rows_dot` and `rows_matmul` keep BLAS on one thread (see their docstrings): on a busy machine
waking OpenBLAS's threads costs far more than these products.
"""

from __future__ import annotations

import numpy as np

ROWS_PER_PRODUCT = 1024  # rows of one rows_dot block
PRODUCT_SIZE_PER_CALL = 2**19  # rows x inner x columns of one rows_matmul block
# k-means is fitted on this many rows per cell: a cell's centroid averages many clusters, and
# each cluster needs enough rows in it for its points to be told apart from the rest.
SAMPLE_PER_CELL = 512


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def rows_dot(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """`matrix @ vector` in blocks of ROWS_PER_PRODUCT rows. Above ~2,000 rows OpenBLAS hands a
    matrix-vector product to its threads, and waking them costs milliseconds on a busy machine
    (measured: 7.6 ms for 2,881 x 256 where 1,472 x 256 took 0.02 ms); in blocks the product
    stays on one core at memory speed."""
    if len(matrix) <= ROWS_PER_PRODUCT:
        return matrix @ vector
    return np.concatenate([matrix[start : start + ROWS_PER_PRODUCT] @ vector
                           for start in range(0, len(matrix), ROWS_PER_PRODUCT)])


def rows_matmul(matrix: np.ndarray, other: np.ndarray) -> np.ndarray:
    """`matrix @ other` for a thin `other` (a few columns), in blocks of rows small enough
    (rows x inner x columns <= PRODUCT_SIZE_PER_CALL, at most 64 rows) that OpenBLAS keeps to
    one thread: waking its threads costs far more than these products on a busy machine
    (measured: 10,000 x 256 @ 256 x 16 took 26 ms in one call, 2.8 ms in blocks of 64 rows;
    @ 256 x 64 in blocks of 64 rows, 940 ms, in blocks of 32, 4.8 ms). `other` is made
    C-contiguous: a transposed view took the threaded path even in blocks."""
    other = np.ascontiguousarray(other)
    rows = int(min(64, max(1, PRODUCT_SIZE_PER_CALL // max(other.shape[0] * other.shape[1], 1))))
    if len(matrix) <= rows:
        return matrix @ other
    return np.concatenate([matrix[start : start + rows] @ other
                           for start in range(0, len(matrix), rows)])


def two_means_centroids(vectors: np.ndarray, rng: np.random.Generator,
                        iterations: int = 6) -> np.ndarray:
    """The two 2-means centroids of `vectors` (fitted on a sample of at most 2048 rows, from a
    farthest-point start), as a (2, dim) array."""
    sample = vectors if len(vectors) <= 2048 else vectors[rng.choice(len(vectors), 2048, replace=False)]
    sample = sample.astype(np.float64)
    first = sample[rng.integers(len(sample))]
    # Farthest-point start: the point farthest from a random one, then the farthest from that.
    c0 = sample[np.argmax(((sample - first) ** 2).sum(1))]
    c1 = sample[np.argmax(((sample - c0) ** 2).sum(1))]
    for _ in range(iterations):
        side = rows_dot(sample, c0 - c1) >= (c0 @ c0 - c1 @ c1) / 2
        if side.all() or not side.any():
            break
        c0, c1 = sample[side].mean(0), sample[~side].mean(0)
    return np.stack([c0, c1])


def two_means(vectors: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """The boundary between the two 2-means clusters of `vectors`: a row is on the first side
    when `row @ direction >= threshold`."""
    c0, c1 = two_means_centroids(vectors, rng)
    return c0 - c1, float(c0 @ c0 - c1 @ c1) / 2


def k_means(vectors: np.ndarray, groups: int, rng: np.random.Generator,
            iterations: int = 8) -> np.ndarray:
    """Up to `groups` k-means centroids of `vectors` (k-means++ start, Lloyd steps, fitted on a
    sample of at most max(2048, SAMPLE_PER_CELL x groups) rows); centroids that end up empty are dropped.
    Two groups: `two_means_centroids` (cheaper, and what splits a full leaf)."""
    if groups <= 2:
        return two_means_centroids(vectors, rng)
    limit = max(2048, SAMPLE_PER_CELL * groups)
    sample = vectors if len(vectors) <= limit else vectors[rng.choice(len(vectors), limit, replace=False)]
    sample = sample.astype(np.float32)
    norms = (sample * sample).sum(1)
    chosen = [int(rng.integers(len(sample)))]
    nearest = np.maximum(norms + norms[chosen[0]] - 2 * rows_dot(sample, sample[chosen[0]]), 0)
    for _ in range(1, groups):
        total = float(nearest.sum())
        if total <= 0:
            break
        pick = int(rng.choice(len(sample), p=nearest / total))
        chosen.append(pick)
        nearest = np.minimum(nearest, np.maximum(norms + norms[pick] - 2 * rows_dot(sample, sample[pick]), 0))
    centroids = sample[chosen].astype(np.float64)
    for _ in range(iterations):
        labels = nearest_centroids(sample, centroids)
        counts = np.bincount(labels, minlength=len(centroids))
        filled = counts > 0
        order = np.argsort(labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts[filled])[:-1]])
        sums = np.add.reduceat(sample[order].astype(np.float64), starts, axis=0)
        centroids = sums / counts[filled, None]
    return centroids


def nearest_centroids(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The index of each row's nearest centroid."""
    bias = (-0.5 * (centroids * centroids).sum(1)).astype(np.float32)
    return np.argmax(rows_matmul(vectors, centroids.T.astype(np.float32)) + bias, axis=1)

