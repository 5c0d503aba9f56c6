"""Splash attention against the flash kernel inside a training step, by the TPU compiler (#25).

  python experiments/tpu/splash.py --remat full --seq_len 8192

Compiles one training step of experiments/memory's grid (OPT-1.3b's width, 4 scanned layers,
one sequence per chip, a 4-chip v5e, bfloat16) twice: with `attention_impl="flash"` as shipped
(jax's Pallas TPU flash kernel, causal, padding as segment ids), and with that kernel swapped for
splash attention (jax.experimental.pallas.ops.tpu.splash_attention: a causal MultiHeadMask and
the same segment ids, vmapped over the rows), and prints the compiler's per-chip bytes of each.
Nothing runs: this machine has no TPU.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "memory"))

import jax  # noqa: E402

from opt_jax.ops import attention  # noqa: E402


def splash(q, k, v, key_mask):
    """attention._tpu_flash's contract (q [B, T, N, H] scaled; k, v [B, N, T, H]; key_mask
    [B, T]) with splash attention's kernel."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    t = q.shape[1]
    block = min(512, t)  # the kernel's default blocks are 512: shorter sequences take one block
    sizes = sk.BlockSizes(block, block, block, block, block, block, block, block)

    def kernel(q, k, v, segments):  # [B, N, T, H], [B, T]
        mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(q.shape[1])])
        mha = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes)
        one = lambda q, k, v, s: mha(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s))  # noqa: E731
        return jax.vmap(one)(q, k, v, segments)

    return attention.per_device_kernel(kernel, q, k, v, key_mask)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remat", default="full", choices=["none", "full", "save_dots"])
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--size", default="1.3b")
    args = parser.parse_args()
    import tpu_grid

    model = {"attention_impl": "flash", "max_position_embeddings": str(max(2048, args.seq_len))}
    point = {"size": args.size, "mesh": [1, 4, 1], "scan": True, "remat": args.remat,
             "layers": 4, "seq_len": args.seq_len, "per_way": 1, "topology": "v5e:2x2",
             "model": model}  # fmt: skip
    flash = tpu_grid.measure(point)
    attention._tpu_flash = splash  # the same step, the other kernel
    swapped = tpu_grid.measure(point)
    gib = 2**30
    for name, r in (("flash", flash), ("splash", swapped)):
        b = r["compiler"]
        print(json.dumps({"kernel": name, **{k: round(b[k] / gib, 3) for k in
                          ("arguments", "temporaries", "total")},
                          "compile_seconds": round(r["seconds"])}))  # fmt: skip


if __name__ == "__main__":
    main()
