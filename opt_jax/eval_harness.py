"""An lm-evaluation-harness backend: `import opt_jax.eval_harness` registers the model `opt_jax`.

    lm_eval --model opt_jax --model_args pretrained=DIR,batch_size=8,dtype=bfloat16 --tasks ...
    lm_eval.simple_evaluate(model="opt_jax", model_args="pretrained=DIR,batch_size=8", ...)

DIR is an HF directory or one of our exports (config.json + weights, and the tokenizer files).
Requests are encoded as lm-eval's `hf` backend encodes them for OPT, so both give the same
numbers on the same checkpoint (tested): the tokenizer's default adds OPT's `</s>` before each
context (and before a rolling document, whose `</s>` is then scored too, as `hf` does); an
empty context is `</s>` alone; inputs longer than the model lose tokens from the left.
Needs the optional install: `pip install -e ".[eval]"` (lm-eval 0.4).
"""

from __future__ import annotations

import os
import time

# lm-eval registers its own backends ("hf", ...) only while its registry is empty: load them
# before adding ours, or registering "opt_jax" would hide them.
import lm_eval.models  # noqa: F401
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from opt_jax.checkpoints.hf import load_pretrained
from opt_jax.evaluation.scoring import score_pairs
from opt_jax.generation.text import generate_text
from opt_jax.model import OPTForCausalLM
from opt_jax.tokenizer import OPTTokenizer

DEFAULT_MAX_GEN_TOKS = 256
# Seconds from the latest backend's construction to its model being loaded and to its first
# scored batch (scripts/evaluate.py --benchmark reports them).
TIMINGS: dict[str, float] = {}


@register_model("opt_jax")
class OPTJaxLM(TemplateLM):
    """lm-eval's LM interface over opt_jax's batched scoring and `generate`."""

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 8,
        dtype: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        quantize: str | None = None,
        **unused,  # device, max_batch_size, ...: lm-eval passes them to every backend
    ):
        super().__init__()
        self._created = time.perf_counter()
        TIMINGS.clear()
        if not os.path.isdir(str(pretrained)):
            raise ValueError(f"pretrained={pretrained!r} is not a directory")
        try:
            self.tokenizer = OPTTokenizer.from_pretrained(pretrained)
        except FileNotFoundError as e:
            raise ValueError(
                f"pretrained={pretrained}: {e} (the evaluation needs its tokenizer)"
            ) from e
        overrides = {"dtype": dtype, "param_dtype": dtype} if dtype else {}
        if quantize:  # int8 / int4 / llm_int8 as the weights load (scan_layers: one layer's
            overrides["scan_layers"] = True  # kernels dequantised at a time, as generate.py)
        config, self.params = load_pretrained(
            pretrained, architecture="OPTForCausalLM", quantize=quantize or None, **overrides
        )
        self.model = OPTForCausalLM(config)
        if str(batch_size).startswith("auto"):
            batch_size = 8  # fixed shapes compile once; "auto" would search by trial compiles
        self.batch_size = int(batch_size)
        self._max_length = int(max_length or config.max_position_embeddings)
        if self._max_length > config.max_position_embeddings:
            raise ValueError(
                f"max_length {self._max_length} exceeds the model's "
                f"{config.max_position_embeddings} positions"
            )
        self.max_gen_toks = int(max_gen_toks)
        TIMINGS["loaded_s"] = time.perf_counter() - self._created

    # -- what TemplateLM needs ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id  # `</s>`, as transformers' OPT tokenizer says

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        # As transformers' OPT tokenizer: `</s>` first unless add_special_tokens=False (a string
        # that already starts with it gets no second one).
        return self.tokenizer.encode(string, add_prefix=add_special_tokens is not False)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(context, continuation) for _, context, continuation in requests]
        with tqdm(total=len(pairs), disable=disable_tqdm, desc="opt_jax loglikelihood") as bar:

            def progress(n):
                TIMINGS.setdefault("first_result_s", time.perf_counter() - self._created)
                bar.update(n)

            return score_pairs(
                self.model, self.params, pairs, batch_size=self.batch_size,
                max_length=self.max_length, progress=progress,
            )  # fmt: skip

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        spans, pairs = [], []
        for (string,) in [r.args for r in requests]:
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            windows = [make_disjoint_window(w) for w in windows]
            spans.append((len(pairs), len(pairs) + len(windows)))
            pairs += windows
        scores = self._loglikelihood_tokens(
            [(None, c, t) for c, t in pairs], disable_tqdm=disable_tqdm
        )
        return [float(sum(s for s, _ in scores[a:b])) for a, b in spans]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, per the task's gen_kwargs) continuations through `generate`,
        stopped at EOS or any `until` string (excluded), at most `max_gen_toks` tokens; the
        context is left-truncated to leave room for them."""
        out = []
        for context, gen_kwargs in tqdm(
            [r.args for r in requests], disable=disable_tqdm, desc="opt_jax generate_until"
        ):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0))
            options = {"do_sample": do_sample and temperature > 0}
            if options["do_sample"]:
                options["temperature"] = temperature
                options["top_p"] = float(kwargs.pop("top_p", 1.0))
            ids = self.tok_encode(context)[-(self.max_length - max_new) :]  # what fits
            [result] = generate_text(
                self.model, self.params, self.tokenizer, [ids], max_new_tokens=max_new,
                stop_strings=[u for u in until if u] or None, **options,
            )  # fmt: skip
            out.append(result)
        return out


def task_manager_for(tasks: list[str], include_path: str | None = None):
    """An lm-eval TaskManager that knows `tasks`. lm-eval indexes all of its ~14,000 built-in
    task files on construction (10 s on 2 CPU cores, cold); when every task is under
    include_path, only that folder is indexed."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def evaluate(
    pretrained: str,
    tasks: list[str],
    *,
    include_path: str | None = None,
    model: str = "opt_jax",
    model_args: dict | None = None,
    task_manager=None,
    **options,
):
    """`lm_eval.simple_evaluate` of `tasks` (checked to exist first, including those under
    include_path) on `model`: this backend by default, or any registered lm-eval backend
    ("hf" for the PyTorch reference) with extra `model_args`. options: num_fewshot, limit, ...
    task_manager: a TaskManager to reuse (default: `task_manager_for(tasks, include_path)`)."""
    import lm_eval

    manager = task_manager or task_manager_for(tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown tasks {unknown} (include_path={include_path!r})")
    args = {"pretrained": pretrained, **(model_args or {})}
    return lm_eval.simple_evaluate(
        model=model,
        model_args=",".join(f"{k}={v}" for k, v in args.items() if v is not None),
        tasks=list(tasks),
        task_manager=manager,
        **{k: v for k, v in options.items() if v is not None},
    )


__all__ = ["OPTJaxLM", "evaluate", "task_manager_for"]
