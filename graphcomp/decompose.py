"""Low-rank factorizations of layer weights, and the rank selection rules that size them.

Everything here works on numpy arrays in float64 without the graph IR. The ``lowrank`` pass
(``passes/lowrank.py``) turns the factors into layers. Conv kernels are
[C_out, C_in, kH, kW].

- ``truncated_svd``: a matrix [m, n] as ``left [m, r] @ right [r, n]``.
- ``tucker2``: a kernel as a core [R_out, R_in, kH, kW] multiplied by a factor on the output
  channel mode and one on the input channel mode, started from the HOSVD and refined by
  alternating least squares (higher-order orthogonal iteration, HOOI).
- ``cp_als``: a tensor as a sum of R outer products of vectors (CANDECOMP/PARAFAC), fitted by
  alternating least squares.
- ``rank_for_energy``, ``cp_rank_for_energy`` and ``evbmf``: rank selection.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

# HOOI sweeps after the HOSVD start. Each sweep can only lower the error; a few suffice because
# the HOSVD start is already within a factor sqrt(2) of the best Tucker-2 error.
TUCKER_ITERATIONS = 10
CP_MAX_ITERATIONS = 500
# CP-ALS stops when the relative error changes by less than this between sweeps.
CP_TOLERANCE = 1e-10
# The same, for the trial fits of cp_rank_for_energy's rank search.
CP_SEARCH_TOLERANCE = 1e-5
CP_SEED = 0
# Points of the log-spaced grid on which evbmf searches the noise variance before refining.
VBMF_GRID_POINTS = 200


def relative_error(original: np.ndarray, approximation: np.ndarray) -> float:
    """Return ``||original - approximation||_F / ||original||_F`` (0 for an all-zero original
    that is reproduced exactly, infinity when it is not)."""
    original = np.asarray(original, dtype=np.float64)
    difference = float(np.linalg.norm(original - np.asarray(approximation, dtype=np.float64)))
    scale = float(np.linalg.norm(original))
    if scale == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / scale


def unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    """Return the mode-``mode`` unfolding: [dim_mode, product of the other dims]."""
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def mode_product(tensor: np.ndarray, matrix: np.ndarray, mode: int) -> np.ndarray:
    """Return ``tensor`` with dim ``mode`` contracted against the rows of ``matrix``
    [dim_mode, r], so that dim becomes r. It runs as one BLAS matrix product: the same
    contraction with numpy's einsum took over 100 times longer on PP-OCRv4 rec's kernels."""
    return np.moveaxis(np.tensordot(tensor, matrix, axes=(mode, 0)), -1, mode)


def singular_values(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)


def rank_for_energy(values: np.ndarray, energy: float) -> int:
    """Return the smallest r whose first r singular ``values`` (sorted descending) keep at least
    ``energy`` of the sum of squares. For a truncated SVD that is the smallest r with relative
    error at most ``sqrt(1 - energy)``."""
    squares = np.asarray(values, dtype=np.float64) ** 2
    total = float(squares.sum())
    if total == 0.0:
        return 1
    kept = np.cumsum(squares) / total
    # The small slack keeps energy=1 reachable despite rounding in the cumulative sum.
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(squares)))


# --- truncated SVD -------------------------------------------------------------------------------


@dataclass
class SVDFactors:
    """``matrix ~ left @ right``: ``left`` [m, r] and ``right`` [r, n]."""

    left: np.ndarray
    right: np.ndarray

    @property
    def rank(self) -> int:
        return self.right.shape[0]

    def reconstruct(self) -> np.ndarray:
        return self.left @ self.right

    def cast(self, dtype) -> "SVDFactors":
        """Return the factors rounded to ``dtype`` (and held as float64 again)."""
        return SVDFactors(_rounded(self.left, dtype), _rounded(self.right, dtype))


def truncated_svd(matrix: np.ndarray, rank: int) -> SVDFactors:
    """Return the best rank-``rank`` approximation of ``matrix`` [m, n] as two factors. Each
    factor carries the square root of the singular values, so both have the same scale."""
    u, s, vh = np.linalg.svd(np.asarray(matrix, dtype=np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return SVDFactors(u[:, :rank] * root, root[:, None] * vh[:rank])


# --- Tucker-2 ------------------------------------------------------------------------------------


@dataclass
class Tucker2Factors:
    """``kernel ~ core x_0 out_factor x_1 in_factor``: ``core`` [R_out, R_in, kH, kW],
    ``out_factor`` [C_out, R_out] and ``in_factor`` [C_in, R_in] with orthonormal columns."""

    core: np.ndarray
    out_factor: np.ndarray
    in_factor: np.ndarray

    @property
    def ranks(self) -> tuple[int, int]:
        return self.out_factor.shape[1], self.in_factor.shape[1]

    def reconstruct(self) -> np.ndarray:
        expanded = mode_product(self.core, self.out_factor.T, 0)
        return mode_product(expanded, self.in_factor.T, 1)

    def cast(self, dtype) -> "Tucker2Factors":
        """Return the factors rounded to ``dtype`` (and held as float64 again)."""
        return Tucker2Factors(*(_rounded(a, dtype) for a in
                                (self.core, self.out_factor, self.in_factor)))


def _leading_left_vectors(matrix: np.ndarray, count: int) -> np.ndarray:
    u, _, _ = np.linalg.svd(matrix, full_matrices=False)
    return u[:, :count]


def tucker2(kernel: np.ndarray, ranks: tuple[int, int],
            iterations: int = TUCKER_ITERATIONS) -> Tucker2Factors:
    """Tucker-2 decomposition of a conv ``kernel`` [C_out, C_in, kH, kW] on its two channel
    modes, with ``ranks`` = (R_out, R_in).

    1. HOSVD start: each factor is the leading left singular vectors of its mode unfolding.
    2. HOOI: in turn, project the kernel on the other factor and take the leading left singular
       vectors of the projection's unfolding. That is the exact least-squares update of one
       factor given the other, so the error never rises.
    3. The core is the kernel projected on both factors.

    At full ranks (C_out, C_in) both factors are square and orthogonal, so the result is exact.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    rank_out, rank_in = ranks
    out_factor = _leading_left_vectors(unfold(kernel, 0), rank_out)
    in_factor = _leading_left_vectors(unfold(kernel, 1), rank_in)
    for _ in range(iterations):
        projected = mode_product(kernel, out_factor, 0)
        in_factor = _leading_left_vectors(unfold(projected, 1), rank_in)
        projected = mode_product(kernel, in_factor, 1)
        out_factor = _leading_left_vectors(unfold(projected, 0), rank_out)
    core = mode_product(mode_product(kernel, out_factor, 0), in_factor, 1)
    return Tucker2Factors(core, out_factor, in_factor)


# --- CP ------------------------------------------------------------------------------------------


@dataclass
class CPFactors:
    """``tensor ~ sum_r factors[0][:, r] o factors[1][:, r] o ...``: one [dim_n, R] matrix per
    mode. The scale of each rank-one term is spread evenly over its vectors."""

    factors: list[np.ndarray]
    iterations: int = 0
    history: list[float] = field(default_factory=list)  # relative error after each sweep

    @property
    def rank(self) -> int:
        return self.factors[0].shape[1]

    def reconstruct(self) -> np.ndarray:
        shape = tuple(factor.shape[0] for factor in self.factors)
        return (self.factors[0] @ _khatri_rao(self.factors[1:]).T).reshape(shape)

    def cast(self, dtype) -> "CPFactors":
        """Return the factors rounded to ``dtype`` (and held as float64 again)."""
        return CPFactors([_rounded(f, dtype) for f in self.factors], self.iterations,
                         list(self.history))


def cp_exact_rank(shape: tuple[int, ...]) -> int:
    """Return a rank at which every tensor of ``shape`` has an exact CP decomposition: the
    product of the dims without the largest one (one rank-one term per index of the other
    modes, see ``_exact_cp``). The true CP rank of a given tensor may be lower."""
    dims = sorted(int(d) for d in shape)
    return int(np.prod(dims[:-1], dtype=np.int64))


def _exact_cp(tensor: np.ndarray) -> CPFactors:
    """Return an exact CP decomposition at rank ``cp_exact_rank``. Term (j, k, ...) is the
    fiber of the largest mode at index (j, k, ...) of the other modes, times unit vectors."""
    dense_mode = int(np.argmax(tensor.shape))
    others = [mode for mode in range(tensor.ndim) if mode != dense_mode]
    moved = np.moveaxis(tensor, dense_mode, 0)
    rank = cp_exact_rank(tensor.shape)
    factors: list[np.ndarray] = [np.empty(0)] * tensor.ndim
    factors[dense_mode] = moved.reshape(tensor.shape[dense_mode], rank)
    grid = np.indices([tensor.shape[m] for m in others]).reshape(len(others), rank)
    for position, mode in enumerate(others):
        one_hot = np.zeros((tensor.shape[mode], rank))
        one_hot[grid[position], np.arange(rank)] = 1.0
        factors[mode] = one_hot
    return CPFactors(factors)


def _khatri_rao_contraction(tensor: np.ndarray, factors: list[np.ndarray], mode: int):
    """Return the MTTKRP: the mode-``mode`` unfolding times the Khatri-Rao product of the other
    factors, [dim_mode, R]. The Khatri-Rao rows follow the unfolding's column order (the other
    modes in order, the last one varying fastest)."""
    others = [factor for index, factor in enumerate(factors) if index != mode]
    return unfold(tensor, mode) @ _khatri_rao(others)


def _khatri_rao(factors: list[np.ndarray]) -> np.ndarray:
    """Return the column-wise Kronecker product of ``factors`` [dim_n, R]: row (i, j, ...)
    is the product of row i of the first, row j of the second, ..., the last varying fastest."""
    rank = factors[0].shape[1]
    product = factors[0]
    for factor in factors[1:]:
        product = (product[:, None, :] * factor[None, :, :]).reshape(-1, rank)
    return product


def _initial_cp_factors(tensor: np.ndarray, rank: int, rng: np.random.Generator):
    """Leading left singular vectors of each unfolding, padded with random columns when
    ``rank`` exceeds the mode's dim."""
    factors = []
    for mode, dim in enumerate(tensor.shape):
        leading = _leading_left_vectors(unfold(tensor, mode), min(rank, dim))
        if rank > leading.shape[1]:
            extra = rng.standard_normal((dim, rank - leading.shape[1])) / math.sqrt(dim)
            leading = np.concatenate([leading, extra], axis=1)
        factors.append(leading)
    return factors


def cp_als(tensor: np.ndarray, rank: int, max_iterations: int = CP_MAX_ITERATIONS,
           tolerance: float = CP_TOLERANCE, seed: int = CP_SEED) -> CPFactors:
    """CP decomposition of ``tensor`` at ``rank`` by alternating least squares.

    1. Start from the leading singular vectors of each unfolding (``_initial_cp_factors``).
    2. Per sweep, solve for each factor in turn with the others fixed:
       ``F_n = MTTKRP_n @ pinv(hadamard of F_k^T F_k, k != n)``, then normalize its columns.
    3. Stop when the relative error changes by less than ``tolerance`` or after
       ``max_iterations`` sweeps.
    4. Spread each term's weight evenly over its vectors.

    At ``rank == cp_exact_rank(tensor.shape)`` the exact construction is returned instead,
    because ALS from a generic start need not reach zero error there. Raises ValueError for
    a rank outside [1, cp_exact_rank].
    """
    tensor = np.asarray(tensor, dtype=np.float64)
    limit = cp_exact_rank(tensor.shape)
    if not 1 <= rank <= limit:
        raise ValueError(f"CP rank {rank} is outside [1, {limit}] for shape {tensor.shape}")
    if rank == limit:
        return _exact_cp(tensor)
    norm_squared = float(np.sum(tensor ** 2))
    if norm_squared == 0.0:
        return CPFactors([np.zeros((dim, rank)) for dim in tensor.shape])

    factors = _initial_cp_factors(tensor, rank, np.random.default_rng(seed))
    weights = np.ones(rank)
    history: list[float] = []
    for _ in range(max_iterations):
        for mode in range(tensor.ndim):
            gram = np.ones((rank, rank))
            for other, factor in enumerate(factors):
                if other != mode:
                    gram *= factor.T @ factor
            contraction = _khatri_rao_contraction(tensor, factors, mode)
            updated = contraction @ np.linalg.pinv(gram)
            weights = np.linalg.norm(updated, axis=0)
            factors[mode] = updated / np.where(weights > 0, weights, 1.0)
        # After the last mode's update: <X, Xhat> and ||Xhat||^2 from the small R x R products.
        inner = float(np.sum(contraction * factors[-1] * weights))
        gram_all = np.ones((rank, rank))
        for factor in factors:
            gram_all *= factor.T @ factor
        model_squared = float(weights @ gram_all @ weights)
        error = math.sqrt(max(norm_squared - 2 * inner + model_squared, 0.0) / norm_squared)
        history.append(error)
        if len(history) > 1 and abs(history[-2] - error) < tolerance:
            break
    else:
        logger.debug("CP-ALS at rank %d stopped after %d sweeps, relative error %.3g still "
                     "changing", rank, max_iterations, history[-1] if history else math.nan)
    scale = weights ** (1.0 / tensor.ndim)  # column norms, so never negative
    factors = [factor * scale for factor in factors]
    return CPFactors(factors, len(history), history)


def cp_rank_for_energy(tensor: np.ndarray, energy: float,
                       max_rank: int | None = None) -> CPFactors | None:
    """Return the CP-ALS fit of the smallest rank up to ``max_rank`` (default
    ``cp_exact_rank``) whose relative error is at most ``sqrt(1 - energy)``, the error bound
    that ``energy`` sets for a truncated SVD; None when even ``max_rank`` misses it.

    Bisection over the rank, with looser ALS stopping during the search
    (``CP_SEARCH_TOLERANCE``) and a full fit of the rank found.
    NOTE: ALS finds a local optimum and its error is not strictly decreasing in the rank, so
    the bisection may return a rank slightly above the smallest one that fits.
    """
    tensor = np.asarray(tensor, dtype=np.float64)
    target = math.sqrt(max(1.0 - energy, 0.0))
    limit = cp_exact_rank(tensor.shape)
    high = limit if max_rank is None else min(max_rank, limit)
    if high < 1:
        return None

    def fits(rank: int, tolerance: float) -> CPFactors | None:
        fit = cp_als(tensor, rank, tolerance=tolerance)
        return fit if relative_error(tensor, fit.reconstruct()) <= target else None

    if fits(high, CP_SEARCH_TOLERANCE) is None:
        return None
    low = 1
    while low < high:
        middle = (low + high) // 2
        if fits(middle, CP_SEARCH_TOLERANCE) is not None:
            high = middle
        else:
            low = middle + 1
    return cp_als(tensor, high)


# --- VBMF ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VBMFResult:
    """Output of ``evbmf``: the estimated ``rank``, the estimated ``noise_variance`` of each
    entry, the singular-value ``threshold`` below which components are noise, and the
    posterior-mean singular ``estimates`` of the kept components (shrunk towards 0)."""

    rank: int
    noise_variance: float
    threshold: float
    estimates: np.ndarray


def _phi(z: float) -> float:
    return math.log1p(z) / z - 0.5


def vbmf_tau_threshold(alpha: float) -> float:
    """Return tau_bar, the root of ``Phi(tau) + Phi(tau / alpha) = 0`` with
    ``Phi(z) = log(1 + z) / z - 1/2`` (about 2.5129 * sqrt(alpha)), by bisection. The left
    side falls from 1 at tau -> 0 to -1 at tau -> infinity, so the root is unique."""
    low, high = 1e-12, 1.0
    while _phi(high) + _phi(high / alpha) > 0:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if _phi(middle) + _phi(middle / alpha) > 0:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def _vbmf_free_energy(noise_variance: float, squares: np.ndarray, columns: int, alpha: float,
                      x_threshold: float) -> float:
    """The EVB free energy as a function of the noise variance, up to terms that do not
    depend on it. ``squares`` contains all L squared singular values."""
    x = squares / (columns * noise_variance)
    energy = float(np.sum(x - np.log(x)))
    kept = x[x > x_threshold]
    if kept.size:
        shifted = kept - (1.0 + alpha)
        tau = 0.5 * (shifted + np.sqrt(np.maximum(shifted ** 2 - 4.0 * alpha, 0.0)))
        energy += float(np.sum(np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau))
    return energy


def _golden_minimum(function, low: float, high: float, steps: int = 80) -> float:
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = low, high
    for _ in range(steps):
        left = b - ratio * (b - a)
        right = a + ratio * (b - a)
        if function(left) <= function(right):
            b = right
        else:
            a = left
    return 0.5 * (a + b)


def evbmf(matrix: np.ndarray) -> VBMFResult:
    """Estimate the rank of ``matrix`` (a low-rank signal plus i.i.d. Gaussian noise) with
    empirical variational Bayesian matrix factorization, noise variance included, by the
    global analytic solution of Nakajima, Sugiyama, Babacan and Tomioka, "Global analytic
    solution of fully-observed variational Bayesian matrix factorization", JMLR 14 (2013).

    1. Transpose to L <= M rows; alpha = L / M; gamma_h are the L singular values.
    2. tau_bar from ``vbmf_tau_threshold`` and x_bar = (1 + tau_bar)(1 + alpha / tau_bar).
    3. The noise variance sigma^2 minimizes the free energy
       ``sum_h psi(gamma_h^2 / (M sigma^2))`` with ``psi(x) = x - log x``, plus
       ``log(tau + 1) + alpha log(tau / alpha + 1) - tau`` for x > x_bar, where
       ``tau(x) = (x - 1 - alpha + sqrt((x - 1 - alpha)^2 - 4 alpha)) / 2``. The search runs
       over a log grid between the paper's bounds, then a golden-section refinement.
    4. Component h is kept when gamma_h > sqrt(M sigma^2 x_bar); its estimate is
       ``gamma_h / 2 (1 - (L + M) sigma^2 / gamma_h^2 + sqrt((1 - (L + M) sigma^2 /
       gamma_h^2)^2 - 4 L M sigma^4 / gamma_h^4))``.

    The threshold is above the edge of the spectrum of pure noise of variance sigma^2, which
    is sqrt(M sigma^2) (1 + sqrt(alpha)) for large matrices (Marchenko-Pastur), so a matrix
    whose spectrum is as flat as a random matrix's gets rank 0. Small trained layers can look
    like that: the digits CNN's conv1, conv2 and fc2 do.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape[0] > matrix.shape[1]:
        matrix = matrix.T
    rows, columns = matrix.shape
    alpha = rows / columns
    values = singular_values(matrix)
    squares = values ** 2
    if float(squares.sum()) == 0.0:
        return VBMFResult(0, 0.0, 0.0, np.zeros(0))
    tau_bar = vbmf_tau_threshold(alpha)
    x_threshold = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)

    # At most ceil(L / (1 + alpha)) - 1 components can be kept; the rest bound sigma^2 below.
    max_kept = min(math.ceil(rows / (1.0 + alpha)) - 1, rows - 1)
    upper = float(squares.sum()) / (rows * columns)
    lower = max(squares[max_kept] / (columns * x_threshold),
                float(np.mean(squares[max_kept:])) / columns)
    lower = min(max(lower, upper * 1e-12), upper)

    def free_energy(log_variance: float) -> float:
        return _vbmf_free_energy(math.exp(log_variance), squares, columns, alpha, x_threshold)

    grid = np.linspace(math.log(lower), math.log(upper), VBMF_GRID_POINTS)
    energies = [free_energy(point) for point in grid]
    best = int(np.argmin(energies))
    step = grid[1] - grid[0] if len(grid) > 1 else 0.0
    log_variance = _golden_minimum(free_energy, max(grid[best] - step, grid[0]),
                                   min(grid[best] + step, grid[-1]))
    if free_energy(log_variance) > energies[best]:
        log_variance = grid[best]
    noise_variance = math.exp(log_variance)

    threshold = math.sqrt(columns * noise_variance * x_threshold)
    kept = values[values > threshold]
    ratio = (rows + columns) * noise_variance / kept ** 2
    root = np.sqrt(np.maximum((1.0 - ratio) ** 2
                              - 4.0 * rows * columns * noise_variance ** 2 / kept ** 4, 0.0))
    estimates = kept / 2.0 * (1.0 - ratio + root)
    return VBMFResult(int(kept.size), noise_variance, threshold, estimates)


def _rounded(array: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(array).astype(dtype).astype(np.float64)
