"""The forward arguments researchers use in transformers (output_hidden_states,
output_attentions, head_mask, inputs_embeds, position_ids), our segment_ids (packed sequences)
and full [B, T, T] masks (shared contexts), checked against transformers' PyTorch OPT on the
pre-LN and post-LN + project_in/out variants with left padding, and across jit, scan_layers,
the KV cache and the attention implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_hf_model, max_rel_diff, ragged_batch, save_hf

import opt_jax

TOL = 1e-4
VARIANTS = ["pre_ln", "post_ln_project"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """variant -> (hf model with eager attention, our config, our params)."""
    out = {}
    for variant in VARIANTS:
        hf = make_hf_model(variant)
        hf.config._attn_implementation = "eager"  # the implementation that returns probabilities
        directory = save_hf(hf, tmp_path_factory.mktemp(variant))
        config, params = opt_jax.load_pretrained(directory)
        out[variant] = (hf, config, params)
    return out


def _hf(hf, **kwargs):
    with torch.no_grad():
        return hf(**{k: torch.as_tensor(np.asarray(v)) for k, v in kwargs.items()},
                  output_hidden_states=True, output_attentions=True)  # fmt: skip


def _ours(config, params, ids, mask, **kwargs):
    model = opt_jax.OPTForCausalLM(config)
    return model.apply({"params": params}, ids, attention_mask=mask, **kwargs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hidden_states_and_attentions_match_transformers(models, variant):
    hf, config, params = models[variant]
    ids, mask = ragged_batch()
    ref = _hf(hf, input_ids=ids, attention_mask=mask)
    out = _ours(config, params, ids, mask, output_hidden_states=True, output_attentions=True)
    real = mask == 1  # left padding: HF's padding queries see only masked keys
    assert len(out.hidden_states) == config.num_hidden_layers + 1 == len(ref.hidden_states)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert ours.shape == theirs.shape
        assert max_rel_diff(ours, theirs.numpy(), real) <= TOL
    assert len(out.attentions) == config.num_hidden_layers == len(ref.attentions)
    for ours, theirs in zip(out.attentions, ref.attentions, strict=True):
        assert ours.shape == (3, config.num_attention_heads, 11, 11) == theirs.shape
        rows = np.broadcast_to(real[:, None, :, None], ours.shape)
        np.testing.assert_allclose(np.asarray(ours)[rows], theirs.numpy()[rows], atol=1e-5)
    # The last hidden state is what the head reads: the logits come from it.
    logits = out.hidden_states[-1] @ params["model"]["decoder"]["embed_tokens"]["embedding"].T
    np.testing.assert_allclose(logits, out.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_inputs_embeds_and_position_ids_match_transformers(models, variant):
    hf, config, params = models[variant]
    ids, mask = ragged_batch()
    embeds = np.asarray(params["model"]["decoder"]["embed_tokens"]["embedding"])[ids]
    embeds = embeds + 0.1 * np.random.RandomState(0).randn(*embeds.shape).astype(np.float32)
    positions = np.random.RandomState(1).randint(0, config.max_position_embeddings, ids.shape)
    ref = _hf(hf, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    model = opt_jax.OPTForCausalLM(config)
    out = model.apply(
        {"params": params}, None, attention_mask=mask, inputs_embeds=embeds, position_ids=positions
    )
    assert max_rel_diff(out.logits, ref.logits.numpy(), mask == 1) <= TOL
    # inputs_embeds equal to the token embeddings give the input_ids result.
    plain = model.apply({"params": params}, ids, attention_mask=mask).logits
    exact = np.asarray(params["model"]["decoder"]["embed_tokens"]["embedding"])[ids]
    same = model.apply({"params": params}, None, attention_mask=mask, inputs_embeds=exact).logits
    np.testing.assert_array_equal(plain, same)


@pytest.mark.parametrize("variant", VARIANTS)
def test_head_mask_matches_transformers_with_scaled_heads(models, variant):
    """transformers 5 dropped head_mask; its meaning (each head's probabilities times the mask)
    equals scaling that head's slice of out_proj's input, which transformers can run."""
    hf, config, params = models[variant]
    ids, mask = ragged_batch()
    layers, heads, head_dim = config.num_hidden_layers, config.num_attention_heads, config.head_dim
    head_mask = np.random.RandomState(2).rand(layers, heads).astype(np.float32)
    head_mask[0, 1] = head_mask[1, 3] = 0.0  # ablated heads
    scaled = make_hf_model(variant)
    scaled.load_state_dict(hf.state_dict())
    with torch.no_grad():
        for i, layer in enumerate(scaled.model.decoder.layers):
            columns = torch.tensor(np.repeat(head_mask[i], head_dim))
            layer.self_attn.out_proj.weight.mul_(columns[None, :])
    ref = _hf(scaled, input_ids=ids, attention_mask=mask)
    out = _ours(config, params, ids, mask, head_mask=head_mask, output_attentions=True)
    assert max_rel_diff(out.logits, ref.logits.numpy(), mask == 1) <= TOL
    assert float(jnp.abs(out.attentions[0][:, 1]).max()) == 0.0  # the ablated head's row
    # A [N] mask applies to every layer; all ones changes nothing.
    ones = _ours(config, params, ids, mask, head_mask=np.ones(heads, np.float32)).logits
    np.testing.assert_array_equal(ones, _ours(config, params, ids, mask).logits)


def test_every_head_returns_them_under_jit_and_scan_layers(models):
    _, config, params = models["post_ln_project"]
    ids, mask = ragged_batch()
    flags = dict(output_hidden_states=True, output_attentions=True)
    reference = _ours(config, params, ids, mask, **flags)
    scanned = config.replace(scan_layers=True)
    stacked = opt_jax.param_tree.stack_layers(params, config.num_hidden_layers)
    run = jax.jit(
        lambda p, i, m, h: opt_jax.OPTForCausalLM(scanned).apply(
            {"params": p}, i, attention_mask=m, head_mask=h, **flags
        )
    )
    out = run(stacked, ids, mask, jnp.ones((config.num_attention_heads,)))
    for name in ("hidden_states", "attentions"):
        ours, ref = getattr(out, name), getattr(reference, name)
        assert isinstance(ours, tuple) and len(ours) == len(ref)
        for a, b in zip(ours, ref, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for head in ("OPTForSequenceClassification", "OPTForQuestionAnswering", "OPTModel"):
        head_config = config.replace(architecture=head)
        head_params = opt_jax.init_params(head_config, 0)
        result = opt_jax.model_for(head_config).apply(
            {"params": head_params}, ids, attention_mask=mask, **flags
        )
        assert len(result.hidden_states) == 3 and len(result.attentions) == 2


def test_attentions_with_the_kv_cache_and_fused_attention(models):
    _, config, params = models["pre_ln"]
    ids = np.random.RandomState(3).randint(3, config.vocab_size, (2, 9))
    full = _ours(config, params, ids, None, output_attentions=True).attentions
    # Prefill 6 tokens, then 3 one-token steps: each step's row over the cache's 9 slots is the
    # full pass's row for that position.
    model = opt_jax.OPTForCausalLM(config)
    cache = opt_jax.KVCache.init(config, 2, 9)
    out = model.apply({"params": params}, ids[:, :6], cache=cache, output_attentions=True)
    np.testing.assert_allclose(out.attentions[0][:, :, :, :6], full[0][:, :, :6, :6], atol=1e-6)
    for t in range(6, 9):
        out = model.apply(
            {"params": params}, ids[:, t : t + 1], cache=out.cache, output_attentions=True
        )
        assert out.attentions[1].shape == (2, config.num_attention_heads, 1, 9)
        np.testing.assert_allclose(out.attentions[1][:, :, 0], full[1][:, :, t], atol=1e-6)
    # A fused implementation falls back to einsum when probabilities are asked for.
    fused = config.replace(attention_impl="dot_product")
    same = _ours(fused, params, ids, None, output_attentions=True).attentions
    for a, b in zip(same, full, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_sequences_get_what_they_get_alone(models, variant):
    """Three sequences packed into one row (then padding) with segment_ids: each one's logits
    are transformers' logits for that sequence on its own, positions restarting at 0."""
    hf, config, params = models[variant]
    rng = np.random.RandomState(7)
    pieces = [rng.randint(3, config.vocab_size, n) for n in (5, 3, 4)]
    row = np.concatenate(pieces + [np.ones(2, int)])[None]  # 12 tokens, 2 of padding
    segments = np.concatenate([np.full(len(p), k + 1) for k, p in enumerate(pieces)] + [[0, 0]])
    mask = (segments > 0)[None].astype(np.int32)
    for impl in ("einsum", "dot_product"):
        cfg = config.replace(attention_impl=impl)
        logits = np.asarray(_ours(cfg, params, row, mask, segment_ids=segments[None]).logits)[0]
        start = 0
        for piece in pieces:
            alone = _hf(hf, input_ids=piece[None], attention_mask=np.ones((1, len(piece)))).logits
            got = logits[start : start + len(piece)]
            assert max_rel_diff(got, alone[0].numpy()) < TOL, (variant, impl)
            start += len(piece)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_full_mask_shares_one_context_between_continuations(models, variant):
    """A [B, T, T] attention_mask laying out one context, then two continuations that each see
    the context and themselves: every token's logits are transformers' for context +
    continuation alone (positions counted from what each token sees), padding included."""
    hf, config, params = models[variant]
    rng = np.random.RandomState(8)
    context, first, second = (rng.randint(3, config.vocab_size, n) for n in (4, 3, 2))
    row = np.concatenate([context, first, second, np.ones(2, int)])[None]  # 11 tokens
    branch = np.array([0] * 4 + [1] * 3 + [2] * 2 + [-1] * 2)  # -1: padding
    sees = (branch[None, :] == 0) | (branch[None, :] == branch[:, None])
    full = np.tril(sees & (branch[:, None] >= 0) & (branch[None, :] >= 0))[None]
    logits = np.asarray(_ours(config, params, row, full.astype(np.int32)).logits)[0]
    for span, tokens in ((slice(4, 7), first), (slice(7, 9), second)):
        whole = np.concatenate([context, tokens])[None]
        alone = _hf(hf, input_ids=whole, attention_mask=np.ones(whole.shape)).logits[0].numpy()
        assert max_rel_diff(logits[:4], alone[:4]) < TOL, variant
        assert max_rel_diff(logits[span], alone[4:]) < TOL, variant


def test_bad_forward_inputs_name_the_problem(models):
    _, config, params = models["pre_ln"]
    model = opt_jax.OPTForCausalLM(config)
    ids, mask = ragged_batch()
    embeds = jnp.zeros((3, 11, config.word_embed_proj_dim))
    cases = [
        (dict(inputs_embeds=embeds), ids, "exactly one of input_ids and inputs_embeds"),
        ({}, None, "exactly one of input_ids and inputs_embeds"),
        (dict(inputs_embeds=embeds[..., :3]), None, r"inputs_embeds must be \[batch, length, 16\]"),
        (dict(position_ids=ids[:, :4]), ids, r"position_ids shape \(3, 4\) does not match"),
        (dict(head_mask=jnp.ones((3, 4))), ids, r"head_mask must be \[num_heads\]"),
        (dict(segment_ids=ids[:, :4]), ids, r"segment_ids shape \(3, 4\) does not match"),
        (
            dict(segment_ids=ids, cache=opt_jax.KVCache.init(config, 3, 16)),
            ids,
            "segment_ids .packed sequences. take no cache",
        ),
        (
            dict(attention_mask=jnp.ones((3, 11, 10), bool)),
            ids,
            r"a full attention_mask must be \[batch, length, length\] = \(3, 11, 11\)",
        ),
        (
            dict(attention_mask=jnp.ones((3, 11, 11), bool), segment_ids=ids),
            ids,
            r"a full \[B, T, T\] attention_mask takes no segment_ids",
        ),
    ]
    for kwargs, input_ids, message in cases:
        with pytest.raises(ValueError, match=message):
            model.apply({"params": params}, input_ids, **kwargs)
