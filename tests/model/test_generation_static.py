"""The static-shape decoder (megabyte.static_decode, issue 17) against the cached decoder and full
recomputation, and its CPU proxies for CUDA graphs: no host syncs between host checks (profiler),
one compiled graph per step over many positions (torch.compile fullgraph, error_on_recompile)."""
from __future__ import annotations

import collections

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megabyte import generation
from megabyte.generation import generate, generate_stream, generate_uncached
from megabyte.static_decode import StaticStepper
from tests._device import DEVICE

from .test_generation import prompts_of, untrained_512
from .test_model import VARIANTS, make
from .test_stages import STAGES
from .test_stages import make as make_stages

SYNC_OPS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero")
RAGGED = (0, 5, 2, 13, 7)  # empty, inside a patch, across several patch borders

# two stages: learned / ALiBi / no positions, MQA / GQA / full heads, pads, P = 1 and 3;
# three and four stages with mixed options
CONFIGS = {name: ("two", VARIANTS[name]) for name in
           ("original", "alibi", "no_positions", "gqa", "full_heads", "trainable_pad", "in_action", "P3", "P1",
            "tied_relu_norm")}
CONFIGS.update({name: ("stages", STAGES[name]) for name in ("three", "three_alibi_trainable_pad", "four_mixed_options")})


def model_of(name):
    kind, kw = CONFIGS[name]
    return (make(**kw) if kind == "two" else make_stages(kw)).to(DEVICE)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_static_equals_cached_and_recompute(name):
    """Ragged prompts, greedy: the same ids as the cached decoder and full recomputation, the same
    next-byte distributions (atol 1e-4), and the same output for any host-check interval."""
    model = model_of(name)
    prompts = prompts_of(RAGGED)
    new = 15
    ids, logits = generate(model, prompts, new, temperature=0, vocab="all", return_logits=True, decoder="static")
    cached, c_logits = generate(model, prompts, new, temperature=0, vocab="all", return_logits=True,
                                decoder="cached")
    ref = generate_uncached(model, prompts, new, temperature=0, vocab="all")
    assert ids.shape == (len(prompts), new)
    assert torch.equal(ids, cached) and torch.equal(ids, ref)
    torch.testing.assert_close(logits.softmax(-1), c_logits.softmax(-1), atol=1e-4, rtol=0)
    assert not torch.equal(ids[:, :7], ids[:, 7:14])  # the steps really differ
    for n in (1, 5):
        assert torch.equal(generate(model, prompts, new, temperature=0, vocab="all", check_every=n), ids), n


@pytest.mark.parametrize("name", ["original", "alibi", "three"])
def test_eos_stops_rows_like_the_cached_decoder(name):
    """A ragged batch where rows stop at different steps: same ids, pad after EOS, same width, for
    host checks every 1, 3 or 100 bytes; the stream of one row too."""
    model = model_of(name)
    prompts = prompts_of((3, 6, 1, 10))
    free = generate(model, prompts, 14, temperature=0, decoder="cached")
    eos = int(free[1, 4])
    want = generate(model, prompts, 14, temperature=0, eos_id=eos, decoder="cached")
    assert want.shape[1] < 14 or (free == eos).any(1).sum() < len(prompts)  # EOS really stops rows
    assert (want == model.config.pad_id).any()
    assert torch.equal(generate_uncached(model, prompts, 14, temperature=0, eos_id=eos), want)
    for n in (1, 3, 100):
        assert torch.equal(generate(model, prompts, 14, temperature=0, eos_id=eos, check_every=n), want), n
    for i in (0, 1):
        row = want[i].tolist()
        row = row[:row.index(eos) + 1] if eos in row else row
        assert list(generate_stream(model, prompts[i], 14, temperature=0, eos_id=eos)) == row
        assert list(generate_stream(model, prompts[i], 14, temperature=0, eos_id=eos, check_every=5)) == row


@pytest.mark.parametrize("kw", [dict(temperature=1.0, seed=0), dict(temperature=0.8, top_k=40, seed=1),
                                dict(temperature=1.2, top_p=0.9, seed=2)])
def test_seeded_sampling_is_reproducible(kw):
    """On-device sampling from a seeded generator: the same ids on every run and for any check
    interval; different seeds differ; the cached decoder draws the same stream while no row has
    stopped (no EOS, or one prompt), so it samples the same ids there."""
    model = untrained_512(eos_bias=1.0).to(DEVICE)
    eos = model.config.eos_id
    prompts = prompts_of((4, 0, 9))
    a = generate(model, prompts, 20, **kw)
    assert torch.equal(a, generate(model, prompts, 20, check_every=3, **kw))
    assert not torch.equal(a, generate(model, prompts, 20, **dict(kw, seed=kw["seed"] + 10)))
    assert torch.equal(a, generate(model, prompts, 20, decoder="cached", **kw))
    with_eos = generate(model, prompts, 20, eos_id=eos, **kw)
    assert torch.equal(with_eos, generate(model, prompts, 20, eos_id=eos, check_every=1, **kw))
    for p in prompts:
        assert torch.equal(generate(model, [p], 20, eos_id=eos, **kw),
                           generate(model, [p], 20, eos_id=eos, decoder="cached", **kw))


def _syncs_while(it, blocks: int) -> collections.Counter:
    """Host-sync ops the profiler records while ``it`` runs ``blocks`` more blocks."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(blocks):
            next(it)
    return collections.Counter(e.name for e in prof.events() if e.name in SYNC_OPS)


@pytest.mark.parametrize("name", ["original", "alibi", "three"])
@pytest.mark.parametrize("sampler", [dict(temperature=0), dict(temperature=0.9, top_k=30, top_p=0.9, seed=3)])
def test_no_host_sync_between_host_checks(name, sampler):
    """Profiled decode loop after the prefill: with ``eos_id`` exactly one ``.item()`` per block of
    ``check_every`` bytes (the host check) and nothing else; without ``eos_id`` none at all."""
    model = model_of(name)
    prompts = prompts_of((3, 6, 1))
    N, blocks = 4, 3  # 12 bytes, past several patch and unit borders
    kw = dict(dict(top_k=None, top_p=None, seed=None), **sampler)
    for eos in (None, model.config.eos_id):
        out = torch.empty(len(prompts), 40, dtype=torch.long, device=DEVICE)
        it = generation._static_iter(model, prompts, 40, out, None, eos_id=eos, vocab="bytes", check_every=N,
                                     cuda_graphs=False, info=None, **kw)
        with torch.no_grad():
            next(it)  # prefill and the first block
            syncs = _syncs_while(it, blocks)
        assert syncs == (collections.Counter() if eos is None else collections.Counter({SYNC_OPS[0]: blocks})), \
            (eos, syncs)


def _compiling_stepper(stage: int, graphs: list):
    """A StaticStepper whose step ``stage`` runs through torch.compile(fullgraph=True) with a
    backend that records each graph it is given (and runs it eagerly)."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    class Compiled(StaticStepper):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.calls = 0
            compiled = torch.compile(self._steps[stage], fullgraph=True, backend=backend)

            def counted():
                self.calls += 1
                return compiled()
            self._steps[stage] = counted
    return Compiled


@pytest.mark.parametrize("name, stage", [("original", 1), ("original", 0), ("alibi", 1), ("three", 2),
                                         ("three", 1), ("three", 0)])
def test_each_step_compiles_once_as_the_position_moves(name, stage, monkeypatch):
    """Each stage's step compiles to one graph without breaks (fullgraph) and is never recompiled
    (error_on_recompile) over 2P+1 bytes and more, while the positions, lengths and masks move;
    the compiled decoder gives the eager one's bytes."""
    model = model_of(name)
    prompts = prompts_of((3, 6))
    u0 = model.config.P
    new = 2 * u0 + 3
    want = generate(model, prompts, new, temperature=0, cuda_graphs=False)
    graphs: list = []
    stepper = _compiling_stepper(stage, graphs)
    made = []
    monkeypatch.setattr(generation, "StaticStepper", lambda *a, **k: made.append(stepper(*a, **k)) or made[-1])
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = generate(model, prompts, new, temperature=0, cuda_graphs=False)  # eager steps, compiled
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, want)
    assert len(graphs) == 1
    unit = model.config.units[stage]
    assert made[0].calls >= (new - 1 if unit == 1 else (new - 1) // unit), made[0].calls
    assert made[0].calls >= 2


@pytest.mark.parametrize("lens, due_steps", [((3, 7, 11), "one phase"), ((3, 6), "two phases")])
def test_upper_stage_steps_when_some_row_needs_it(lens, due_steps):
    """The host schedule (no device read): the global model steps at the bytes where some row
    starts a patch, so rows of one patch phase step it once per patch, as a single row does."""
    model = make()  # P = 4
    new = 13
    calls = []
    hook = model.g_transformer.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[1]))
    try:
        generate(model, prompts_of(lens), new, temperature=0)
    finally:
        hook.remove()
    want = sum(1 for s in range(1, new) if any((L + s) % 4 == 0 for L in lens))
    prefills = len({L for L in lens})  # one prefill pass per distinct prompt length
    assert len(calls) == prefills + want
    assert want == (3 if due_steps == "one phase" else 6)


def test_static_stepper_needs_its_scratch_slot():
    model = make()
    dec = generation.CachedDecoder(model, prompts_of((3,)), 4)
    dec.prefill()
    with pytest.raises(ValueError, match="spare=1"):
        StaticStepper(dec, None)


@pytest.mark.parametrize("kw, match", [(dict(decoder="fast"), "decoder must be one of"),
                                       (dict(check_every=0), "check_every"),
                                       (dict(check_every=2.0), "check_every"),
                                       (dict(cuda_graphs="yes"), "cuda_graphs")])
def test_bad_decoder_arguments_raise(kw, match):
    model = make()
    with pytest.raises(ValueError, match=match):
        model.generate([b"ab"], 3, **kw)
    with pytest.raises(ValueError, match=match):
        list(generate_stream(model, b"ab", 3, **kw))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["original", "three"])
def test_cuda_graphs_replay_the_eager_steps(name):
    """GPU tier: with graphs the bytes are the eager static decoder's and the cached decoder's,
    every step was captured (none fell back), and the capture time is reported."""
    model = model_of(name)
    prompts = prompts_of(RAGGED)
    info: dict = {}
    got = generate(model, prompts, 40, temperature=0, cuda_graphs=True, info=info)
    assert torch.equal(got, generate(model, prompts, 40, temperature=0, cuda_graphs=False))
    assert torch.equal(got, generate(model, prompts, 40, temperature=0, decoder="cached"))
    assert info["graphs"] and info["capture_s"] > 0
    assert all(n.endswith("CUDA graph") for n in info["graph_notes"]), info["graph_notes"]
    assert len(info["graph_notes"]) == model.config.n_stages
