"""Generation: the options (config.py), logits processors (processors.py), the decode loop
(decoding.py), beam search (beam_search.py), `generate` (api.py) and the text helpers (text.py).

Dependencies run one way: config <- processors <- decoding, beam_search <- api <- text.
"""

from opt_jax.generation.api import GenerateOutput, generate
from opt_jax.generation.config import GenerationConfig
from opt_jax.generation.decoding import decode
from opt_jax.generation.text import generate_text, stream_text

__all__ = [
    "GenerateOutput",
    "GenerationConfig",
    "decode",
    "generate",
    "generate_text",
    "stream_text",
]
