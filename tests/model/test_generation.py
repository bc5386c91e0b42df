"""Cached incremental decoding (megabyte.generation) against a plain loop over forward."""
import pytest
import torch

from megabyte import Megabyte, MegabyteConfig
from megabyte.generation import allowed_ids, generate, generate_stream, generate_uncached, restrict_logits, sample_next

from .test_model import TINY, VARIANTS, make

# ragged prompts: empty, shorter than a patch, not a multiple of P, several whole patches
PROMPT_LENS = (0, 5, 2, 12)


def prompts_of(lens, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g) for n in lens]


@pytest.mark.parametrize("vocab", ["bytes", "all"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_cached_equals_full_recompute(name, vocab):
    """Same bytes as greedy decoding by full recomputation, same next-byte distributions at every
    step (atol 1e-4 fp32), for a ragged batch that crosses several patch borders; the vocabulary
    restriction is the same in both paths."""
    model = make(**VARIANTS[name])
    prompts = prompts_of(PROMPT_LENS)
    new = 14
    ids, logits = generate(model, prompts, new, temperature=0, vocab=vocab, return_logits=True)
    ref_ids, ref_logits = generate_uncached(model, prompts, new, temperature=0, vocab=vocab, return_logits=True)
    masked = torch.isneginf(logits)
    assert torch.equal(masked, torch.isneginf(ref_logits))
    assert masked[..., 256:].all() if vocab == "bytes" else not masked.any()
    assert ids.shape == (len(prompts), new)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logits.softmax(-1), ref_logits.softmax(-1), atol=1e-4, rtol=0)
    assert not torch.allclose(logits[:, 0], logits[:, 1])  # the steps really differ


@pytest.mark.parametrize("name", ["original", "in_action", "P3"])
def test_batch_rows_equal_single_prompts(name):
    model = make(**VARIANTS[name])
    prompts = prompts_of((7, 0, 9, 3))
    batch = generate(model, prompts, 10, temperature=0)
    for i, p in enumerate(prompts):
        assert torch.equal(batch[i:i + 1], model.generate(p, 10, temperature=0)), f"row {i}"
    # a (B, T) tensor is B prompts of length T
    square = torch.stack([p[:3] for p in prompts if len(p) >= 3])
    assert torch.equal(generate(model, square, 6, temperature=0),
                       generate_uncached(model, square, 6, temperature=0))


def test_empty_prompt_and_bytes_prompt():
    model = make()
    out = model.generate([], 6, temperature=0)
    assert out.shape == (1, 6) and out.dtype == torch.long
    assert torch.equal(out, generate_uncached(model, [[]], 6, temperature=0))
    assert torch.equal(model.generate(b"ab", 4, temperature=0), model.generate(torch.tensor([97, 98]), 4, temperature=0))
    assert model.generate([b"ab"], 0).shape == (1, 0)


def test_global_model_steps_exactly_once_per_completed_patch():
    model = make(P=3, g_nheads=3, T_MAX=33)
    P, L, new = 3, 7, 11
    g_calls, l_calls = [], []
    h1 = model.g_transformer.register_forward_hook(lambda m, a, o: g_calls.append(a[0].shape[1]))
    h2 = model.l_transformer.register_forward_hook(lambda m, a, o: l_calls.append(a[0].shape[1]))
    try:
        model.generate(torch.randint(0, 256, (1, L)), new, temperature=0)
    finally:
        h1.remove()
        h2.remove()
    last = L + new - 1  # the last byte predicted
    assert g_calls[0] == L // P + 1  # prefill: patches 0 .. L // P
    assert g_calls[1:] == [1] * sum(1 for t in range(L + 1, last + 1) if t % P == 0)
    assert sum(g_calls) == last // P + 1
    assert l_calls == [L % P + 1] + [1] * (new - 1)


def test_eos_stops_rows_and_pads_after():
    model = make()
    prompts = prompts_of((3, 6, 1))
    free = generate(model, prompts, 12, temperature=0)
    eos = int(free[0, 2])
    out = generate(model, prompts, 12, temperature=0, eos_id=eos)
    pad = model.config.pad_id
    stops = []
    for i in range(len(prompts)):
        hit = (free[i] == eos).nonzero()
        stop = int(hit[0]) + 1 if len(hit) else 12
        stops.append(stop)
        assert torch.equal(out[i, :stop], free[i, :stop])
        assert (out[i, stop:] == pad).all()
    assert out.shape[1] == max(stops)
    assert stops[0] == 3 or (free[0, :2] == eos).any()
    # every row stopping at its first step: one column
    first = generate(model, prompts[:1], 12, temperature=0)[0, 0].item()
    assert generate(model, prompts[:1], 12, temperature=0, eos_id=first).shape == (1, 1)
    streamed = list(generate_stream(model, prompts[0], 12, temperature=0, eos_id=eos))
    assert streamed == free[0, :stops[0]].tolist()


# ----------------------------------------------------------------------------------------------
# the vocabulary: bytes (and EOS) by default, every id with vocab="all"

SAMPLERS = {"greedy": dict(temperature=0), "sampled": dict(temperature=1.0, seed=0),
            "top_k": dict(temperature=0.8, top_k=40, seed=1), "top_p": dict(temperature=1.2, top_p=0.9, seed=2)}


def untrained_512(eos_bias=0.0):
    """The untrained V=512 model (initializer_range 0.3) that emits special ids such as 302 or 464;
    ``eos_bias`` raises the EOS logit so that some rows stop early."""
    model = make(V=512)
    with torch.no_grad():
        model.to_logits.bias[model.config.eos_id] += eos_bias
    return model


def assert_bytes_eos_then_pad(out, eos, pad):
    """Each row: ids < 256, then optionally ``eos`` followed by ``pad`` only. Returns rows that stopped."""
    stopped = 0
    for row in out.tolist():
        cut = row.index(eos) if eos in row else len(row)
        assert all(i < 256 for i in row[:cut]), row
        assert all(i == pad for i in row[cut + 1:]), row
        stopped += eos in row
    return stopped


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_default_vocab_samples_only_bytes_and_eos(sampler):
    kw = SAMPLERS[sampler]
    cfg = untrained_512().config
    prompts = prompts_of(PROMPT_LENS)
    free = generate(untrained_512(), prompts, 16, vocab="all", **kw)
    assert (free >= 256).sum() > 5  # the case of the issue: ids that are neither bytes nor EOS
    assert ((generate(untrained_512(), prompts, 16, **kw)) < 256).all()  # eos_id=None: bytes only
    out = generate(untrained_512(eos_bias=3.0), prompts, 16, eos_id=cfg.eos_id, **kw)
    assert 0 < assert_bytes_eos_then_pad(out, cfg.eos_id, cfg.pad_id) < len(prompts)  # some rows stopped
    alone = generate(untrained_512(eos_bias=3.0), prompts[1:2], 16, eos_id=cfg.eos_id, **kw)
    streamed = list(generate_stream(untrained_512(eos_bias=3.0), prompts[1], 16, eos_id=cfg.eos_id, **kw))
    assert streamed == alone[0].tolist()[:len(streamed)] and all(i < 256 or i == cfg.eos_id for i in streamed)


def test_all_vocab_emits_special_ids():
    model = untrained_512()
    prompts = prompts_of(PROMPT_LENS)
    greedy = model.generate(prompts, 16, temperature=0, vocab="all")
    sampled = model.generate(prompts, 16, temperature=1.0, seed=0, vocab="all")
    assert (greedy >= 256).any() and (sampled >= 256).any()
    assert not torch.equal(greedy, model.generate(prompts, 16, temperature=0))


@pytest.mark.parametrize("sampler", ["sampled", "top_k", "top_p"])
@pytest.mark.parametrize("vocab", ["bytes", "all"])
def test_seeded_sampling_cached_equals_full_recompute(sampler, vocab):
    """One prompt at a time (one RNG stream per row in the reference): the same sampled ids."""
    model = untrained_512(eos_bias=1.0)
    for p in prompts_of((0, 5, 12)):
        kw = dict(SAMPLERS[sampler], eos_id=model.config.eos_id, vocab=vocab)
        assert torch.equal(generate(model, [p], 14, **kw), generate_uncached(model, [p], 14, **kw))


def test_restrict_logits_masks_before_every_sampling_rule():
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0]])  # ids 2 and 3 the most likely, but not allowed
    allowed = torch.tensor([True, True, False, False])
    masked = restrict_logits(logits, allowed)
    assert torch.equal(masked, torch.tensor([[0.0, 1.0, -float("inf"), -float("inf")]]))
    assert int(sample_next(masked, 0)) == 1
    assert int(sample_next(masked, 1.0, top_k=1)) == 1  # top-k among the allowed ids
    g = torch.Generator().manual_seed(0)
    assert {int(sample_next(masked, 1.0, top_p=0.99, generator=g)) for _ in range(200)} == {0, 1}
    assert torch.equal(allowed_ids(300, "bytes", 258), (torch.arange(300) < 256) | (torch.arange(300) == 258))
    assert allowed_ids(300, "bytes", None).sum() == 256 and allowed_ids(300, "all", 258) is None


def test_seeded_sampling_is_reproducible():
    model = make()
    prompts = prompts_of((4, 9))
    a = model.generate(prompts, 20, temperature=1.0, seed=7)
    b = model.generate(prompts, 20, temperature=1.0, seed=7)
    c = model.generate(prompts, 20, temperature=1.0, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy = model.generate(prompts, 20, temperature=0)
    assert torch.equal(model.generate(prompts, 20, temperature=1.0, top_k=1, seed=1), greedy)
    assert torch.equal(model.generate(prompts, 20, temperature=1.0, top_p=1e-6, seed=1), greedy)


def test_top_k_and_top_p_restrict_the_sampled_ids():
    model = make()
    ids, logits = generate(model, prompts_of((5, 2)), 24, temperature=0.7, top_k=3, seed=0, return_logits=True)
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == ids[..., None]).any(-1).all()
    ids, logits = generate(model, prompts_of((5, 2)), 24, temperature=1.0, top_p=0.3, seed=0, return_logits=True)
    probs = logits.softmax(-1)
    p_ids = probs.gather(-1, ids[..., None]).squeeze(-1)
    mass_above = (probs * (probs > p_ids[..., None])).sum(-1)  # mass of strictly more likely ids
    assert (mass_above < 0.3 + 1e-6).all()


def test_sample_next_nucleus_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    seen = {int(sample_next(logits, 1.0, top_k=3, generator=g)) for _ in range(300)}
    assert seen == {0, 1, 2}
    assert int(sample_next(logits, 0)) == 0


def test_learned_positions_past_t_max_raise_clearly():
    model = make()  # T_MAX = 32, P = 4
    model.generate(torch.randint(0, 256, (1, 20)), 12, temperature=0)  # last byte 31: patch 7 fits
    with pytest.raises(ValueError, match=r"past T_MAX=32.*alibi"):
        model.generate(torch.randint(0, 256, (1, 20)), 13, temperature=0)
    with pytest.raises(ValueError, match="T_MAX=32"):
        model.generate([[1] * 3, [2] * 40], 1, temperature=0)


@pytest.mark.parametrize("positions", ["alibi", "none"])
def test_alibi_and_none_generate_past_t_max(positions):
    model = make(positions=positions)  # T_MAX = 32
    prompts = prompts_of((26, 29))
    ids, logits = generate(model, prompts, 12, temperature=0, return_logits=True)
    ref_ids, ref_logits = generate_uncached(model, prompts, 12, temperature=0, return_logits=True)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logits.softmax(-1), ref_logits.softmax(-1), atol=1e-4, rtol=0)


def test_training_mode_restored_and_dropout_off():
    model = make(dropout=0.5).train()
    a = model.generate([b"xyz"], 5, temperature=0)
    assert model.training
    assert torch.equal(a, model.eval().generate([b"xyz"], 5, temperature=0))


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(eos_id=10_000), "eos_id"),
    (dict(vocab="ascii"), r"vocab must be 'bytes' .* or 'all'"),
    (dict(vocab=None), "vocab"),
])
def test_bad_arguments_raise(kw, match):
    model = make()
    with pytest.raises(ValueError, match=match):
        model.generate([b"a"], 3, **kw)


def test_bad_prompts_raise():
    model = make()
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 264\)"):
        model.generate([[1, 2, 300]], 3)
    with pytest.raises(ValueError, match="max_new_bytes"):
        model.generate([[1]], -1)
    with pytest.raises(ValueError, match="integers"):
        model.generate(torch.zeros(1, 3), 2)
