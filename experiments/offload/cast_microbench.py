"""Why the streamed layer program's float16 -> float32 cast is slow on XLA:CPU, measured.

  python experiments/offload/cast_microbench.py

One 1.3b-shaped fc1 kernel (8192 x 2048, torch layout) and a one-row input: the matvec on
float32 weights against the same matvec with the cast inside the jitted program, in several
formulations, and the elementwise work alone; then the host converters (numpy; torch when
installed). Medians of 20 calls, milliseconds.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def ms(fn, *args, reps: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def f16_bits_to_f32(w):
    """Exact float16 -> float32 by integer operations (normals, subnormals, inf / nan)."""
    b = jax.lax.bitcast_convert_type(w, jnp.uint16).astype(jnp.uint32)
    sign, exp, man = (b & 0x8000) << 16, (b >> 10) & 0x1F, b & 0x3FF
    normal = sign | ((exp + 112) << 23) | (man << 13)
    bits = jnp.where(exp == 31, sign | 0x7F800000 | (man << 13), normal)
    subnormal = man.astype(jnp.float32) * jnp.float32(2.0**-24)
    subnormal = jnp.where(sign != 0, -subnormal, subnormal)
    return jnp.where(exp == 0, subnormal, jax.lax.bitcast_convert_type(bits, jnp.float32))


def main():
    rng = np.random.default_rng(0)
    host16 = rng.standard_normal((8192, 2048)).astype(np.float16)
    w16, w32 = jnp.asarray(host16), jnp.asarray(host16.astype(np.float32))
    x = jnp.asarray(rng.standard_normal((1, 2048)).astype(np.float32))
    matvec = "ti,oi->to"
    rows = {
        "matvec, float32 weights": ms(jax.jit(lambda x, w: jnp.einsum(matvec, x, w)), x, w32),
        "matvec, astype(float32) inside": ms(
            jax.jit(lambda x, w: jnp.einsum(matvec, x, w.astype(jnp.float32))), x, w16
        ),
        "matvec, bit-twiddled cast inside": ms(
            jax.jit(lambda x, w: jnp.einsum(matvec, x, f16_bits_to_f32(w))), x, w16
        ),
        "matvec, bfloat16 weights cast inside": ms(
            jax.jit(lambda x, w: jnp.einsum(matvec, x, w.astype(jnp.float32))),
            x,
            w16.astype(jnp.bfloat16),
        ),  # fmt: skip
        "cast fused into a sum (no output array)": ms(
            jax.jit(lambda w: w.astype(jnp.float32).sum()), w16
        ),
        "float32 sum (reads 64 MB)": ms(jax.jit(lambda w: w.sum()), w32),
        "float32 w * 2 (writes 64 MB)": ms(jax.jit(lambda w: w * 2), w32),
    }
    out = np.empty(host16.shape, np.float32)
    rows["numpy float16 -> float32, existing buffer"] = ms(lambda: np.copyto(out, host16))
    try:
        import torch

        torch.set_num_threads(1)
        source, target = torch.from_numpy(host16), torch.from_numpy(out)
        rows["torch float16 -> float32, existing buffer, 1 thread"] = ms(
            lambda: target.copy_(source)
        )
        rows["torch float16 -> float32, fresh buffer, 1 thread"] = ms(lambda: source.float())
    except ImportError:
        pass
    assert np.array_equal(
        np.asarray(jax.jit(f16_bits_to_f32)(w16)).view(np.uint32),
        host16.astype(np.float32).view(np.uint32),
    )
    for name, value in rows.items():
        print(f"| {name} | {value:.2f} |")


if __name__ == "__main__":
    main()
