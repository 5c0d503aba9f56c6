"""Host-side checks of concrete inputs before they enter jitted code.

Inside jit a JAX gather never raises: an id >= vocab_size reads NaN rows and a negative id wraps
around to the end of the table. So every place where concrete token ids enter the library calls
`validate_token_ids` first.
"""

from __future__ import annotations

import numpy as np


def validate_token_ids(
    input_ids, vocab_size: int, *, name: str = "input_ids", attention_mask=None
) -> np.ndarray:
    """Checks that `input_ids` is an integer [batch, length] array of ids in [0, vocab_size).

    Args:
      input_ids: array-like of token ids.
      vocab_size: the model's vocabulary size.
      name: how the array is called in error messages.
      attention_mask: optional [batch, length] mask whose shape must match.

    Returns:
      The ids as a numpy int32 array.

    Raises:
      ValueError: naming the array, the offending value and where it is.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"{name} must be a [batch, length] array, got shape {ids.shape}")
    if ids.size == 0:
        raise ValueError(f"{name} is empty (shape {ids.shape})")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"{name} holds token id {int(ids[row, col])} at [{row}, {col}], outside the "
            f"vocabulary [0, {vocab_size}); {int(bad.sum())} id(s) out of range in all"
        )
    if attention_mask is not None and np.shape(attention_mask) != ids.shape:
        raise ValueError(
            f"attention_mask shape {np.shape(attention_mask)} does not match {name} shape "
            f"{ids.shape}"
        )
    return ids.astype(np.int32)
