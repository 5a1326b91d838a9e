"""ifg_argmax and ifg_sample for every ISA variant.

argmax: exact (first index of the maximum). sample: the chosen index is compared exactly with a
numpy implementation of the same rule (order by s = f32(logits / temperature) descending, ties by
ascending index; top-k prefix; top-p smallest prefix reaching top_p of the renormalised mass;
inverse CDF at coin). The masses are exp of the same f32 (s - max s) in float64 on the numpy
side and f32 (exp accurate to ~1.5e-7) in C, so a coin or top-p threshold that falls within
1e-6 (relative to the mass) of a cumulative-sum boundary is not compared (the test counts them
and requires almost all coins to be compared).
"""
import numpy as np
import pytest

from conftest import P

COIN_MAX = float(np.nextafter(np.float32(1), np.float32(0)))  # largest f32 below 1
MARGIN = 1e-6


def argmax(kern, x):
    return kern.lib.ifg_argmax(P(kern, x), x.size)


@pytest.mark.parametrize("n", (1, 2, 3, 7, 8, 15, 16, 17, 31, 33, 64, 65, 257, 1000, 32000))
def test_argmax(kern, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    assert argmax(kern, x) == int(np.argmax(x))
    # ties: the maximum at several places → the first
    for first in sorted({0, n // 3, n - 1}):
        y = x.copy()
        m = np.float32(x.max() + 1)
        y[first:] = np.where(rng.random(n - first) < 0.3, m, y[first:])
        y[first] = m
        assert argmax(kern, y) == first
    assert argmax(kern, np.full(n, -np.inf, np.float32)) == 0
    assert argmax(kern, np.full(n, 3.0, np.float32)) == 0
    z = np.full(n, -1.0, np.float32)
    z[-1] = 0.0
    if n > 1:
        z[n // 2] = -0.0  # -0 == +0: the first of them
    assert argmax(kern, z) == (n // 2 if n > 1 else 0)


def ref_order(logits, temperature):
    """(all tokens in order, their masses in float64)."""
    n = logits.size
    s = logits / np.float32(temperature)  # f32, as in C
    d = (s - s.max()).astype(np.float32)  # f32 subtraction, as in C
    return np.lexsort((np.arange(n), -s)), np.exp(d.astype(np.float64))


def sample_ref(logits, temperature, top_k, top_p, pre=None):
    """(kept tokens in order, their cumulative masses (float64), top-p margin)."""
    n = logits.size
    order, e = pre if pre is not None else ref_order(logits, temperature)
    if 0 < top_k < n:
        order = order[:top_k]
    cum = np.cumsum(e[order])
    margin = np.inf
    if top_p < 1:
        target = float(np.float32(top_p)) * cum[-1]
        j = int(np.argmax(cum >= target))
        margin = np.min(np.abs(cum - target)) / cum[-1]
        order, cum = order[: j + 1], cum[: j + 1]
    return order, cum, margin


def draw_ref(order, cum, coin):
    target = float(np.float32(coin)) * cum[-1]
    j = min(int(np.searchsorted(cum, target, side="right")), cum.size - 1)
    return int(order[j]), np.min(np.abs(cum - target)) / cum[-1]


def c_sample(kern, logits, temperature, top_k, top_p, coin, probs, idx):
    return kern.lib.ifg_sample(P(kern, logits), logits.size, temperature, top_k, top_p, coin,
                               P(kern, probs), P(kern, idx, "int32_t *"))


def make_logits(n, kind, rng):
    x = (rng.standard_normal(n) * 3).astype(np.float32)
    if kind == "ties":
        x = np.round(x, 1).astype(np.float32)  # many exact ties
    elif kind == "masked":
        x[rng.random(n) < 0.5] = -np.inf
        x[rng.integers(n)] = 1.0
    elif kind == "peaked":
        x[rng.integers(n)] += 30
    elif kind == "flat":
        x[:] = 1.5  # one bucket holding every token
    elif kind == "levels":
        x = rng.integers(0, 4, size=n).astype(np.float32)  # four big groups of exact ties
    return x


@pytest.mark.parametrize("n", (2, 5, 17, 1000, 32000))
@pytest.mark.parametrize("kind", ("normal", "ties", "masked", "peaked", "flat", "levels"))
def test_sample_matches_reference(kern, n, kind):
    rng = np.random.default_rng(n * 7 + len(kind))
    logits = make_logits(n, kind, rng)
    probs = np.empty(n, np.float32)
    idx = np.empty(n, np.int32)
    n_coins = 8 if n >= 1000 else 20
    compared = total = 0
    for temperature in (0.05, 0.7, 1.0, 1.9, 50.0):
        pre = ref_order(logits, temperature)
        for top_k in sorted({0, 2, 5, 40, n - 1, n, n + 5}):
            for top_p in (1.0, 0.95, 0.5, 1e-9, 0.0):
                order, cum, pm = sample_ref(logits, temperature, top_k, top_p, pre)
                coins = np.concatenate([[0.0, COIN_MAX], rng.random(n_coins)]).astype(np.float32)
                total += n_coins
                for i, coin in enumerate(coins):
                    want, cm = draw_ref(order, cum, coin)
                    if min(pm, cm) < MARGIN and kind != "flat":  # flat: every mass is exactly 1
                        continue
                    compared += i >= 2  # the two edge coins are often (legitimately) skipped
                    got = c_sample(kern, logits, temperature, top_k, top_p, float(coin), probs, idx)
                    assert got == want, (temperature, top_k, top_p, float(coin))
    # (with four levels of exact ties, a cumulative sum can land on top_p * total: skipped)
    assert compared >= (0.75 if kind == "levels" else 0.97) * total, (compared, total)


def test_sample_shortcuts(kern):
    rng = np.random.default_rng(3)
    n = 1000
    probs, idx = np.empty(n, np.float32), np.empty(n, np.int32)
    for _ in range(5):
        logits = np.round(rng.standard_normal(n), 1).astype(np.float32)
        am = int(np.argmax(logits))
        for coin in (0.0, 0.3, COIN_MAX):
            assert c_sample(kern, logits, 0.0, 0, 1.0, coin, probs, idx) == am
            assert c_sample(kern, logits, -1.0, 50, 0.5, coin, probs, idx) == am
            assert c_sample(kern, logits, 1.0, 1, 1.0, coin, probs, idx) == am  # top_k = 1
            assert c_sample(kern, logits, 0.8, 0, 1e-9, coin, probs, idx) == am  # top_p tiny
            assert c_sample(kern, logits, 0.8, 0, 0.0, coin, probs, idx) == am
        for coin in rng.random(20).astype(np.float32):
            base = c_sample(kern, logits, 1.3, 0, 1.0, float(coin), probs, idx)
            # top_p = 1 and top_k >= n keep everything
            assert c_sample(kern, logits, 1.3, n, 1.0, float(coin), probs, idx) == base
            assert c_sample(kern, logits, 1.3, n + 9, 1.0, float(coin), probs, idx) == base
            assert c_sample(kern, logits, 1.3, -3, 1.5, float(coin), probs, idx) == base
    # top_k = 1 is the first token of the order: distinct logits whose s = logits / T round to the
    # same f32 tie by index, like everywhere else
    a = np.float32(1.8)
    while a / np.float32(3) != np.nextafter(a, np.float32(2)) / np.float32(3):
        a = np.nextafter(a, np.float32(2))
    x = np.array([0.0, a, np.nextafter(a, np.float32(2)), -5.0], np.float32)
    s = x / np.float32(3.0)
    assert s[1] == s[2] and x[1] < x[2]
    assert c_sample(kern, x, 3.0, 1, 1.0, 0.5, probs, idx) == 1
    assert c_sample(kern, x, 3.0, 0, 1e-9, 0.5, probs, idx) == 1
    assert c_sample(kern, x, 0.0, 1, 1.0, 0.5, probs, idx) == 2  # temperature 0: plain argmax
    one = np.array([2.0], np.float32)
    assert c_sample(kern, one, 1.0, 0, 0.9, 0.5, probs, idx) == 0


def test_sample_inverse_cdf_counts(kern):
    """Over an evenly spaced grid of coins each kept token is drawn exactly as often as the
    reference's inverse CDF says, i.e. in proportion to its renormalised probability."""
    rng = np.random.default_rng(11)
    n = 300
    logits = make_logits(n, "ties", rng)
    probs, idx = np.empty(n, np.float32), np.empty(n, np.int32)
    coins = ((np.arange(2000) + 0.5) / 2000).astype(np.float32)
    for top_k, top_p in ((0, 1.0), (20, 1.0), (0, 0.8), (50, 0.6)):
        order, cum, _ = sample_ref(logits, 1.0, top_k, top_p)
        got = [c_sample(kern, logits, 1.0, top_k, top_p, float(c), probs, idx) for c in coins]
        want = [draw_ref(order, cum, c)[0] for c in coins]
        assert got == want
        counts = np.bincount(got, minlength=n)
        p = np.zeros(n)
        p[order] = np.diff(np.concatenate([[0.0], cum])) / cum[-1]
        assert np.abs(counts / coins.size - p).max() <= 1.0 / coins.size + 1e-12
        assert set(got) <= set(order.tolist())


def test_sample_deterministic(kern):
    rng = np.random.default_rng(5)
    n = 32000
    logits = make_logits(n, "normal", rng)
    probs, idx = np.empty(n, np.float32), np.empty(n, np.int32)
    for args in ((0.8, 0, 0.9), (1.0, 40, 1.0), (1.0, 0, 1.0)):
        for coin in (0.1, 0.5, 0.9):
            a = c_sample(kern, logits, *args, coin, probs, idx)
            assert all(c_sample(kern, logits, *args, coin, probs, idx) == a for _ in range(3))
