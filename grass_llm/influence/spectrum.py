"""Extreme eigenvalues of a damped Fisher block, for its condition number, at any block size.

Blocks up to ``EXACT_MAX_K`` wide: ``eigvalsh`` (exact, and cheaper there than iterating).
Above, ``eigvalsh`` is O(k^3) with a large constant (tens of seconds for k = 4096 in float64 on
two CPU cores, times 224 blocks for an 8B model), and the Cholesky diagonal bounds the condition
number from below only, loosely. Lanczos needs matrix-vector products only: on ``A`` for the
largest eigenvalue, and on ``A^-1`` (two triangular solves with the Cholesky factor) for the
smallest. Each Ritz value comes with the residual bound ``|beta_m s_m|``: an eigenvalue of the
operator lies within it, and since the extreme Ritz values converge from inside the spectrum,
iteration stops once that bound is below ``tol`` relative (1e-6; the eigenvalue itself is
then much closer, ~bound^2 / gap).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]
EXACT_MAX_K = 512
METHODS = ("auto", "eigvalsh", "lanczos")


def lanczos_largest(matvec: Matvec, k: int, *, dtype=torch.float64, device="cpu",
                    tol: float = 1e-6, max_iter: int = 300, seed: int = 0,
                    stop_above: float | None = None) -> tuple[float, float]:
    """Largest eigenvalue of the symmetric operator ``matvec`` on R^k.

    Stops when the residual bound is below ``tol`` relative, or when the Ritz value reaches
    ``stop_above`` (an upper bound on the eigenvalue known from elsewhere, so it is pinned).

    Lanczos with full reorthogonalization (two Gram-Schmidt passes keep the basis orthogonal
    to working precision, so no spurious copies of converged Ritz values appear). Convergence
    is checked at geometrically spaced steps (the small tridiagonal eigenproblem is solved in
    numpy there).

    Returns:
        ``(theta, bound)``: the largest Ritz value and its residual bound (an eigenvalue lies
        in ``[theta - bound, theta + bound]``, and ``theta <= lambda_max``).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(k, generator=gen, dtype=dtype).to(device)
    v /= v.norm()
    m = min(k, max_iter)
    basis = torch.zeros(m, k, dtype=dtype, device=device)
    alpha, beta = [], []
    theta, bound = 0.0, float("inf")
    check = 8
    for j in range(m):
        basis[j] = v
        w = matvec(v)
        alpha.append(float(torch.dot(w, v)))
        for _ in range(2):  # full reorthogonalization, twice is enough
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta.append(float(w.norm()))
        invariant = beta[-1] <= 1e-14 * abs(alpha[-1])  # the Krylov space is exact
        if j + 1 >= check or j == m - 1 or invariant:
            check = int(check * 1.5)
            theta, bound = _top_ritz(alpha, beta)
            pinned = stop_above is not None and theta >= stop_above
            if bound <= tol * abs(theta) or invariant or pinned:
                break
        v = w / beta[-1]
    return theta, bound


def _top_ritz(alpha: list[float], beta: list[float]) -> tuple[float, float]:
    """Largest eigenvalue of the tridiagonal Lanczos matrix and its residual bound."""
    n = len(alpha)
    tri = np.diag(alpha)
    if n > 1:
        off = np.asarray(beta[: n - 1])
        tri += np.diag(off, 1) + np.diag(off, -1)
    vals, vecs = np.linalg.eigh(tri)
    return float(vals[-1]), float(abs(beta[n - 1] * vecs[-1, -1]))


def condition_number(damped: torch.Tensor, chol: torch.Tensor, *, floor: float | None = None,
                     method: str = "auto", tol: float = 1e-4, max_iter: int = 300) -> dict:
    """``lambda_max / lambda_min`` of a symmetric positive definite block and how sure it is.

    Args:
        damped: ``[K, K]`` ``F + lambda I`` (any device, float64).
        chol: its lower Cholesky factor.
        floor: a known lower bound of the smallest eigenvalue: the damping lambda (F is
            positive semidefinite). The smallest eigenvalue then lies in ``[floor, 1/theta]``
            for the Ritz value theta of the inverse, and iteration stops once that interval is
            within ``tol`` (the usual case: the bottom of a damped Fisher's spectrum is a dense
            cluster just above lambda, where Lanczos alone converges slowly).
        method: ``"eigvalsh"``, ``"lanczos"`` or ``"auto"`` (eigvalsh up to ``EXACT_MAX_K``).

    Returns:
        ``{"condition", "lambda_max", "lambda_min", "rel_error"}``: ``rel_error`` bounds the
        relative error of the condition number (the two residual bounds, first order, plus
        float64 rounding).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    k = damped.shape[0]
    dev, dt = damped.device, damped.dtype
    if method == "eigvalsh" or (method == "auto" and k <= EXACT_MAX_K):
        eig = torch.linalg.eigvalsh(damped)
        lo, hi = float(eig[0]), float(eig[-1])
        return {"condition": hi / lo, "lambda_max": hi, "lambda_min": lo,
                "rel_error": torch.finfo(dt).eps * (hi / lo) * k ** 0.5}
    top, b_top = lanczos_largest(lambda v: damped @ v, k, dtype=dt, device=dev, tol=tol,
                                 max_iter=max_iter, seed=0)

    def inverse(v):  # two triangular solves (cholesky_solve is ~10x slower for one vector)
        y = torch.linalg.solve_triangular(chol, v[:, None], upper=False)
        return torch.linalg.solve_triangular(chol.T, y, upper=True)[:, 0]

    stop = None if floor is None or not floor > 0 else (1 - tol) / floor
    inv_top, b_inv = lanczos_largest(inverse, k, dtype=dt, device=dev, tol=tol,
                                     max_iter=max_iter, seed=1, stop_above=stop)
    cond = top * inv_top
    err_min = b_inv / abs(inv_top)
    if stop is not None:  # lambda_min in [floor, 1 / inv_top]
        err_min = min(err_min, max(0.0, 1.0 - floor * inv_top))
    # Residual bounds, plus the rounding limit of any float64 method: a backward error of
    # eps ||A|| moves lambda_min by up to eps lambda_max, i.e. eps * cond relative (sqrt(k) for
    # the accumulation over a k-long row).
    rel = b_top / abs(top) + err_min + torch.finfo(dt).eps * cond * k ** 0.5
    return {"condition": cond, "lambda_max": top, "lambda_min": 1.0 / inv_top,
            "rel_error": rel}
