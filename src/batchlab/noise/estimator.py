"""The gradient noise scale's math: McCandlish's unbiased two-batch estimator and its bias-corrected EMA tracker.

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training" (App. A): the squared norm of a
batch-B mean gradient has expectation E|G_B|² = |G|² + tr(Σ)/B, where G is the true gradient and Σ the
per-example gradient covariance. Two batch sizes B_small < B_big give both components (eq. A.2), and the
simple noise scale B_simple = tr(Σ)/|G|² predicts the critical batch size.

Plain numbers in and out (no torch): :func:`estimate_components` is eq. A.2; :class:`GradientNoiseScale`
keeps separate bias-corrected EMAs of |G|² and tr(Σ) and reports B_simple as their ratio. The torch side --
where the two squared norms come from -- is :mod:`batchlab.noise.collectors`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

from batchlab import checks

__all__ = [
    "estimate_components",
    "curvature_components",
    "GradientNoiseScale",
    "NoiseScaleEstimate",
    "DEFAULT_BETA",
    "check_beta",
]

# EMA decay of the tracker: a ~100-update window. Per-update estimates are noisy (their spread is often larger
# than their mean), while |G|² drifts as training goes on; k-diffusion uses 0.9998 for runs of 100k+ steps.
DEFAULT_BETA = 0.99


def check_beta(value: object, name: str = "beta") -> float:
    """The tracker's EMA decay as a float in [0, 1) (0 keeps only the latest update; 1 would never move)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"invalid {name} {value!r}: expected a number in [0, 1) (the EMA decay)")
    return float(value)


def _check_sizes(b_small: object, b_big: object) -> tuple[float, float]:
    bs = checks.number("b_small", b_small, what="a batch size")
    bb = checks.number("b_big", b_big, what="a batch size")
    if not bs < bb:
        raise ValueError(f"b_small must be smaller than b_big, got b_small={b_small!r}, b_big={b_big!r}")
    return bs, bb


def _check_sq_norm(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number (a squared norm), got {value!r}")
    x = float(value)
    if x < 0:
        raise ValueError(f"{name} must be >= 0 (a squared norm), got {value!r}")
    return x


def estimate_components(
    sq_norm_small: float, sq_norm_big: float, b_small: float, b_big: float
) -> tuple[float, float]:
    """Unbiased estimates ``(g2, trace_sigma)`` of |G|² and tr(Σ) from two squared gradient norms.

    McCandlish et al. 2018, App. A, eq. A.2, with |G_B|² the squared norm of a batch-B mean gradient:
    |G|² ≈ (B_big·|G_big|² − B_small·|G_small|²)/(B_big − B_small) and
    tr(Σ) ≈ (|G_small|² − |G_big|²)/(1/B_small − 1/B_big).
    Each is unbiased because E|G_B|² = |G|² + tr(Σ)/B; either may come out negative on a single pair.
    ``sq_norm_small`` may be a mean over several small batches of size ``b_small`` (still unbiased); the
    batch sizes may be non-integer (e.g. a harmonic mean of unequal sizes). NaN/inf norms propagate.
    Raises ``ValueError`` for batch sizes that are not ``0 < b_small < b_big`` or for negative norms.
    """
    bs, bb = _check_sizes(b_small, b_big)
    s, b = _check_sq_norm("sq_norm_small", sq_norm_small), _check_sq_norm("sq_norm_big", sq_norm_big)
    return _two_batch(s, b, bs, bb)


def _two_batch(small: float, big: float, bs: float, bb: float) -> tuple[float, float]:
    """Eq. A.2 for any quadratic form q with E q(G_B) = q(G) + tr(QΣ)/B: (q(G), tr(QΣ))."""
    return (bb * big - bs * small) / (bb - bs), (small - big) / (1.0 / bs - 1.0 / bb)


def curvature_components(
    quad_small: float, quad_big: float, b_small: float, b_big: float
) -> tuple[float, float]:
    """Unbiased estimates ``(g_h_g, trace_h_sigma)`` of GᵀHG and tr(HΣ) from g_Bᵀ H g_B at two batch sizes.

    McCandlish et al. 2018, section 2.2 and App. A: the critical batch of SGD at the optimal step size is
    B_noise = tr(HΣ)/GᵀHG, which equals B_simple = tr(Σ)/|G|² only when the Hessian H is a multiple of the
    identity. For a batch-B mean gradient g_B (and H independent of it), E[g_Bᵀ H g_B] = GᵀHG + tr(HΣ)/B --
    the same form as E|g_B|² -- so eq. A.2 applies with H-weighted norms (``quad_*`` = g_Bᵀ H g_B, from
    Hessian-vector products). Unlike squared norms these may be negative (H is indefinite away from a
    minimum), so they are only checked to be real and finite-or-NaN; the sizes as for
    :func:`estimate_components`.
    """
    bs, bb = _check_sizes(b_small, b_big)
    for name, value in (("quad_small", quad_small), ("quad_big", quad_big)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a real number (g_Bᵀ H g_B), got {value!r}")
    return _two_batch(float(quad_small), float(quad_big), bs, bb)


# --------------------------------------------------------------------------------------------------- tracker


@dataclass(frozen=True)
class NoiseScaleEstimate:
    """What a :class:`GradientNoiseScale` has measured so far.

    ``b_simple`` is tr(Σ)/|G|² from the EMAs, or ``None`` with the reason in ``note`` (no updates yet, or an
    EMA ≤ 0: gradient noise dominates the signal). ``*_stderr`` are standard errors (delta method over the
    EMA-weighted per-update estimates, see :meth:`GradientNoiseScale.result`), ``None`` until two updates.
    ``samples`` sums B_big over the accepted updates; ``effective_updates`` is the EMA's effective count.
    """

    b_simple: float | None
    b_simple_stderr: float | None
    g2: float | None
    g2_stderr: float | None
    trace_sigma: float | None
    trace_sigma_stderr: float | None
    updates: int
    effective_updates: float
    samples: float
    skipped: int
    beta: float
    note: str

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict of every field (no NaN or inf: missing values are ``None``)."""
        return asdict(self)


class GradientNoiseScale:
    """Running gradient noise scale B_simple = EMA(tr Σ)/EMA(|G|²) (McCandlish et al. 2018, App. A).

    Each :meth:`update` turns one pair of squared norms into per-update estimates of |G|² and tr(Σ)
    (:func:`estimate_components`) and folds them into separate exponential moving averages with decay
    ``beta``, bias-corrected like Adam's moments (divide by 1 − beta^t), so early values are not pulled
    toward zero. The ratio is taken of the averages, not averaged ratios: a single pair's |G|² estimate is
    often ≤ 0 and its ratio meaningless. Non-finite inputs (AMP overflow) are skipped and counted.

    ``beta=0`` keeps only the latest update; values near 1 average longer (window ≈ 1/(1 − beta)).
    """

    def __init__(self, beta: float = DEFAULT_BETA) -> None:
        self.beta = check_beta(beta)
        self.reset()

    def reset(self) -> None:
        """Forget every update (and the skip count)."""
        self._t = 0
        self._decay = 1.0  # beta ** t, for the bias correction
        # EMAs (not yet bias-corrected) of x = |G|² estimate, y = tr(Σ) estimate, and the second moments of
        # their successive differences (the standard errors' scatter, see result())
        self._x = self._y = 0.0
        self._dxx = self._dyy = self._dxy = 0.0
        self._last: tuple[float, float] | None = None
        self._samples = 0.0
        self._skipped = 0

    def update(self, sq_norm_small: float, sq_norm_big: float, b_small: float, b_big: float) -> bool:
        """Fold one pair of squared gradient norms into the EMAs; return False if it was skipped.

        ``sq_norm_small`` is |G_small|² (or a mean of several) at batch ``b_small``; ``sq_norm_big`` is |G_big|²
        at ``b_big`` > ``b_small``. Non-finite norms are skipped and counted in ``skipped``; invalid batch sizes
        or negative norms raise ``ValueError``.
        """
        bs, bb = _check_sizes(b_small, b_big)
        s, b = _check_sq_norm("sq_norm_small", sq_norm_small), _check_sq_norm("sq_norm_big", sq_norm_big)
        if not (math.isfinite(s) and math.isfinite(b)):
            self._skipped += 1
            return False
        x, y = estimate_components(s, b, bs, bb)
        c = 1.0 - self.beta
        self._x += c * (x - self._x)
        self._y += c * (y - self._y)
        if self._last is not None:
            dx, dy = x - self._last[0], y - self._last[1]
            self._dxx += c * (dx * dx - self._dxx)
            self._dyy += c * (dy * dy - self._dyy)
            self._dxy += c * (dx * dy - self._dxy)
        self._last = (x, y)
        self._t += 1
        self._decay *= self.beta
        self._samples += bb
        return True

    @property
    def updates(self) -> int:
        """Number of accepted updates."""
        return self._t

    @property
    def skipped(self) -> int:
        """Number of updates skipped for non-finite norms."""
        return self._skipped

    @property
    def samples(self) -> float:
        """Samples behind the accepted updates (the sum of their B_big)."""
        return self._samples

    @property
    def g2(self) -> float | None:
        """Bias-corrected EMA of the |G|² estimates (None before the first update)."""
        return self._x / (1.0 - self._decay) if self._t else None

    @property
    def trace_sigma(self) -> float | None:
        """Bias-corrected EMA of the tr(Σ) estimates (None before the first update)."""
        return self._y / (1.0 - self._decay) if self._t else None

    @property
    def b_simple(self) -> float | None:
        """B_simple = EMA(tr Σ)/EMA(|G|²), or None when undefined (see :meth:`result` for why)."""
        return self.result().b_simple

    def result(self) -> NoiseScaleEstimate:
        """The current estimate with its uncertainty.

        Uncertainty: the normalised EMA weights w_t (Σ w_t = 1) give an effective number of updates
        n_eff = 1/Σ w_t² = (1 + beta)(1 − beta^T)/((1 − beta)(1 + beta^T)), and the standard error of a weighted
        mean X̄ is sqrt(s²/n_eff), treating updates as independent (each sees fresh data). The scatter s² is half
        the weighted mean square of *successive differences*, s² = Σ w (x_t − x_{t−1})²/2 (von Neumann 1941),
        not the scatter about X̄: |G|² and tr(Σ) drift as training goes on, and scatter about a drifting mean
        counts the drift as noise. The ratio B = Ȳ/X̄ follows by the delta method, SE(B) = sqrt(s_z²/n_eff)/|X̄|
        with z_t = y_t − B·x_t. All sums are EMAs, so this costs O(1) per update; it is reported only while
        |G|² > 0, from the second update on.

        Checked against the spread of 48 measurements from one state (benchmarks/noise_stderr.py, RESULTS.md
        "The standard error from successive differences, landed"): spread / SE is 1.02-1.07 on MNIST-1D,
        0.94-1.01 on the char-LM, whose B_simple grows 4x in 300 steps (the scatter about the mean gave
        0.58-0.65, an interval 1.7x too wide), and 1.2-1.4 on digits, the one the independence assumption
        misses: its interval is that much too narrow.
        """
        t = self._t
        if t == 0:
            return NoiseScaleEstimate(
                None, None, None, None, None, None, 0, 0.0, 0.0, self._skipped, self.beta,
                "no updates yet" + (f" ({self._skipped} skipped for non-finite norms)" if self._skipped else ""),
            )  # fmt: skip
        corr = 1.0 - self._decay
        x, y = self._x / corr, self._y / corr
        beta_t = self._decay
        sum_w2 = 1.0 if self.beta == 0.0 else (1.0 - self.beta) * (1.0 + beta_t) / ((1.0 + self.beta) * corr)
        n_eff = 1.0 / sum_w2
        diff_corr = 1.0 - self.beta ** (t - 1)  # the t - 1 differences' bias correction; 0 before the second
        dxx, dyy, dxy = (v / diff_corr if diff_corr > 0.0 else 0.0 for v in (self._dxx, self._dyy, self._dxy))

        def stderr(mean_sq_difference: float) -> float | None:
            if t < 2 or sum_w2 >= 1.0 - 1e-12:  # one (effective) update: no spread to measure
                return None
            return math.sqrt(max(0.0, mean_sq_difference) / 2.0 * sum_w2)

        g2_se, tr_se = stderr(dxx), stderr(dyy)
        notes = []
        b_simple = b_se = None
        if x <= 0.0:
            notes.append(
                f"|G|² EMA is {x:.3g} <= 0: gradient noise dominates the signal at these batch sizes, so "
                f"B_simple is unbounded (very large); collect more updates or use a larger B_big"
            )
        elif y <= 0.0:
            notes.append(
                f"tr(Σ) EMA is {y:.3g} <= 0: no measurable gradient noise yet (B_simple ≈ 0); collect more updates"
            )
        else:
            b_simple = y / x
            dz2 = dyy - 2.0 * b_simple * dxy + b_simple * b_simple * dxx  # weighted mean of (z_t - z_{t-1})²
            se = stderr(dz2)
            b_se = se / x if se is not None else None
        if self._skipped:
            notes.append(f"{self._skipped} update(s) skipped for non-finite norms")
        return NoiseScaleEstimate(
            b_simple=b_simple,
            b_simple_stderr=b_se,
            g2=x,
            g2_stderr=g2_se,
            trace_sigma=y,
            trace_sigma_stderr=tr_se,
            updates=t,
            effective_updates=n_eff,
            samples=self._samples,
            skipped=self._skipped,
            beta=self.beta,
            note="; ".join(notes) if notes else f"B_simple from {t} updates ({n_eff:.1f} effective)",
        )
