"""The causal-LM loss and its gradients match transformers' loss and loss.backward()."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import ragged_batch
from flax import traverse_util

import opt_jax
from opt_jax.checkpoints.hf import hf_name, to_hf_layout


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_project"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_loss_and_grads_match_transformers(hf_dir, variant, side):
    hf_model, directory = hf_dir(variant)
    config, params = opt_jax.load_pretrained(directory)
    ids, mask = ragged_batch(side=side)
    model = opt_jax.OPTForCausalLM(config)

    def loss_fn(p):
        logits = model.apply({"params": p}, ids, attention_mask=mask).logits
        return opt_jax.causal_lm_loss(logits, jnp.asarray(ids), jnp.asarray(mask))[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    # A target counts when it and its context token are real (see causal_lm_loss).
    counted = np.concatenate([np.zeros_like(mask[:, :1]), mask[:, 1:] * mask[:, :-1]], axis=1)
    labels = torch.tensor(np.where(counted == 1, ids, -100))
    hf_model.zero_grad()
    ref = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=labels)
    ref.loss.backward()
    assert abs(float(loss) - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())

    hf_grads = {n: p.grad.numpy() for n, p in hf_model.named_parameters() if p.grad is not None}
    flat = traverse_util.flatten_dict(grads)
    assert len(flat) == len(hf_grads)  # lm_head is tied: its gradient lands on embed_tokens
    for path, g in flat.items():
        ours, theirs = to_hf_layout(path, np.asarray(g)), hf_grads[hf_name(path)]
        err = np.abs(ours - theirs).max()
        if path[-2] == "k_proj" and path[-1] == "bias":
            # Softmax is shift-invariant: the key bias's true gradient is exactly zero.
            assert err <= 1e-6, hf_name(path)
        else:
            assert err <= 1e-4 * np.abs(theirs).max(), (hf_name(path), err)


def test_loss_ignores_padding_and_counts_targets():
    logits = jax.random.normal(jax.random.key(0), (2, 4, 7))
    ids = jnp.array([[1, 1, 5, 6], [3, 4, 5, 6]])
    mask = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    loss, count = opt_jax.causal_lm_loss(logits, ids, mask)
    assert int(count) == 4  # row 0: only token 3 (its context, token 2, is real) + 3
    logp = jax.nn.log_softmax(logits, -1)
    expected = -(logp[0, 2, 6] + logp[1, 0, 4] + logp[1, 1, 5] + logp[1, 2, 6]) / 4
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "impl",
    [dict(remat_policy="full"), dict(remat_policy="save_dots_no_batch"), dict(scan_layers=True),
     dict(scan_layers=True, remat_policy="save_dots", attention_impl="dot_product")],
    ids=["remat_full", "remat_dots", "scan", "scan_remat_dot_product"],
)  # fmt: skip
def test_gradients_do_not_depend_on_implementation_options(hf_dir, impl):
    from opt_jax.param_tree import unstack_layers

    _, directory = hf_dir("post_ln_project", dropout=0.0)
    ids, mask = ragged_batch(side="right")

    def grads(**options):
        config, params = opt_jax.load_pretrained(directory, **options)
        model = opt_jax.OPTForCausalLM(config)

        def loss_fn(p):
            logits = model.apply({"params": p}, ids, attention_mask=mask).logits
            return opt_jax.causal_lm_loss(logits, jnp.asarray(ids), jnp.asarray(mask))[0]

        g = jax.grad(loss_fn)(params)
        return unstack_layers(g) if config.scan_layers else g

    reference, other = grads(), grads(**impl)
    flat_ref, flat_other = traverse_util.flatten_dict(reference), traverse_util.flatten_dict(other)
    assert flat_ref.keys() == flat_other.keys()
    for path in flat_ref:
        scale = float(np.abs(flat_ref[path]).max()) or 1.0
        err = float(np.abs(flat_ref[path] - flat_other[path]).max())
        assert err <= 1e-5 * scale + 1e-7, (path, err)
