"""Loads OPT checkpoints in metaseq's own layout (the codebase OPT was trained and released in).

A consolidated metaseq checkpoint (one file, as metaseq's `convert_to_singleton` script writes
it, often named `restored.pt`) is `torch.save({"model": state_dict, "cfg": ..., ...})`. Its
state dict differs from Hugging Face's in four ways (the facts behind transformers' own
`convert_opt_original_pytorch_checkpoint_to_pytorch.py`):

- attention q/k/v are one fused `self_attn.qkv_proj` whose output rows are K, then V, then Q
  (not Q, K, V: metaseq's sequence-parallel block splits them in that order);
- opt-350m's projections are `decoder.project_in_dim` / `decoder.project_out_dim`;
- the final LayerNorm is `decoder.layer_norm`;
- `decoder.output_projection.weight` (the tied LM head) and `decoder.version` are extra.

Model-parallel parts (OPT-13b/30b/66b/175b were released as 2/4/8/8 `reshard-model_part-K.pt`
files, each consolidated over FSDP by metaseq's `reshard_fsdp.py`) are merged here tensor by
tensor, as metaseq's `stitch_fsdp_ckpt.reshard_megatron_parts` glues them: each part's fused
qkv_proj holds that part's K, V and Q rows (K = all parts' K rows in order, then V, then Q);
fc1, q/k/v and the token table (and its tied output projection) are split by rows; fc2's and
out_proj's weights by columns, with their biases replicated; LayerNorms, positions and the rest
are replicated. FSDP shards holding `flat_param_*` must be consolidated with metaseq's scripts
first; this module says so rather than guessing at their partitioning.
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np

from opt_jax.checkpoints import torch_reader
from opt_jax.checkpoints.hf import CheckpointError, _assemble
from opt_jax.checkpoints.hf_files import TIED_LM_HEAD, canonical_key
from opt_jax.config import PRESETS, OPTConfig, preset

_RENAMES = {
    "decoder.project_in_dim.weight": "decoder.project_in.weight",
    "decoder.project_out_dim.weight": "decoder.project_out.weight",
    "decoder.layer_norm.weight": "decoder.final_layer_norm.weight",
    "decoder.layer_norm.bias": "decoder.final_layer_norm.bias",
}
_BOOKKEEPING = ("decoder.version", "._float_tensor")  # suffixes of keys that are not weights


_PART = re.compile(r"model_part-(\d+)")


def _part_files(path: str) -> list[str]:
    """The model-parallel part files at `path` (a directory or a glob), in part order; [] when
    `path` is not a set of parts (a consolidated file or a directory holding one)."""
    if glob.has_magic(path):
        files = sorted(glob.glob(path))
        if not files:
            raise FileNotFoundError(f"no metaseq checkpoint matches {path}")
    elif os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".pt"))
    else:
        return []
    numbered = [(int(m.group(1)), f) for f in files if (m := _PART.search(os.path.basename(f)))]
    if not numbered:
        return []
    if len(numbered) != len(files):
        others = sorted(set(files) - {f for _, f in numbered})
        raise CheckpointError(f"{path} mixes model-parallel parts with other files: {others}")
    if any(re.search(r"-shard\d+", os.path.basename(f)) for _, f in numbered):
        raise CheckpointError(
            _unconsolidated(
                path, "FSDP shards of model-parallel parts", "reshard_fsdp per part, then load them"
            )
        )
    by_part: dict[int, list[str]] = {}
    for k, f in numbered:
        by_part.setdefault(k, []).append(f)
    twice = {k: fs for k, fs in by_part.items() if len(fs) > 1}
    if twice:
        raise CheckpointError(f"{path} holds more than one file for a model part: {twice}")
    missing = sorted(set(range(max(by_part) + 1)) - set(by_part))
    if missing:
        raise CheckpointError(
            f"{path} is missing model part(s) {missing} of {max(by_part) + 1} (model_part-K "
            "for every K from 0)"
        )
    return [by_part[k][0] for k in sorted(by_part)]


def _merge_rule(key: str) -> str:
    """How metaseq splits `key` over model-parallel parts: "qkv" (each part's K, V, Q rows),
    "rows", "columns", or "replicated"."""
    if ".qkv_proj." in key:
        return "qkv"
    if "layer_norm" in key or "embed_positions" in key:
        return "replicated"
    if re.search(r"\.(fc1|q_proj|k_proj|v_proj)\.", key):
        return "rows"
    if re.search(r"\.(fc2|out_proj)\.", key):
        return "columns" if key.endswith("weight") else "replicated"
    if key in ("decoder.embed_tokens.weight", "decoder.output_projection.weight"):
        return "rows"
    return "replicated"


class _Merged:
    """A tensor glued from its model-parallel pieces when read (one tensor in memory at once)."""

    def __init__(self, key: str, refs: list, rule: str):
        self.key, self.refs, self.rule = key, refs, rule
        shape = list(refs[0].shape)
        if rule in ("qkv", "rows"):
            shape[0] *= len(refs)
        elif rule == "columns":
            shape[1] *= len(refs)
        self.shape, self.dtype = tuple(shape), refs[0].dtype

    def read(self) -> np.ndarray:
        if self.rule == "replicated":
            return self.refs[0].read()
        pieces = [ref.read() for ref in self.refs]
        if self.rule == "columns":
            return np.concatenate(pieces, axis=1)
        if self.rule == "rows":
            return np.concatenate(pieces, axis=0)
        k, v, q = zip(*(np.split(p, 3, axis=0) for p in pieces), strict=True)
        return np.concatenate([*k, *v, *q], axis=0)


def _merged_state(files: list[str]) -> dict:
    """{key: _Merged} over the parts' state dicts, after checking that they fit together."""
    states = [_state_dict(f) for f in files]
    keys = [k for k in states[0] if isinstance(states[0][k], torch_reader.TensorRef)]
    merged = {}
    for file, state in zip(files[1:], states[1:], strict=True):
        ours = {k for k in state if isinstance(state[k], torch_reader.TensorRef)}
        if ours != set(keys):
            diff = sorted(set(keys) ^ ours)[:4]
            raise CheckpointError(
                f"{file} does not hold the tensors of {os.path.basename(files[0])} (differs in "
                f"{diff}): parts of different models?"
            )
    for key in keys:
        refs = [state[key] for state in states]
        for file, ref in zip(files, refs, strict=True):
            if ref.shape != refs[0].shape:
                raise CheckpointError(
                    f"{file}: {key} has shape {ref.shape}, part 0 has {refs[0].shape}: parts of "
                    "different models or part counts?"
                )
        rule = _merge_rule(key)
        if rule == "qkv" and refs[0].shape[0] % 3:
            raise CheckpointError(
                f"{files[0]}: {key} has {refs[0].shape[0]} rows, not a multiple of 3 (K, V, Q)"
            )
        merged[key] = _Merged(key, refs, rule)
    return merged


def _checkpoint_file(path: str) -> str:
    if os.path.isfile(path):
        if _PART.search(os.path.basename(path)):
            raise CheckpointError(_unconsolidated(path, "a model-parallel part"))
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no metaseq checkpoint at {path}")
    files = sorted(f for f in os.listdir(path) if f.endswith(".pt"))
    if any(_PART.search(f) for f in files):
        raise CheckpointError(_unconsolidated(path, f"model-parallel parts {files}"))
    if len(files) != 1:
        raise CheckpointError(
            f"{path} should hold exactly one consolidated .pt file, found {files or 'none'}; "
            "pass the file itself"
        )
    return os.path.join(path, files[0])


def _unconsolidated(
    path: str, what: str, remedy: str = "reshard_fsdp, then convert_to_singleton, and load that"
) -> str:
    return (
        f"{path} is {what} of an unconsolidated metaseq checkpoint; merge it with metaseq's "
        f"scripts ({remedy})"
    )


def _state_dict(path: str) -> dict:
    try:
        obj = torch_reader.load(path)
    except torch_reader.TorchFileError as e:
        raise CheckpointError(str(e)) from e
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a metaseq state dict")
    if any(key.startswith("flat_param") or ".flat_param" in key for key in state):
        raise CheckpointError(_unconsolidated(path, "an FSDP shard (flat_param_* tensors)"))
    if not any(key.startswith("decoder.") for key in state):
        raise CheckpointError(
            f"{path} has no decoder.* tensors: not a metaseq OPT checkpoint (keys: "
            f"{sorted(state)[:5]}...)"
        )
    return state


def infer_config(shapes: dict[str, tuple[int, ...]], path: str) -> OPTConfig:
    """The preset whose shapes a metaseq state dict has ({key: shape}); heads and LayerNorm
    placement cannot be read from shapes, so nothing but a preset match is accepted."""
    layers = len({k.split(".")[2] for k in shapes if k.startswith("decoder.layers.")})
    vocab, proj_dim = shapes.get("decoder.embed_tokens.weight", (None, None))
    fc1 = shapes.get("decoder.layers.0.fc1.weight", (None, None))
    positions = shapes.get("decoder.embed_positions.weight", (None,))[0]
    found = (layers, fc1[1], fc1[0], vocab, proj_dim, positions)
    for name in PRESETS:
        c = preset(name)
        want = (c.num_hidden_layers, c.hidden_size, c.ffn_dim, c.vocab_size,
                c.word_embed_proj_dim, c.max_position_embeddings + 2)  # fmt: skip
        if found == want:
            return c
    raise CheckpointError(
        f"{path}: (layers, hidden, ffn, vocab, embed dim, position rows) = {found} match no OPT "
        "preset, and attention heads / LayerNorm placement cannot be read from shapes: pass "
        "config=OPTConfig(...) or a preset name"
    )


def _hf_tensors(state: dict, path: str, root_is_decoder: bool):
    """Yields (HF name, metaseq key, array) one tensor at a time, q/k/v split out of qkv_proj."""
    for key in list(state):
        ref = state.pop(key)
        if key.endswith(_BOOKKEEPING):
            continue
        if not isinstance(ref, torch_reader.TensorRef | _Merged):
            raise CheckpointError(f"{path}: entry {key!r} is not a tensor ({ref!r})")
        if key == "decoder.output_projection.weight":
            yield TIED_LM_HEAD, key, ref.read()  # shape-checked against embed_tokens, then dropped
            continue
        if ".self_attn.qkv_proj." in key:
            fused = ref.read()
            if fused.shape[0] % 3:
                raise CheckpointError(
                    f"{path}: {key} has {fused.shape[0]} rows, not a multiple of 3 (K, V, Q)"
                )
            k, v, q = np.split(fused, 3, axis=0)
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                name = key.replace(".qkv_proj.", f".{proj}.")
                yield canonical_key(name, root_is_decoder), key, np.ascontiguousarray(part)
            del fused, k, v, q
            continue
        name = _RENAMES.get(key, key)
        yield canonical_key(name, root_is_decoder), key, ref.read()


def _named_config(name: str) -> OPTConfig:
    if name in PRESETS:
        return preset(name)
    if os.path.exists(name):  # an HF config.json, or a directory holding one
        return OPTConfig.from_hf(name)
    raise ValueError(
        f"config {name!r} is neither a preset ({', '.join(PRESETS)}) nor an HF config path"
    )


def load_metaseq(
    path: str | os.PathLike,
    config: OPTConfig | str | None = None,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    architecture: str = "OPTForCausalLM",
    shardings=None,
    **config_overrides,
) -> tuple[OPTConfig, dict]:
    """Loads a metaseq OPT checkpoint (numpy only, no pickled code run): one consolidated file,
    or the model-parallel parts `reshard-model_part-K.pt` that OPT-13b and up were released as.

    Args:
      path: the consolidated `.pt` file, a directory holding exactly one, or a directory (or
        glob) of model-parallel parts, merged as metaseq glues them (see the module docstring).
      config: an OPTConfig, a preset name ("125m" ... "175b"), or the path of an HF
        config.json (or its directory); by default the preset whose shapes the checkpoint has.
      dtype, param_dtype: compute and storage dtypes (default: the checkpoint's, usually
        float16).
      architecture: "OPTForCausalLM" (default) or "OPTModel".
      shardings: optional target shardings (unrolled layout), as for load_pretrained.
      config_overrides: other OPTConfig fields (scan_layers, remat_policy, attention_impl, ...).

    Returns:
      (config, params), as load_pretrained.
    """
    path = os.fspath(path)
    parts = _part_files(path)
    if parts:  # model-parallel parts, glued tensor by tensor as they are read
        file, state = path, _merged_state(parts)
    else:
        file = _checkpoint_file(path)
        state = _state_dict(file)
    if config is None:
        tensors = (torch_reader.TensorRef, _Merged)
        shapes = {k: v.shape for k, v in state.items() if isinstance(v, tensors)}
        config = infer_config(shapes, file)
    elif isinstance(config, (str, os.PathLike)):
        config = _named_config(os.fspath(config))
    embed = state.get("decoder.embed_tokens.weight")
    stored = str(embed.dtype) if isinstance(embed, torch_reader.TensorRef | _Merged) else "float32"
    config = config.replace(
        dtype=dtype or stored,
        param_dtype=param_dtype or dtype or stored,
        architecture=architecture,
        **config_overrides,
    )
    tensors = _hf_tensors(state, file, config.architecture == "OPTModel")
    return config, _assemble(config, tensors, shardings, file)
