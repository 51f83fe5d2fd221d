"""Extreme eigenvalues of a damped Fisher block, for its condition number, at any block size.

Blocks up to ``EXACT_MAX_K`` wide: ``eigvalsh`` (exact, and cheaper there than iterating).
Above, ``eigvalsh`` is O(k^3) with a large constant (tens of seconds for k = 4096 in float64 on
two CPU cores, times 224 blocks for an 8B model), and the Cholesky diagonal bounds the condition
number from below only, loosely. Lanczos needs matrix-vector products only: on ``A`` for the
largest eigenvalue, and on ``A^-1`` (two triangular solves with the Cholesky factor) for the
smallest. Each Ritz value comes with the residual bound ``|beta_m s_m|``: an eigenvalue of the
operator lies within it, and since the extreme Ritz values converge from inside the spectrum,
iteration stops once that bound is below ``tol`` relative (about 100 steps at k = 4096).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]
EXACT_MAX_K = 512
METHODS = ("auto", "eigvalsh", "lanczos")


def lanczos_largest(matvec: Matvec, k: int, *, dtype=torch.float64, device="cpu",
                    tol: float = 1e-9, max_iter: int = 300,
                    seed: int = 0) -> tuple[float, float]:
    """Largest eigenvalue of the symmetric operator ``matvec`` on R^k.

    Lanczos with full reorthogonalization (two Gram-Schmidt passes keep the basis orthogonal
    to working precision, so no spurious copies of converged Ritz values appear).

    Returns:
        ``(theta, bound)``: the largest Ritz value and its residual bound (an eigenvalue lies
        in ``[theta - bound, theta + bound]``, and ``theta <= lambda_max``).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(k, generator=gen, dtype=dtype).to(device)
    v /= v.norm()
    m = min(k, max_iter)
    basis = torch.zeros(m, k, dtype=dtype, device=device)
    alpha = torch.zeros(m, dtype=dtype)
    beta = torch.zeros(m, dtype=dtype)
    theta, bound = 0.0, float("inf")
    for j in range(m):
        basis[j] = v
        w = matvec(v)
        alpha[j] = torch.dot(w, v).cpu()
        for _ in range(2):  # full reorthogonalization, twice is enough
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta[j] = w.norm().cpu()
        if j % 8 == 7 or j == m - 1 or beta[j] <= 1e-14 * abs(alpha[j]):
            theta, bound = _top_ritz(alpha[: j + 1], beta[: j + 1])
            if bound <= tol * abs(theta) or beta[j] <= 1e-14 * abs(alpha[j]):
                break  # converged, or the Krylov space is invariant (exact)
        v = w / beta[j]
    return theta, bound


def _top_ritz(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[float, float]:
    """Largest eigenvalue of the tridiagonal Lanczos matrix and its residual bound."""
    n = alpha.numel()
    tri = torch.diag(alpha)
    if n > 1:
        off = beta[: n - 1]
        tri += torch.diag(off, 1) + torch.diag(off, -1)
    vals, vecs = torch.linalg.eigh(tri)
    return float(vals[-1]), float(abs(beta[n - 1] * vecs[-1, -1]))


def condition_number(damped: torch.Tensor, chol: torch.Tensor, *, method: str = "auto",
                     tol: float = 1e-9, max_iter: int = 300) -> dict:
    """``lambda_max / lambda_min`` of a symmetric positive definite block and how sure it is.

    Args:
        damped: ``[K, K]`` ``F + lambda I`` (any device, float64).
        chol: its lower Cholesky factor.
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

    inv_top, b_inv = lanczos_largest(inverse, k, dtype=dt, device=dev, tol=tol,
                                     max_iter=max_iter, seed=1)
    cond = top * inv_top
    # Residual bounds, plus the rounding limit of any float64 method: a backward error of
    # eps ||A|| moves lambda_min by up to eps lambda_max, i.e. eps * cond relative (sqrt(k) for
    # the accumulation over a k-long row).
    rel = b_top / abs(top) + b_inv / abs(inv_top) + torch.finfo(dt).eps * cond * k ** 0.5
    return {"condition": cond, "lambda_max": top, "lambda_min": 1.0 / inv_top,
            "rel_error": rel}
