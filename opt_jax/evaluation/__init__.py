"""Evaluation: log-likelihood scoring and perplexity (scoring.py); the lm-evaluation-harness
backend lives in opt_jax/eval_harness.py (it needs the optional `opt_jax[eval]` install)."""

from opt_jax.evaluation.scoring import (
    encode_pair,
    loglikelihood,
    loglikelihood_rolling,
    perplexity,
    rolling_windows,
    score_pairs,
)

__all__ = [
    "encode_pair",
    "loglikelihood",
    "loglikelihood_rolling",
    "perplexity",
    "rolling_windows",
    "score_pairs",
]
