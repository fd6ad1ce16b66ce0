"""DARE drop-and-rescale kernel and its counter-based RNG."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from merge.kernels.dare import dare, dare_inplace, dare_key, uniform

F32 = np.float32
U64 = (1 << 64) - 1
REPO = Path(__file__).resolve().parents[1]


def ref_uniform(key: int, index: int) -> float:
    """Plain-Python splitmix64-based uniform, as documented in merge.kernels.dare."""

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
        return z ^ (z >> 31)

    z = mix(key ^ mix(((index + 1) * 0x9E3779B97F4A7C15) & U64))
    return (z >> 11) * 2.0**-53


def nonzero_vector(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(n).astype(F32)
    x[x == 0] = 1.0
    return x


@settings(max_examples=100, deadline=None)
@given(key=st.integers(0, U64), index=st.integers(0, 2**48))
def test_uniform_matches_python_reference(key, index):
    u = uniform(np.uint64(key), index)
    assert u == ref_uniform(key, index)
    assert 0.0 <= u < 1.0


def test_mask_matches_reference_and_survivors_rescaled_exactly():
    x = nonzero_vector(3000, seed=1)
    key = dare_key(7, "layers.0.mlp.up_proj.weight", 1)
    for density in (0.1, 0.3, 0.77):
        y = dare(x, density, key)
        keep = np.array([ref_uniform(key, i) < density for i in range(x.size)])
        np.testing.assert_array_equal(y != 0, keep)
        expected = (x[keep].astype(np.float64) / density).astype(F32)
        np.testing.assert_array_equal(y[keep], expected)
        assert np.all(y[~keep].view(np.uint32) == 0)  # dropped entries are +0.0


def test_keep_rate_is_binomial():
    n, density = 200_000, 0.3
    y = dare(np.ones(n, F32), density, dare_key(0, "w", 0))
    kept = int(np.count_nonzero(y))
    sigma = (n * density * (1 - density)) ** 0.5
    assert abs(kept - n * density) < 4 * sigma


def test_masks_of_different_keys_are_independent():
    n = 100_000
    a = dare(np.ones(n, F32), 0.5, dare_key(0, "w", 0)) != 0
    b = dare(np.ones(n, F32), 0.5, dare_key(0, "w", 1)) != 0
    both = int(np.count_nonzero(a & b))
    assert abs(both - n / 4) < 4 * (n * 0.25 * 0.75) ** 0.5


def test_determinism_and_key_sensitivity():
    x = nonzero_vector(5000)
    key = dare_key(42, "model.embed.weight", 0)
    np.testing.assert_array_equal(dare(x, 0.5, key), dare(x, 0.5, key))
    masks = {
        (dare(x, 0.5, k) != 0).tobytes()
        for k in (
            key,
            dare_key(43, "model.embed.weight", 0),
            dare_key(42, "model.embed.bias", 0),
            dare_key(42, "model.embed.weight", 1),
        )
    }
    assert len(masks) == 4


def test_dare_key():
    k = dare_key(1, "a", 0)
    assert k == dare_key(1, "a", 0)
    assert 0 <= k < 2**64
    keys = {dare_key(1, "23", 4), dare_key(12, "3", 4), dare_key(1, "2", 34), dare_key(-1, "", 0)}
    assert len(keys) == 4  # fields are length-prefixed: no ambiguity from concatenation


def test_chunking_with_offset():
    x = nonzero_vector(150_001, seed=3)
    key = dare_key(5, "t", 2)
    whole = dare(x, 0.4, key)
    for a, b in [(0, 1), (1, 65_536), (65_536, 99_999), (99_999, 150_001)]:
        part = x[a:b].copy()
        dare_inplace(part, 0.4, key, offset=a)
        np.testing.assert_array_equal(part.view(np.uint32), whole[a:b].view(np.uint32))


def test_same_bytes_for_any_thread_count():
    script = (
        "import hashlib, numba, numpy as np\n"
        "from merge.kernels.dare import dare, dare_key\n"
        "x = np.random.default_rng(0).standard_normal(600_000).astype(np.float32)\n"
        "y = dare(x, 0.35, dare_key(9, 'x.weight', 3))\n"
        "print(numba.get_num_threads(), hashlib.sha256(y.tobytes()).hexdigest())\n"
    )
    digests = []
    for threads in ("1", None):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("NUMBA_NUM_THREADS", None)
        if threads is not None:
            env["NUMBA_NUM_THREADS"] = threads
        res = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        digests.append(res.stdout.split())
    assert digests[0][0] == "1"
    assert len(digests[0][1]) == 64 and digests[0][1] == digests[1][1]


def test_density_one_and_input_untouched():
    x = nonzero_vector(1000)
    x[:3] = [-0.0, 0.0, 1e-45]
    before = x.copy()
    y = dare(x, 1.0, dare_key(0, "w", 0))
    np.testing.assert_array_equal(y.view(np.uint32), before.view(np.uint32))
    dare(x, 0.5, dare_key(0, "w", 0))
    np.testing.assert_array_equal(x.view(np.uint32), before.view(np.uint32))


@pytest.mark.parametrize("density", [0.0, -0.5, 1.0001, float("nan"), float("inf")])
def test_invalid_density(density):
    with pytest.raises(ValueError):
        dare_inplace(np.ones(4, F32), density, 0)


def test_invalid_arguments():
    with pytest.raises(TypeError):
        dare_inplace(np.ones(4, np.float64), 0.5, 0)
    with pytest.raises(ValueError):
        dare_inplace(np.ones(8, F32)[::2], 0.5, 0)
    with pytest.raises(ValueError):
        dare_inplace(np.ones(4, F32), 0.5, 2**64)
    with pytest.raises(ValueError):
        dare_inplace(np.ones(4, F32), 0.5, 0, offset=-1)
