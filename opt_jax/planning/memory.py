"""Per-device memory planning for training and inference on a (data, fsdp, tensor) mesh.

Parameters, optimizer state and gradients come from the real shardings (`jax.eval_shape` of the
model on an abstract mesh, so exact), laid out in tiles as the TPU compiler lays them
(`tpu_array_bytes`). A step's temporaries are predicted for one of two compilers: "tpu"
(default): for scanned layers, libtpu's heap phase by phase (the stacked residuals, counted
exactly as its HLO shows them, the loss, a layer's backward working set; `_scanned_step`), read
off its buffer assignment on the grid of experiments/memory (`tpu_grid.py`, `heap.py`); for
unrolled layers, what each layer keeps plus terms fitted to the compiler on that grid;
"xla_cpu": the analytic counts of Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", section 4), adapted to our remat policies, which XLA:CPU matches within
15% (tests/test_memory.py). The KV cache is exact. All numbers are bytes per device.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import numpy as np
from jax.sharding import AbstractMesh

from opt_jax import lora
from opt_jax.config import OPTConfig
from opt_jax.model import abstract_params, param_logical_axes
from opt_jax.parallel import sharding
from opt_jax.param_tree import is_layer_kernel, partition

GiB = 2**30
# Usable memory per device (GiB): vendor capacities.
ACCELERATORS = {
    "tpu-v4": 32,
    "tpu-v5e": 16,
    "tpu-v5p": 95,
    "a100-80gb": 80,
    "h100-80gb": 80,
}


def _activation_bytes_per_layer(cfg: OPTConfig, tokens: int, seq_len: int, tensor: int) -> float:
    """Activations one layer keeps for the backward pass, for `tokens` local tokens."""
    h, a = cfg.hidden_size, cfg.num_attention_heads
    bytes_ = np.dtype(cfg.dtype).itemsize
    dropout_masks = cfg.dropout > 0
    # The einsum path keeps each head's [T, S] scores; the flash kernel keeps none (it
    # recomputes them from q and k in the backward pass).
    scores = 0 if cfg.attention_impl == "flash" else a * seq_len / tensor
    if cfg.remat_policy == "full":
        return tokens * h * bytes_  # the layer input only: the rest is recomputed
    if cfg.remat_policy in ("save_dots", "save_dots_no_batch"):
        # Matmul outputs: q, k, v, attention out, out_proj, fc1 (ffn), fc2 (+ scores with dots).
        per_token = (5 * h + cfg.ffn_dim) / tensor
        if cfg.remat_policy == "save_dots":
            per_token += scores
        return tokens * per_token * bytes_
    # No remat: Korthikanti et al. eq. (2) with tensor parallelism, sbh (10 + 24/t + 5as/(ht))
    # bytes for 16-bit activations with dropout masks, scaled to our dtype.
    scale = bytes_ / 2
    per_token = h * (10 + 24 / tensor) * scale + 5 * scores * scale
    if not dropout_masks:
        per_token -= 2 * h * 0.5  # the two residual-dropout masks (1 byte per element each)
    return tokens * per_token


def _scanned_layer_bytes(cfg: OPTConfig, remat: str, tokens: int, seq_len: int, tensor: int):
    """What a scanned layer keeps for the backward pass under `remat`, for `tokens` local
    tokens: the [layers, ...] arrays the forward scan stacks, as the TPU compiler's HLO shows
    them (experiments/memory/tpu_grid.py reads them off; the formula matches them to the byte
    on every scanned point of the grid, bfloat16 compute). h: hidden, f: FFN width, a: heads,
    s: keys per query, t: tensor ways, c: the compute dtype's bytes."""
    h, f, a, t = cfg.hidden_size, cfg.ffn_dim, cfg.num_attention_heads, tensor
    c = np.dtype(cfg.dtype).itemsize
    # Each head's [T, S] scores: float32 probabilities (the softmax's backward pass) and the
    # compute-dtype ones (probabilities x values; the same array in float32). The flash kernel
    # keeps none.
    scores = 0.0 if cfg.attention_impl == "flash" else a * seq_len / t
    if remat == "full":
        per_token = c * h  # the layer's input
    elif remat == "save_dots":
        # input, out_proj's output (replicated), q, k, v, probs x values, scores, fc1's output
        per_token = 2 * c * h + 4 * c * h / t + c * scores + c * f / t
    elif remat == "save_dots_no_batch":  # the batched attention products are not saved
        per_token = 2 * c * h + 3 * c * h / t + c * f / t
    else:
        # The flash kernel's residuals q, k, v and its output are kept [heads, T, head_dim] with
        # head_dim minor, which the TPU lays out in 128-lane tiles: a 64-wide head (125m-2.7b)
        # takes twice its bytes. (The einsum path keeps them with T minor, unpadded.)
        heads = h
        if cfg.attention_impl == "flash":
            head_dim = h // cfg.num_attention_heads
            heads = cfg.num_attention_heads * -(-head_dim // 128) * 128
        per_token = (
            24 * h  # six float32 [T, D] arrays of the two LayerNorms
            + 2 * c * h  # the inputs of q/k/v and of fc1 (replicated)
            + 4 * c * heads / t  # out_proj's input; q, k and v
            + (4 + (c if c < 4 else 0)) * scores
            + (1 + c) * f / t  # the ReLU's mask and fc2's input
        )
        if cfg.dropout > 0:
            per_token += 2 * h  # the two residual-dropout masks (1 byte each)
        if cfg.attention_dropout > 0:
            per_token += (1 + c) * scores  # its mask and the dropped probabilities
    return tokens * per_token


# Unrolled layers: the TPU compiler's temporaries of a training step beyond what the layers
# keep (the loss's logits, the backward pass's working set and the gradients), as multiples of
# (the loss's logits as the heap holds them, one layer's no-remat activations outside the
# scores, its scores, one layer's float32 kernels gathered over fsdp, the float32 token table
# gathered over fsdp, the sharded float32 gradients), per remat: non-negative constants with the
# smallest worst relative error on the 20 unrolled points of experiments/memory's grid (within
# 6.5% on all; a linear program). `python experiments/memory/tpu_grid.py --fit` prints these and
# each point's error, in the fit and left out of it. (Scanned layers: _scanned_step.)
_TPU_REST = {
    (False, "none"): (1.118, 0.0, 0.0, 1.27, 0.0, 0.496),
    (False, "full"): (1.223, 0.0, 0.0, 1.373, 0.0, 0.773),
    (False, "save_dots"): (1.301, 1.688, 0.0, 0.146, 0.0, 0.016),
}

# Scanned layers: the compiler's heap, phase by phase (experiments/memory/heap.py reads it off
# libtpu's buffer assignment). What libtpu reports as a step's temporaries is its heap's size
# plus that size minus the heap's peak without the loops' state (the scans' stacked residuals
# and float32 gradients): 2 x allocation - peak without loop state, on every grid point to a
# few MB. So the loop state counts twice and everything else once, at each of three peaks:
#   forward   the stacked residuals filling up (not yet loop state) + a layer's working set;
#   loss      the residuals + float32 logits (+ their bfloat16 copy, seen only when it is at
#             least _BF16_LOGITS_KEPT) + the token table gathered in bfloat16;
#   backward  the residuals + every layer's float32 gradient + two of a layer's score arrays
#             in bfloat16 (one more in float32 with several sequences per chip; one in all with
#             save_dots at one sequence per chip, whose softmax is recomputed from the saved
#             scores inside the fusion that consumes the probabilities' gradient) + the gathered
#             fc1, fc2 and one attention kernel (with remat, whose recomputed forward needs
#             them; without, the peak falls in the attention's backward after the FFN's, and
#             none is live there: four dumps, 125m-6.7b widths, both meshes) + the logits'
#             gradient (or the table's, the smaller) in bfloat16;
# and all of them the bfloat16 copy of every layer's kernels, made before the scans. Four
# constants, set on the grid's 47 scanned points (all within 10%: 0.90-1.09x):
_FRAGMENTATION = 0.05  # the allocation beyond the live peak (0.004-0.16 on the grid)
_LAYER_WORKING_SET = 6  # [T, D] compute-dtype arrays live in a layer's step besides the above
_FORWARD_SCORES = 0.5  # of the backward's score arrays, live in the forward pass
_BF16_LOGITS_KEPT = 150 * 2**20
# Unrolled without remat, XLA fuses across the whole pass and keeps 0.45 of what a scanned
# layer keeps (the slope from 1 to 4 unrolled 125m layers: 0.15 GiB per layer at 2048 tokens).
_UNROLLED_KEPT = 0.45
COMPILERS = ("tpu", "xla_cpu")


def _loss_logits_bytes(cfg: OPTConfig, tokens: int, tensor: int) -> float:
    """The loss's logits as the compiler's heap holds them at the loss: float32 [T, V / t], and
    their compute-dtype copy beside them only when that copy is at least _BF16_LOGITS_KEPT (on
    every dumped step, scanned or unrolled: e.g. OPT-125m's width holds the bfloat16 copy of
    2048 x 50272 logits, 196 MiB, but not that of 2048 x 25136 on a tensor-2 mesh)."""
    logits = tokens * cfg.vocab_size / tensor
    copy = logits * np.dtype(cfg.dtype).itemsize
    return logits * 4 + (copy if copy >= _BF16_LOGITS_KEPT else 0.0)


def tpu_terms(cfg: OPTConfig, tokens: int, seq_len: int, tensor: int, trained: float):
    """The TPU model's byte counts per chip for `tokens` local tokens: (what the layers keep, the
    six terms _TPU_REST weighs: the loss's logits (_loss_logits_bytes), one layer's no-remat
    activations outside the scores, its scores, one layer's float32 kernels gathered over fsdp,
    the float32 token table gathered over fsdp, `trained` (the sharded float32 gradients)). What
    each layer keeps is a scan's stacked arrays (exact); unrolled and without remat XLA keeps
    less."""
    full_set = _scanned_layer_bytes(cfg, "none", tokens, seq_len, tensor)
    flash = cfg.replace(attention_impl="flash")  # the same layer without its scores
    linear = _scanned_layer_bytes(flash, "none", tokens, seq_len, tensor)
    kept = _scanned_layer_bytes(cfg, cfg.remat_policy, tokens, seq_len, tensor)
    if not cfg.scan_layers and cfg.remat_policy == "none":
        kept = _UNROLLED_KEPT * full_set
    h, f, v = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size
    terms = (
        _loss_logits_bytes(cfg, tokens, tensor),
        linear,
        full_set - linear,
        (4 * h * h + 2 * h * f) * 4 / tensor,
        v * h * 4 / tensor,
        trained,
    )
    return cfg.num_hidden_layers * kept, terms


def _scanned_step(cfg: OPTConfig, tokens: int, seq_len: int, fsdp: int, tensor: int,
                  kept: float, trained_layers: float) -> dict:  # fmt: skip
    """A scanned training step's temporaries as the TPU compiler reports them (see the comment
    above _FRAGMENTATION): {"reported", "live_peak", "without_loop_state"} in bytes per chip,
    for `tokens` local tokens of `seq_len`-token sequences, `kept` bytes of stacked residuals
    (all layers) and `trained_layers` bytes of the layers' float32 gradients."""
    h, f, v, layers = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size, cfg.num_hidden_layers
    c = np.dtype(cfg.dtype).itemsize
    sequences = tokens / seq_len
    kernels = (4 * h * h + 2 * h * f) / (fsdp * tensor)  # one layer's, per chip
    copies = layers * kernels * c  # the compute-dtype copy of every layer's kernels (if cast)
    if np.dtype(cfg.dtype) == np.dtype(cfg.params_dtype):
        copies = 0.0
    logits = _loss_logits_bytes(cfg, tokens, tensor)
    table = v * h * c / tensor
    scores = 0.0
    if cfg.attention_impl != "flash":
        one = sequences * cfg.num_attention_heads / tensor * seq_len * seq_len
        if sequences >= 2:
            scores = 2 * one * c + one * 4
        elif cfg.remat_policy == "save_dots":
            scores = one * c
        else:
            scores = 2 * one * c
    gathered = (2 * h * f + h * h) * c / tensor if fsdp > 1 else 0.0  # no gather without fsdp
    working = _LAYER_WORKING_SET * tokens * h * c + gathered + copies
    loss = logits + table + copies
    backward = scores + working + min(tokens, h) * v / tensor * c
    if cfg.remat_policy == "none":  # the backward peak is in attention, past fc1 and fc2
        backward -= gathered
    # With full remat the forward pass's scores die before the layer's input is stacked.
    forward = (0.0 if cfg.remat_policy == "full" else _FORWARD_SCORES * scores) + working
    # Without fsdp the stacked gradients are written in the backward scan's body, not carried.
    carried = trained_layers if fsdp > 1 else 0.0
    peak = max(kept + loss, kept + trained_layers + backward, kept + forward)
    transient = max(loss, backward + trained_layers - carried, kept + forward)
    allocation = peak * (1 + _FRAGMENTATION)
    return {
        "reported": 2 * allocation - transient,
        "live_peak": peak,
        "without_loop_state": transient,
    }


def _recompute_bytes(cfg: OPTConfig, tokens: int, seq_len: int, tensor: int) -> float:
    """With rematerialisation, the backward pass of each layer first recomputes it: that one
    layer's whole activation set is live on top of what every layer saved. (The TPU compiler
    showed it: OPT-1.3b, remat full, 8192 tokens per chip: 7.86 GiB of temporaries where saved
    inputs and logits alone are 3.8; experiments/tpu.)"""
    if cfg.remat_policy == "none":
        return 0.0
    full = cfg.replace(remat_policy="none")
    return _activation_bytes_per_layer(full, tokens, seq_len, tensor) - (
        _activation_bytes_per_layer(cfg, tokens, seq_len, tensor)
    )


def tpu_array_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes of an array in TPU memory: its two minor dimensions padded to a (8, 128) tile (a
    (rows, 128) one for fewer than 8 rows), under the cheapest choice of which two dimensions
    are minor (the compiler picks the layout of each argument; the cheapest one is what it
    picked on every argument of experiments/memory's grid), a vector to a multiple of its tile
    (the next power of two of its length, 128 to 1024 elements: a 384-long shard takes 512, a
    1536-long one 2048), a scalar to one 128-lane row. With these the planner's state bytes are
    the compiler's arguments to the byte on every grid point (float32 state), where the unpadded
    count was up to 4.6% low (125m on four-way fsdp: 192-wide shards padded to 256 lanes)."""
    if not shape:  # one 128-lane row of 32-bit words
        return 128 * max(itemsize, 4)
    if len(shape) == 1:
        tile = min(max(1 << (shape[0] - 1).bit_length(), 128), 1024)
        return itemsize * -(-shape[0] // tile) * tile
    best = None
    for minor, second in itertools.permutations(range(len(shape)), 2):
        rest = math.prod(d for i, d in enumerate(shape) if i not in (minor, second))
        rows = shape[second]
        tile = 8 if rows >= 8 else 1 << (rows - 1).bit_length()
        size = rest * -(-rows // tile) * tile * -(-shape[minor] // 128) * 128
        best = size if best is None else min(best, size)
    return best * itemsize


def _shard_bytes(abstract, shardings, padded: bool) -> int:
    if not padded:
        return sharding.per_device_bytes(abstract, shardings)
    return sum(
        tpu_array_bytes(s.shard_shape(leaf.shape), np.dtype(leaf.dtype).itemsize)
        for leaf, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True)
    )


@functools.lru_cache(maxsize=256)
def _state_bytes(cfg: OPTConfig, sizes: tuple[int, int, int], padded: bool) -> tuple[int, int, int]:
    """(parameter bytes in device memory, trained-parameter bytes, parameter bytes in host
    memory: the layers' kernels with cfg.layer_memory="pinned_host") per device on a (data,
    fsdp, tensor) mesh; `padded`: as laid out in TPU memory (tpu_array_bytes)."""
    names = sharding.MESH_AXES
    mesh = AbstractMesh(sizes, names)
    abstract = abstract_params(cfg)
    specs = param_logical_axes(cfg)
    sharding.check_divisible(abstract, specs, dict(zip(names, sizes, strict=True)))
    shardings = sharding.logical_to_shardings(specs, mesh)
    params = _shard_bytes(abstract, shardings, padded)
    host = 0
    if cfg.layer_memory != "device":  # as param_tree.place_layers places them
        hosted = is_layer_kernel
        host = _shard_bytes(partition(abstract, hosted)[0], partition(shardings, hosted)[0], padded)
    trained = params
    if cfg.lora_rank:  # LoRA: gradients and optimizer state for the adapters (and a head) only
        trained = _shard_bytes(
            partition(abstract, lora.is_trained)[0],
            partition(shardings, lora.is_trained)[0],
            padded,
        )
    return params - host, trained, host


def plan(
    cfg: OPTConfig,
    mesh_shape: dict[str, int],
    batch_size: int,
    seq_len: int,
    *,
    decode_batch: int | None = None,
    decode_length: int | None = None,
    optimizer_moments: int = 2,
    grad_accum_steps: int = 1,
    compiler: str = "tpu",
) -> dict:
    """Bytes per device of a training step and of decoding.

    Args:
      cfg: the model (its dtype, param_dtype and remat_policy are used; with lora_rank > 0 only
        the adapters are trained, so only they have gradients and optimizer state).
      mesh_shape: {"data": d, "fsdp": f, "tensor": t}.
      batch_size, seq_len: the global training batch.
      decode_batch, decode_length: KV-cache size for generation (default: batch_size, seq_len).
      optimizer_moments: arrays per parameter kept by the optimizer (AdamW: 2).
      grad_accum_steps: micro-batches per step (activations and logits live per micro-batch).
      compiler: whose temporaries to predict: "tpu" (libtpu's compiler: within 10% of it on
        all 67 points of experiments/memory's grid, 0.90-1.09x; a GPU's XLA is
        expected to follow the pattern, not checked) or "xla_cpu" (Korthikanti et al.'s
        counts; XLA:CPU within 15%, tests).

    Returns:
      dict of byte counts: params (in device memory), host_params (the layers' kernels in
      host memory with cfg.layer_memory="pinned_host", else 0), optimizer, gradients, update,
      activations, logits, temporaries (the step's peak beyond params and optimizer state:
      the larger of activations + logits and update), train_total, kv_cache,
      decode_temporaries, inference_total (params + kv_cache + decode_temporaries).
    """
    if compiler not in COMPILERS:
        raise ValueError(f"compiler must be one of {COMPILERS}, got {compiler!r}")
    sizes = tuple(mesh_shape.get(n, 1) for n in sharding.MESH_AXES)
    # The state's bytes do not depend on remat (cached: --search plans many remats per mesh)
    params, trained, host = _state_bytes(cfg.replace(remat_policy="none"), sizes, compiler == "tpu")
    data_ways = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    tensor = mesh_shape.get("tensor", 1)
    if batch_size % data_ways:
        raise ValueError(f"batch_size {batch_size} is not divisible by data x fsdp = {data_ways}")
    local_tokens = batch_size // data_ways * seq_len // grad_accum_steps
    layers = cfg.num_hidden_layers
    if compiler == "tpu" and cfg.scan_layers:
        kept, terms = tpu_terms(cfg, local_tokens, seq_len, tensor, trained)
        # The layers' gradients: the trained bytes less the embeddings' (LoRA: the adapters).
        embeddings = (cfg.vocab_size + cfg.max_position_embeddings) * cfg.hidden_size
        layer_grads = max(trained - embeddings * 4 / (mesh_shape.get("fsdp", 1) * tensor), 0)
        step = _scanned_step(
            cfg, local_tokens, seq_len, mesh_shape.get("fsdp", 1), tensor, kept, layer_grads
        )
        logits = terms[0]  # float32 [T, V / t]: part of the loss's peak, reported for reading
        activations = step["reported"] - logits
    elif compiler == "tpu":
        kept, terms = tpu_terms(cfg, local_tokens, seq_len, tensor, trained)
        policy = "save_dots" if cfg.remat_policy == "save_dots_no_batch" else cfg.remat_policy
        c = _TPU_REST[(cfg.scan_layers, policy)]
        logits = c[0] * terms[0]
        activations = kept + sum(ci * term for ci, term in zip(c[1:], terms[1:], strict=True))
    else:
        activations = layers * _activation_bytes_per_layer(cfg, local_tokens, seq_len, tensor)
        activations += _recompute_bytes(cfg, local_tokens, seq_len, tensor)
        # Float32 logits and their gradient, vocabulary split by tensor.
        logits = 2 * local_tokens * cfg.vocab_size / tensor * 4
    decode_batch = decode_batch or batch_size
    decode_length = decode_length or seq_len
    kv_per_device = (
        2 * layers * (decode_batch / data_ways) * decode_length * cfg.hidden_size / tensor
    ) * np.dtype(cfg.dtype).itemsize
    out = {
        "params": params,
        "host_params": host,
        "optimizer": optimizer_moments * trained,
        "gradients": trained,
        # The update (under a cond, so that a skipped step keeps the old state) writes the new
        # params and moments before they replace the donated ones: a state-sized set of
        # temporaries, into which XLA reuses the gradients' buffers as they are consumed.
        # (XLA:CPU; the TPU compiler updates the donated state in place: a 6.7b-wide step on
        # 1x2x2 needs 1.63 GiB of temporaries in all where this count alone is 2.87; its
        # gradients are among the fitted terms above.)
        "update": trained * (1 + optimizer_moments) if compiler == "xla_cpu" else trained,
        "activations": int(activations),
        "logits": int(logits),
        "kv_cache": int(math.ceil(kv_per_device)),
    }
    # The step's two peaks come one after the other: the forward and backward pass (saved
    # activations, logits and their gradient), then the update. XLA's memory_analysis of the
    # compiled step matches the larger of the two (tests/test_memory.py).
    out["temporaries"] = max(out["activations"] + out["logits"], out["update"])
    out["train_total"] = out["params"] + out["optimizer"] + out["temporaries"]
    out["decode_temporaries"] = int(
        _decode_temporaries(cfg, decode_batch // data_ways, decode_length, tensor)
    )
    out["inference_total"] = out["params"] + out["kv_cache"] + out["decode_temporaries"]
    return out


def _decode_temporaries(cfg: OPTConfig, rows: int, length: int, tensor: int) -> float:
    """Per-device temporaries of generate's programs (a [rows, length/2] prompt's prefill into
    a `length`-slot cache, then decode steps): the prompt's float32 attention scores plus
    copies of one layer's kernels in the compute dtype: 2 (read as the scan slicing the next
    layer out of the stack while this one computes; not traced), 2.5 with int8 and 3 with int4
    (the slices, then the dequantised kernels). Against the TPU compiler on 13b-175b at batch 1
    on a v5e-8 (experiments/tpu/inference, tests/test_memory.py) this is 1.1-2.5x its larger
    program's temporaries: an upper bound, loosest on the small models, where the bytes are a
    few hundred MB."""
    kernels = (4 * cfg.hidden_size + 2 * cfg.ffn_dim) * cfg.hidden_size / tensor
    copies = {"int4": 3.0, "gptq": 3.0, "int8": 2.5, "llm_int8": 2.5, "w8a8": 2.5}
    itemsize = np.dtype(cfg.dtype).itemsize
    heads = max(cfg.num_attention_heads // tensor, 1)
    scores = rows * heads * (length // 2) * length * 4
    return copies.get(cfg.quantization, 2.0) * kernels * itemsize + scores


def fits(total_bytes: int, accelerator: str, headroom: float = 0.9) -> bool:
    """Whether `total_bytes` fit in `headroom` of the accelerator's memory."""
    return total_bytes <= headroom * ACCELERATORS[accelerator] * GiB


def compiled_train_step_bytes(compiled) -> dict:
    """XLA's own accounting of a compiled step (`jit(...).lower(...).compile()`)."""
    analysis = compiled.memory_analysis()
    return {
        "arguments": int(analysis.argument_size_in_bytes),
        "outputs": int(analysis.output_size_in_bytes),
        "temporaries": int(analysis.temp_size_in_bytes),
        "aliased": int(analysis.alias_size_in_bytes),
    }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(
    cfg: OPTConfig,
    chips: int,
    batch_size: int,
    seq_len: int,
    memory_bytes: int,
    *,
    headroom: float = 0.9,
    remat_policies: tuple[str, ...] = ("none", "save_dots", "full"),
    max_tensor: int = 8,
    max_grad_accum: int = 64,
    compiler: str = "tpu",
) -> list[dict]:
    """Training layouts of `cfg` on `chips` devices of `memory_bytes` each that fit.

    Tries every (data, fsdp, tensor) mesh of `chips` devices (tensor <= max_tensor, dividing
    the heads and the FFN width; data x fsdp dividing the batch), every remat policy, and for
    each pair the fewest gradient-accumulation micro-batches (1, 2, 4, ... <= max_grad_accum)
    whose plan fits `headroom` of the memory (`compiler`: see plan).

    Returns:
      One dict per fitting (mesh, remat) pair, smallest `train_total` first: mesh ({"data",
      "fsdp", "tensor"}), remat_policy, grad_accum_steps, and the plan's byte counts.
    """
    found = []
    for tensor in _divisors(chips):
        if tensor > max_tensor or cfg.num_attention_heads % tensor or cfg.ffn_dim % tensor:
            continue
        for fsdp in _divisors(chips // tensor):
            data = chips // tensor // fsdp
            if batch_size % (data * fsdp):
                continue
            per_shard = batch_size // (data * fsdp)
            mesh = {"data": data, "fsdp": fsdp, "tensor": tensor}
            # powers of two dividing the per-shard batch
            accums = [a for a in (2**i for i in range(max_grad_accum.bit_length()))
                      if a <= max_grad_accum and per_shard % a == 0]  # fmt: skip
            for remat in remat_policies:
                model = cfg.replace(remat_policy=remat)
                for accum in accums:
                    try:
                        p = plan(model, mesh, batch_size, seq_len, grad_accum_steps=accum,
                                 compiler=compiler)  # fmt: skip
                    except ValueError:  # a parameter axis this mesh does not divide
                        break
                    if p["train_total"] <= headroom * memory_bytes:
                        found.append(
                            {"mesh": mesh, "remat_policy": remat, "grad_accum_steps": accum, **p}
                        )
                        break
    return sorted(found, key=lambda r: (r["train_total"], r["grad_accum_steps"]))
