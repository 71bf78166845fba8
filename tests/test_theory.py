"""Exact checks of the closed-form learning coefficients in :mod:`slt.theory`.

Every comparison is between exact ``Fraction``s and ints. Besides the values listed in
THEORY.md, the formulas are cross-checked against each other where the models coincide
(deep linear with L = 2 is reduced rank regression; a width-one bottleneck makes K a
product of radial factors) and against identities the theorems imply.
"""

from __future__ import annotations

import ast
import itertools
import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import slt.theory
from slt.theory import (
    LearningCoefficient,
    deep_linear,
    monomial,
    product_rule,
    radial,
    reduced_rank,
    regular,
    sum_rule,
    tanh_1d,
    two_component_mixture,
)

LC = LearningCoefficient
F = Fraction
SIZES = range(1, 7)


def rrr_grid(sizes=SIZES):
    """All (M, N, H, r) with M, N, H in ``sizes`` and 0 <= r <= min(M, N, H)."""
    for M, N, H in itertools.product(sizes, repeat=3):
        for r in range(min(M, N, H) + 1):
            yield M, N, H, r


# --- the result type ----------------------------------------------------------------


def test_learning_coefficient_repr_float_unpack():
    c = LC(F(3, 2), 1)
    assert repr(c) == "LearningCoefficient(lam=3/2, m=1)"
    assert float(c) == 1.5
    lam, m = c
    assert (lam, m) == (F(3, 2), 1)
    assert LC(2, 1).lam == F(2) and isinstance(LC(2, 1).lam, Fraction)
    with pytest.raises(AttributeError):
        c.m = 2  # frozen


@pytest.mark.parametrize(
    ("lam", "m", "name"), [(F(0), 1, "lam"), (F(-1, 2), 1, "lam"), (F(1), 0, "m")]
)
def test_learning_coefficient_rejects_bad_values(lam, m, name):
    with pytest.raises(ValueError, match=name):
        LC(lam, m)


# --- regular, monomial, radial, rules (THEORY.md examples) ---------------------------


@pytest.mark.parametrize("d", [1, 2, 3, 10, 1341])
def test_regular(d):
    assert regular(d) == LC(F(d, 2), 1)


@pytest.mark.parametrize(
    ("k", "h", "expected"),
    [
        ([1, 1], None, LC(F(1, 2), 2)),  # a²b²
        ([1, 1, 1], None, LC(F(1, 2), 3)),  # a²b²c²
        ([1, 2], None, LC(F(1, 4), 1)),  # a²b⁴
        ([3], None, LC(F(1, 6), 1)),  # a⁶
        ([1, 0], None, LC(F(1, 2), 1)),  # b absent from K: ignored
        ([1, 1], [0, 2], LC(F(1, 2), 1)),  # prior |b|² moves b's pole to 3/2
        ([2, 1], [1, 0], LC(F(1, 2), 2)),  # (1+1)/4 = (0+1)/2: a tie
        ([1, 2], [0, 1], LC(F(1, 2), 2)),  # 1/2 and (1+1)/4
        ([1], [F(-1, 2)], LC(F(1, 4), 1)),  # prior |a|^{-1/2}
        ([2, 3, 1], [1, 2, 0], LC(F(1, 2), 3)),  # 2/4, 3/6, 1/2
    ],
)
def test_monomial(k, h, expected):
    assert monomial(k, h) == expected


def test_monomial_accepts_numpy_integers():
    assert monomial(np.array([1, 1])) == LC(F(1, 2), 2)


@pytest.mark.parametrize(("d", "k"), list(itertools.product(range(1, 6), range(1, 4))))
def test_radial(d, k):
    assert radial(d, k) == LC(F(d, 2 * k), 1)


def test_radial_with_k_one_is_regular():
    for d in range(1, 8):
        assert radial(d, 1) == regular(d)


def test_sum_rule_theory_example():
    # a² + b²c² → (1, 2)
    assert sum_rule(monomial([1]), monomial([1, 1])) == LC(F(1), 2)


def test_sum_rule_of_regular_pieces_is_regular():
    # Σ of d_i-dimensional nondegenerate quadratics is a nondegenerate quadratic in Σ d_i.
    assert sum_rule(regular(2), regular(3), regular(4)) == regular(9)
    assert sum_rule(regular(5)) == regular(5)


def test_sum_rule_multiplicities():
    # a²b² + c²d² + e²: λ = 1/2 + 1/2 + 1/2, m = 2 + 2 + 1 − 2
    assert sum_rule(monomial([1, 1]), monomial([1, 1]), monomial([1])) == LC(F(3, 2), 3)


def test_product_rule_matches_monomial():
    # a² · b²c² is the monomial a²b²c²; a² · b⁴ is a²b⁴.
    assert product_rule(monomial([1]), monomial([1, 1])) == monomial([1, 1, 1])
    assert product_rule(monomial([1]), monomial([2])) == monomial([1, 2])
    assert product_rule(radial(3, 1), monomial([1]), radial(1, 1)) == LC(F(1, 2), 2)


def test_rules_need_arguments():
    with pytest.raises(ValueError, match="sum_rule"):
        sum_rule()
    with pytest.raises(ValueError, match="product_rule"):
        product_rule()
    with pytest.raises(TypeError, match=re.escape("coeffs[1]")):
        product_rule(regular(1), (F(1, 2), 1))


def test_two_component_mixture():
    assert two_component_mixture() == LC(F(1, 2), 2)


# --- reduced rank regression ---------------------------------------------------------


def test_reduced_rank_theory_example():
    assert reduced_rank(2, 2, 2, 0) == LC(F(3, 2), 1)


@pytest.mark.parametrize(("M", "N", "H", "r"), list(rrr_grid()))
def test_reduced_rank_identities(M, N, H, r):
    c = reduced_rank(M, N, H, r)
    if H == r:
        assert c == LC(F(r * (M + N - r), 2), 1)
    if r < H:  # λ(M,N,H,r) = r(M+N−r)/2 + λ(M−r, N−r, H−r, 0); m is unchanged too
        if min(M, N) > r:
            inner = reduced_rank(M - r, N - r, H - r, 0)
            assert c == LC(F(r * (M + N - r), 2) + inner.lam, inner.m)
        else:  # M = r or N = r: the reduced problem has a zero dimension, λ = 0 there
            assert c == LC(F(r * (M + N - r), 2), 1)
    assert c.lam <= F(H * (M + N), 2)  # never above d/2


def _case_formulas(M, N, H, r):
    """The four case formulas of Aoyagi & Watanabe (2005), evaluated without case tests."""
    s = (M + H + N + r) % 2
    return {
        1: F(2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2 + s, 8),
        2: F(H * M - H * r + N * r, 2),
        3: F(H * N - H * r + M * r, 2),
        4: F(M * N, 2),
    }


def test_reduced_rank_continuous_across_case_boundaries():
    # Where case k's strict inequality becomes an equality (M+H = N+r, N+H = M+r or
    # M+N = H+r) the point belongs to case 1, and both formulas must give the same λ, with
    # m = 1 (the parity sum is 2(N+r), 2(M+r) or 2(H+r): even).
    boundaries = {
        2: lambda M, N, H, r: M + H == N + r,
        3: lambda M, N, H, r: N + H == M + r,
        4: lambda M, N, H, r: M + N == H + r,
    }
    seen = dict.fromkeys(boundaries, 0)
    for M, N, H, r in rrr_grid(range(1, 9)):
        c = reduced_rank(M, N, H, r)
        formulas = _case_formulas(M, N, H, r)
        for case, on_boundary in boundaries.items():
            if on_boundary(M, N, H, r):
                seen[case] += 1
                assert c.lam == formulas[case] == formulas[1], (M, N, H, r)
                assert c.m == 1
    assert all(count > 20 for count in seen.values())


def test_reduced_rank_multiplicity_parity_rule():
    for M, N, H, r in rrr_grid(range(1, 9)):
        in_case_1 = N + r <= M + H and M + r <= N + H and H + r <= M + N
        odd = (M + N + H + r) % 2 == 1
        assert reduced_rank(M, N, H, r).m == (2 if in_case_1 and odd else 1), (M, N, H, r)


def test_reduced_rank_is_symmetric_in_inputs_and_outputs():
    # Transposing y = BAx swaps M and N.
    for M, N, H, r in rrr_grid():
        assert reduced_rank(M, N, H, r) == reduced_rank(N, M, H, r)


@pytest.mark.parametrize(("M", "N"), list(itertools.product(SIZES, repeat=2)))
def test_reduced_rank_single_hidden_unit_is_product_of_radials(M, N):
    # Hand derivation: H = 1, r = 0 gives f(x) = b (aᵀx), K = |b|² aᵀΣa ≍ |b|²|a|², a
    # product of radial(M, 1) and radial(N, 1) in disjoint variables:
    # λ = min(M, N)/2, m = 2 if M = N else 1.
    expected = product_rule(radial(M, 1), radial(N, 1))
    assert expected == LC(F(min(M, N), 2), 2 if M == N else 1)
    assert reduced_rank(M, N, 1, 0) == expected


@pytest.mark.parametrize("H", range(1, 9))
def test_reduced_rank_scalar_in_scalar_out(H):
    # Hand derivation: M = N = 1, r = 0 gives K ≍ q², q = Σ_h a_h b_h, a nondegenerate
    # quadratic form in n = 2H variables. ∫|q|^{2z} has a pole at −1/2 from the smooth
    # part of the cone {q = 0} and one at −n/4 from the origin; they coincide only at
    # n = 2 (q = ab). So (1/2, 2) for H = 1 and (1/2, 1) for H ≥ 2.
    assert reduced_rank(1, 1, H, 0) == LC(F(1, 2), 2 if H == 1 else 1)


def test_reduced_rank_more_hand_cases():
    # M=3, N=1, H=1: f = b (aᵀx), K ≍ b²|a|² → min(1/2, 3/2) = 1/2, m = 1 (case 3).
    assert reduced_rank(3, 1, 1, 0) == LC(F(1, 2), 1)
    # M=N=H=1, r=1: a regular point of the curve ab = c ≠ 0 in R² → (1/2, 1).
    assert reduced_rank(1, 1, 1, 1) == LC(F(1, 2), 1)
    # M=N=H=3, r=3: every point is regular up to the GL(3) gauge: λ = 9 + 9 − 9 = 9 → 9/2.
    assert reduced_rank(3, 3, 3, 3) == LC(F(9, 2), 1)


def test_reduced_rank_accepts_numpy_integers():
    assert reduced_rank(np.int64(2), np.int32(2), np.int64(2), np.int64(0)) == LC(F(3, 2), 1)


# --- deep linear networks ------------------------------------------------------------


@pytest.mark.parametrize(("M", "N", "H", "r"), list(rrr_grid()))
def test_deep_linear_two_layers_is_reduced_rank(M, N, H, r):
    # widths are (input, hidden, output) = (M, H, N).
    assert deep_linear([M, H, N], r) == reduced_rank(M, N, H, r)


@pytest.mark.parametrize(("a", "b"), list(itertools.product(range(1, 5), repeat=2)))
def test_deep_linear_one_layer_is_regular(a, b):
    for r in range(min(a, b) + 1):
        assert deep_linear([a, b], r) == regular(a * b)


@pytest.mark.parametrize("L", range(1, 8))
def test_deep_linear_scalar_chain_is_monomial(L):
    # L scalar weights, true product 0: K ≍ (w_1 ⋯ w_L)² = monomial with L ones.
    assert deep_linear([1] * (L + 1), 0) == monomial([1] * L)


@pytest.mark.parametrize(
    ("first", "last", "L"), list(itertools.product(range(1, 6), range(1, 6), range(2, 6)))
)
def test_deep_linear_width_one_bottleneck_is_product(first, last, L):
    # Hand derivation: widths (H_1, 1, …, 1, H_{L+1}), r = 0. Then f(x) = B c ⋯ aᵀx with
    # L − 2 scalars c, and K ≍ |B|² Π c² |a|²: a product of radial(H_1), L − 2 copies of
    # monomial([1]) and radial(H_{L+1}) in disjoint variables.
    widths = [first] + [1] * (L - 1) + [last]
    factors = [radial(first, 1), *[monomial([1])] * (L - 2), radial(last, 1)]
    assert deep_linear(widths, 0) == product_rule(*factors)


def _small_networks():
    for L in (2, 3, 4):
        for widths in itertools.product(range(1, 5), repeat=L + 1):
            for r in range(min(widths) + 1):
                yield list(widths), r


def test_deep_linear_bounded_by_half_dimension_and_reversible():
    count = 0
    for widths, r in _small_networks():
        c = deep_linear(widths, r)
        d = sum(h * g for h, g in itertools.pairwise(widths))
        assert c.lam <= F(d, 2), (widths, r)
        # Transposing the network reverses the widths and keeps the rank.
        assert deep_linear(widths[::-1], r) == c, (widths, r)
        count += 1
    assert count > 1000


def test_deep_linear_zero_reduced_width():
    # Some M_j = H_j − r = 0: λ = r(H_1 + H_{L+1} − r)/2, m = 1.
    assert deep_linear([3, 2, 4, 5], 2) == LC(F(2 * (3 + 5 - 2), 2), 1)
    assert deep_linear([1, 1, 1, 1], 1) == LC(F(1, 2), 1)  # regular point of abc = c₀ ≠ 0
    assert deep_linear([4, 6, 3, 5], 3) == LC(F(3 * (4 + 5 - 3), 2), 1)


def test_deep_linear_three_layer_hand_examples():
    # widths (2, 2, 2, 2), r = 0, by hand from Theorem 1: M = (2, 2, 2, 2) and the prefix
    # test Σ M ≥ ℓ max M holds for every prefix, so Σ = all, ℓ = 3, S = 8, M̄ = ⌈8/3⌉ = 3,
    # a = 8 − 2·3 = 2. λ = 0 + 2·1/12 − (3·2/4)(8/3)² + ½·6·4 = 1/6 − 32/3 + 12 = 3/2,
    # m = 2·1 + 1 = 3.
    assert deep_linear([2, 2, 2, 2], 0) == LC(F(3, 2), 3)
    # widths (2, 2, 2, 9), r = 0: sorted M = (2, 2, 2, 9); the full set fails (ii)
    # (15 < 3·9), the prefix (2, 2, 2) passes (6 ≥ 2·2) and (iii) (6 < 2·9). ℓ = 2, S = 6,
    # M̄ = 3, a = 2, λ = 0 + 0 − (2·1/4)·9 + ½·12 = 3/2, m = 1.
    assert deep_linear([2, 2, 2, 9], 0) == LC(F(3, 2), 1)
    # widths (3, 2, 2, 3), r = 1: M = (2, 1, 1, 2), Σ = all (6 ≥ 3·2), ℓ = 3, S = 6,
    # M̄ = 2, a = 3, λ = (−1 + 6)/2 + 0 − (6/4)·4 + ½(2+2+4+1+2+2) = 5/2 − 6 + 13/2 = 3,
    # m = 1.
    assert deep_linear([3, 2, 2, 3], 1) == LC(F(3), 1)


def test_deep_linear_accepts_tuples_and_numpy():
    assert deep_linear((2, 2, 2), 0) == deep_linear(np.array([2, 2, 2]), np.int64(0))


# --- tanh ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("H", "expected"),
    [
        (1, LC(F(1, 2), 2)),  # K ≍ a²b²
        (2, LC(F(2, 3), 1)),  # i = 1: (2 + 2)/6
        (3, LC(F(5, 6), 1)),  # i = 1: (3 + 2)/6
        (4, LC(F(1), 2)),  # i = 2: (4 + 6)/10
        (5, LC(F(11, 10), 1)),  # i = 2: (5 + 6)/10
        (9, LC(F(3, 2), 2)),  # i = 3: (9 + 12)/14
        (10, LC(F(11, 7), 1)),  # i = 3: (10 + 12)/14
    ],
)
def test_tanh_1d_values(H, expected):
    assert tanh_1d(H) == expected


def test_tanh_1d_is_a_minimum_over_j_with_ties_at_squares():
    # λ = min over j ≥ 0 of (H + j² + j)/(4j + 2) (j = 0 gives H/2); the minimiser is
    # unique except at H = i², where j = i − 1 and j = i tie, matching m = 2 there.
    for H in range(1, 401):
        candidates = [F(H + j * j + j, 4 * j + 2) for j in range(0, H + 2)]
        lam = min(candidates)
        assert tanh_1d(H) == LC(lam, candidates.count(lam)), H
        if math.isqrt(H) ** 2 == H:
            assert tanh_1d(H).lam == F(math.isqrt(H), 2)


# --- validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: regular(0), "d"),
        (lambda: regular(2.0), "d"),
        (lambda: regular(True), "d"),
        (lambda: radial(0, 1), "d"),
        (lambda: radial(2, 0), "k"),
        (lambda: monomial([1, -1]), "k[1]"),
        (lambda: monomial([0, 0]), "k"),
        (lambda: monomial([1, 1.5]), "k[1]"),
        (lambda: monomial([1, 1], [0]), "h"),
        (lambda: monomial([1], [-1]), "h[0]"),
        (lambda: monomial([1], [F(-3, 2)]), "h[0]"),
        (lambda: monomial([1], [0.5]), "h[0]"),
        (lambda: reduced_rank(0, 2, 2, 0), "M"),
        (lambda: reduced_rank(2, 0, 2, 0), "N"),
        (lambda: reduced_rank(2, 2, 0, 0), "H"),
        (lambda: reduced_rank(2, 2, 2, -1), "r"),
        (lambda: reduced_rank(3, 4, 2, 3), "r"),
        (lambda: reduced_rank(2, 2, 2, 1.0), "r"),
        (lambda: deep_linear([3, 0, 2], 0), "widths[1]"),
        (lambda: deep_linear([3], 0), "widths"),
        (lambda: deep_linear([3, 2, 4], 3), "r"),
        (lambda: deep_linear([3, 2, 4], -1), "r"),
        (lambda: tanh_1d(0), "H"),
        (lambda: tanh_1d(2.5), "H"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{re.escape(name)} must"):
        call()


def test_theory_package_does_not_import_torch():
    package = Path(slt.theory.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] in {"torch", "numpy", "scipy"} for n in names), source
