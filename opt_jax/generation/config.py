"""GenerationConfig: the one list of decoding options.

Every option is declared once below, with its default, its meaning and its kind. Everything
else derives from this list: `generate(**options)` accepts exactly these names (transformers'
names and meanings), `__post_init__` normalises and checks them, and `scripts/generate.py`
builds its command-line flags from them.

Options come in two kinds (as in gemma's sampler, and t5x's traced temperature):
- traced values (`temperature`, `top_p`, `min_p`, `typical_p`, the penalties, `length_penalty`,
  `penalty_alpha`) enter the compiled program as float32 scalars, so a notebook sweep over
  them never recompiles;
- static options (`top_k`, `num_beams`, token-id lists, ...) change shapes or control flow:
  a new value is a new program. Which traced processors are on at all (say `top_p < 1`) is
  static too (`active`): turning top-p filtering on compiles once, moving it does not.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import numpy as np


def _option(default, help: str, kind: str, *, traced: bool = False, cli: bool = True):
    """A field of GenerationConfig. kind selects the normaliser (see _NORMALISERS)."""
    return dataclasses.field(
        default=default, metadata={"help": help, "kind": kind, "traced": traced, "cli": cli}
    )


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding options with transformers' names, defaults and semantics (top_k=50 when sampling).

    Build one directly, or let `generate(..., **options)` build it. Bad values raise
    ValueError naming the option, before anything is compiled. `replace(**options)` returns
    an updated copy (and checks it).
    """

    max_new_tokens: int | None = _option(
        None, "Tokens to generate per row (required by generate).", "count?"
    )
    do_sample: bool = _option(False, "Sample instead of greedy decoding.", "bool")
    temperature: float = _option(1.0, "Sampling temperature (> 0).", "float", traced=True)
    top_k: int | None = _option(
        50, "Top-k filter when sampling (0/None: off); candidates in contrastive search.", "int?"
    )
    top_p: float = _option(
        1.0, "Nucleus filter: keep this much probability mass.", "float", traced=True
    )
    min_p: float | None = _option(
        None, "Drop tokens below min_p x the top token's probability.", "float?", traced=True
    )
    typical_p: float = _option(1.0, "Locally typical sampling mass.", "float", traced=True)
    repetition_penalty: float = _option(
        1.0, "CTRL repetition penalty (> 0; 1 is off).", "float", traced=True
    )
    presence_penalty: float = _option(
        0.0, "Subtracted once from every token generated so far.", "float", traced=True
    )
    frequency_penalty: float = _option(
        0.0, "Subtracted per occurrence of each token generated so far.", "float", traced=True
    )
    no_repeat_ngram_size: int = _option(0, "Ban any n-gram of this size from repeating.", "int")
    min_new_tokens: int = _option(0, "EOS is banned until this many tokens are generated.", "int")
    bad_words_ids: tuple[tuple[int, ...], ...] = _option(
        (), "Token-id sequences never to generate.", "id_seqs", cli=False
    )
    suppress_tokens: tuple[int, ...] = _option((), "Token ids never to generate.", "ids")
    stop_sequences: tuple[tuple[int, ...], ...] = _option(
        (), "Token-id sequences that end a row like EOS.", "id_seqs", cli=False
    )
    num_beams: int = _option(1, "Beam search width (1: no beam search).", "int")
    length_penalty: float = _option(
        1.0, "Beam scores are divided by length ** this.", "float", traced=True
    )
    early_stopping: bool | str = _option(
        False, "Beam search stopping rule: True, False or 'never'.", "early_stopping"
    )
    num_return_sequences: int = _option(1, "Sequences returned per prompt.", "int")
    penalty_alpha: float | None = _option(
        None,
        "Contrastive search degeneration penalty (> 0 with top_k >= 2).",
        "float?",
        traced=True,
    )
    eos_token_id: tuple[int, ...] | None = _option(
        None, "Ids that end a row (default: the model's; empty: never stop early).", "ids?"
    )
    pad_token_id: int | None = _option(
        None, "Id written after a row ends (default: the model's).", "int?"
    )
    vocab_limit: int | None = _option(
        None, "Ban ids >= this (the embedding rows no tokenizer id maps to).", "int?"
    )
    output_logprobs: bool = _option(
        False, "Also return the log-probability of each chosen token.", "bool"
    )
    # Speculative decoding (generation/speculative.py): with generate(assistant_model=...) or
    # prompt lookup. Outputs equal (greedy) or follow (sampling) the target's alone.
    num_assistant_tokens: int = _option(
        5, "Speculative decoding: draft tokens per step (>= 1).", "int", traced=True
    )
    num_assistant_tokens_schedule: str = _option(
        "constant",
        "Draft length: 'constant', or 'heuristic' (+2 after a fully accepted draft, else -1).",
        "schedule",
    )
    prompt_lookup_num_tokens: int | None = _option(
        None, "Draft this many tokens by n-gram lookup in the prompt and text so far.", "count?"
    )
    max_matching_ngram_size: int = _option(
        2, "Prompt lookup: the longest n-gram matched (then shorter ones).", "int"
    )
    output_acceptance: bool = _option(
        False, "Speculative decoding: return the drafts accepted per step and row.", "bool"
    )
    # Derived in __post_init__: which traced processors are in effect (part of the program).
    active: frozenset = dataclasses.field(init=False, default=frozenset(), repr=False)

    def __post_init__(self):
        for field in options():
            value = _NORMALISERS[field.metadata["kind"]](field.name, getattr(self, field.name))
            object.__setattr__(self, field.name, value)
        _check(self)
        on = {
            "top_p": self.top_p < 1.0,
            "min_p": bool(self.min_p),
            "typical_p": self.typical_p < 1.0,
            "repetition_penalty": self.repetition_penalty != 1.0,
            "presence_penalty": self.presence_penalty != 0.0,
            "frequency_penalty": self.frequency_penalty != 0.0,
            "penalty_alpha": bool(self.penalty_alpha),
        }
        object.__setattr__(self, "active", frozenset(k for k, v in on.items() if v))

    def replace(self, **changes) -> GenerationConfig:
        """A copy with `changes` applied; an unknown name is an error suggesting the closest."""
        names = {f.name for f in options()}
        for name in changes:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown generation option {name!r}{hint}")
        return dataclasses.replace(self, **changes)

    # -- the two kinds of options -------------------------------------------------------------
    def values(self) -> dict[str, float]:
        """The traced options as plain floats (None -> the value that turns them off)."""
        return {
            f.name: float(getattr(self, f.name) or 0.0) for f in options() if f.metadata["traced"]
        }

    def program(self) -> GenerationConfig:
        """The static part: this config with every traced value removed (None), so that
        configs differing only in traced values share one compiled program. Use `values()`
        for the numbers; `active` says which traced processors are on."""
        static = object.__new__(GenerationConfig)
        for field in dataclasses.fields(self):
            # max_new_tokens is a traced loop bound too: only its bucket (the buffer length, an
            # argument of the program) is static.
            removed = field.metadata.get("traced") or field.name == "max_new_tokens"
            value = None if removed else getattr(self, field.name)
            object.__setattr__(static, field.name, value)
        return static

    # -- what the decode loops branch on ------------------------------------------------------
    @property
    def is_beam(self) -> bool:
        return self.num_beams > 1

    @property
    def is_contrastive(self) -> bool:
        # As transformers: contrastive search when penalty_alpha > 0 and top_k > 1, no sampling.
        return (
            not self.do_sample
            and not self.is_beam
            and "penalty_alpha" in self.active
            and (self.top_k or 0) > 1
        )

    @property
    def beam_min_keep(self) -> int:
        """transformers' min_tokens_to_keep for beam sampling: one more than the EOS ids (2 when
        there are none), so a beam can always continue past EOS."""
        return len(self.eos_token_id) + 1 if self.eos_token_id else 2

    def for_model(self, model_config) -> GenerationConfig:
        """Fills the model's EOS / pad ids where unset and checks every id against its
        vocabulary. A single-token bad word equal to an EOS id is dropped (as transformers'
        NoBadWordsLogitsProcessor does), so EOS stays allowed."""
        eos = self.eos_token_id
        eos = (model_config.eos_token_id,) if eos is None else eos
        gen_config = self.replace(
            eos_token_id=eos,
            pad_token_id=model_config.pad_token_id
            if self.pad_token_id is None
            else self.pad_token_id,
            bad_words_ids=tuple(s for s in self.bad_words_ids if s not in {(e,) for e in eos}),
        )
        _check_vocabulary(gen_config, model_config.vocab_size)
        return gen_config


def options() -> tuple[dataclasses.Field, ...]:
    """GenerationConfig's option fields (everything but the derived `active`)."""
    return tuple(f for f in dataclasses.fields(GenerationConfig) if f.init)


# ---------------------------------------------------------------------------------------------
# Normalisation: each kind of option accepts what transformers accepts (numpy scalars
# included) and rejects what would be silently changed (5.7 as a token id, True as a count).
# ---------------------------------------------------------------------------------------------
def _integer(name: str, value, what: str = "") -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}{what} must be an integer, got {value!r}")
    return int(value)


def _float(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _ids(name: str, value) -> tuple[int, ...]:
    if np.ndim(value) == 0 and not isinstance(value, (str, bytes)):
        value = [value]
    if isinstance(value, (str, bytes)) or np.ndim(value) != 1:
        raise ValueError(f"{name} expects a token id or a list of token ids, got {value!r}")
    return tuple(_integer(name, t, " token id") for t in value)


def _id_sequences(name: str, value) -> tuple[tuple[int, ...], ...]:
    out = []
    for seq in value if value is not None else ():
        if isinstance(seq, (str, bytes)) or np.ndim(seq) != 1:
            raise ValueError(f"{name} expects a list of token-id lists, got {value!r}")
        out.append(tuple(_integer(name, t, " token id") for t in seq))
    return tuple(out)


def _early_stopping(name: str, value):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if value != "never":
        raise ValueError(f"{name} must be True, False or 'never', got {value!r}")
    return value


def _optional(normalise):
    return lambda name, value: None if value is None else normalise(name, value)


def _count(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _schedule(name: str, value) -> str:
    if value not in ("constant", "heuristic"):
        raise ValueError(f"{name} must be 'constant' or 'heuristic', got {value!r}")
    return value


_NORMALISERS = {
    "schedule": _schedule,
    "bool": _bool,
    "count?": _optional(_count),
    "int": _integer,
    "int?": _optional(_integer),
    "float": _float,
    "float?": _optional(_float),
    "ids": lambda name, value: () if value is None else _ids(name, value),
    "ids?": _optional(_ids),
    "id_seqs": _id_sequences,
    "early_stopping": _early_stopping,
}


def _check(gen_config: GenerationConfig) -> None:
    """Ranges and combinations that need no model."""
    for name in ("num_beams", "num_return_sequences"):
        if getattr(gen_config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(gen_config, name)}")
    if gen_config.is_beam and gen_config.num_return_sequences > gen_config.num_beams:
        raise ValueError(
            f"num_return_sequences ({gen_config.num_return_sequences}) must be <= num_beams "
            f"({gen_config.num_beams}) in beam search"
        )
    if not gen_config.is_beam and not gen_config.do_sample and gen_config.num_return_sequences > 1:
        raise ValueError(
            "num_return_sequences > 1 needs do_sample=True or beam search: greedy decoding "
            "would return identical copies"
        )
    if gen_config.is_beam and gen_config.output_logprobs:
        raise ValueError(
            "output_logprobs=True is not available with num_beams > 1 (beam search returns "
            "sequences_scores instead)"
        )
    if gen_config.do_sample and not gen_config.temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {gen_config.temperature}")
    for name in ("top_p", "typical_p"):
        if not 0 < getattr(gen_config, name) <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {getattr(gen_config, name)}")
    if gen_config.min_p is not None and not 0 <= gen_config.min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {gen_config.min_p}")
    if gen_config.top_k is not None and gen_config.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {gen_config.top_k}")
    if gen_config.penalty_alpha is not None and not 0 <= gen_config.penalty_alpha <= 1:
        raise ValueError(f"penalty_alpha must be in [0, 1], got {gen_config.penalty_alpha}")
    if gen_config.penalty_alpha:  # > 0: contrastive search
        if gen_config.do_sample or gen_config.is_beam:
            raise ValueError(
                "penalty_alpha selects contrastive search, which is greedy: it cannot be "
                "combined with do_sample=True or num_beams > 1 "
                f"(got do_sample={gen_config.do_sample}, num_beams={gen_config.num_beams})"
            )
        if (gen_config.top_k or 0) < 2:
            raise ValueError(
                f"penalty_alpha (contrastive search) needs top_k >= 2 candidates, got "
                f"top_k={gen_config.top_k!r}"
            )
    if gen_config.repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {gen_config.repetition_penalty}")
    for name in ("no_repeat_ngram_size", "min_new_tokens"):
        if getattr(gen_config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(gen_config, name)}")
    if (
        gen_config.max_new_tokens is not None
        and gen_config.min_new_tokens > gen_config.max_new_tokens
    ):
        raise ValueError(
            f"min_new_tokens ({gen_config.min_new_tokens}) must be <= max_new_tokens "
            f"({gen_config.max_new_tokens})"
        )
    if gen_config.num_assistant_tokens < 1:
        raise ValueError(
            f"num_assistant_tokens must be >= 1, got {gen_config.num_assistant_tokens}"
        )
    if gen_config.max_matching_ngram_size < 1:
        raise ValueError(
            f"max_matching_ngram_size must be >= 1, got {gen_config.max_matching_ngram_size}"
        )
    if any(len(seq) == 0 for seq in gen_config.bad_words_ids + gen_config.stop_sequences):
        raise ValueError("bad_words_ids and stop_sequences must not contain empty sequences")


def _check_vocabulary(gen_config: GenerationConfig, vocab_size: int) -> None:
    """Checks that need the model: every id in range, top_k and vocab_limit against it."""
    ids = [gen_config.pad_token_id, *gen_config.eos_token_id, *gen_config.suppress_tokens]
    ids += [t for seq in gen_config.bad_words_ids + gen_config.stop_sequences for t in seq]
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad} in the generation options are outside [0, {vocab_size})")
    if gen_config.is_contrastive and gen_config.top_k > vocab_size:
        raise ValueError(
            f"top_k ({gen_config.top_k}) must be <= the vocabulary size ({vocab_size}) in "
            "contrastive search"
        )
    if gen_config.vocab_limit is not None:
        special = max([gen_config.pad_token_id, *gen_config.eos_token_id])
        if not gen_config.vocab_limit > max(special, 0):
            raise ValueError(
                f"vocab_limit must be > 0 and > the EOS and pad ids (largest {special}): it bans "
                f"every id >= it, got {gen_config.vocab_limit}"
            )


def flag_specs() -> list[dict[str, Any]]:
    """Command-line flags for the options a script exposes: name, kind, default, help (token-id
    sequences are Python-API only; scripts take stop strings instead)."""
    return [
        {
            "name": f.name,
            "kind": f.metadata["kind"],
            "default": f.default,
            "help": f.metadata["help"] + (" Traced: no recompile." if f.metadata["traced"] else ""),
        }
        for f in options()
        if f.metadata["cli"]
    ]
