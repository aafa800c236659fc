"""Cost of a fixed summation order for factored-core decodes against the BLAS product.

A factor ``L = B @ C`` (``B``: ``out x n`` basis columns, ``C``: ``n x k`` coefficients)
summed in a fixed order with element-wise float32 multiply-adds would be bit-identical on
every platform; BLAS sums in its kernel's order. One BLAS thread, as the runtime decodes.

    python bench/fixed_order.py
"""

from __future__ import annotations

import time

import numpy as np

SHAPES = [(384, 16, 8), (384, 32, 8), (1536, 32, 8), (384, 64, 16), (1536, 64, 16)]


def fixed_order(b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``b @ c`` summed over k = 0..n-1 in order, each step element-wise (no BLAS)."""
    bt = np.ascontiguousarray(b.T)
    out = np.zeros((c.shape[1], b.shape[0]), np.float32)
    tmp = np.empty_like(out)
    for k in range(c.shape[0]):
        np.multiply(c[k][:, None], bt[k], out=tmp)
        out += tmp
    return out.T


def per_call_us(f, repeat: int = 200) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(repeat):
        f()
    return (time.perf_counter() - t0) / repeat * 1e6


def main() -> None:
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    print("| out | n | k | BLAS us | fixed order us | ratio | max rel diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for out, n, k in SHAPES:
        b = rng.standard_normal((out, 64)).astype(np.float32)[:, :n]
        c = rng.standard_normal((n, k)).astype(np.float32)
        blas = per_call_us(lambda b=b, c=c: b @ c)
        fixed = per_call_us(lambda b=b, c=c: fixed_order(b, c))
        ref = b @ c
        rel = float(np.abs(fixed_order(b, c) - ref).max() / np.abs(ref).max())
        print(f"| {out} | {n} | {k} | {blas:.1f} | {fixed:.1f} | {fixed / blas:.0f}x | "
              f"{rel:.1e} |")


if __name__ == "__main__":
    main()
