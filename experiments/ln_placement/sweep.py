"""Pre-LN vs post-LN (opt-350m is OPT's only post-LN size) at two depths and two learning
rates, two seeds each: 16 runs."""


def get_sweep():
    return [
        {
            "model.do_layer_norm_before": pre_ln,
            "model.num_hidden_layers": depth,
            "optim.learning_rate": lr,
            "seed": seed,
        }
        for pre_ln in (True, False)
        for depth in (2, 6)
        for lr in (1e-3, 5e-3)
        for seed in (0, 1)
    ]
