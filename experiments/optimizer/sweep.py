"""The OPT recipe's optimiser choices: AdamW beta2 0.95 (OPT) vs 0.999 (Adam's default), and a
short vs long warmup, two seeds each: 8 runs on the LayerNorm study's base config."""


def get_sweep():
    return [
        {"optim.b2": b2, "optim.warmup_steps": warmup, "seed": seed}
        for b2 in (0.95, 0.999)
        for warmup in (10, 100)
        for seed in (0, 1)
    ]
