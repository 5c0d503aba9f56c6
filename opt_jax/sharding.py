"""Logical axis names: the vocabulary the model uses to describe how its arrays may be split.

Parameters and activations name their axes with these constants (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`); a rules table maps each name to a mesh axis (or to none). Without
rules in scope the annotations are no-ops, so the same model runs unchanged on one CPU.
"""

# Activations.
BATCH = "batch"  # B: the (global) batch
LENGTH = "length"  # T: query positions
CACHE_LENGTH = "cache_length"  # S: KV-cache slots
# Parameters (and the activations of the same width).
LAYERS = "layers"  # L: the stacked decoder layers of the KV cache (and of scanned parameters)
EMBED = "embed"  # D: hidden_size
EMBED_PROJ = "embed_proj"  # P: word_embed_proj_dim (the token-embedding width)
HEADS = "heads"  # N: attention heads
HEAD_DIM = "kv"  # H: per-head width
MLP = "mlp"  # F: ffn_dim
VOCAB = "vocab"  # V: vocab_size
POSITIONS = "positions"  # rows of the learned position table
CLASSES = "classes"  # outputs of the classification / QA heads
