"""N-stage MEGABYTE (issue 14, DESIGN.md §2 "N stages"): config forms and validation, causality
for 3 and 4 stages on every backend, padding, Triton against the reference, cached generation
against full recomputation, the two-stage equivalence, checkpoints."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from megabyte import Megabyte, MegabyteConfig
from megabyte.generation import generate, generate_uncached
from tests._device import DEVICE, TRITON_RUNS

BASE = dict(V=264, initializer_range=0.3, pad_id=257, eos_id=258)
# units (6, 2, 1) and (8, 4, 2, 1); every width divisible by its heads, kv heads per stage
THREE = dict(patch_sizes=(3, 2), dims=(4, 6, 8), nlayers=(1, 1, 1), nheads=(2, 2, 2), kv_heads=(1, 2, 1), T_MAX=36)
FOUR = dict(patch_sizes=(2, 2, 2), dims=(4, 4, 6, 8), nlayers=(1, 1, 1, 1), nheads=(2, 1, 2, 2), T_MAX=64)
# head dim 16 in every stage: the Triton attention kernels' smallest
TRITON_THREE = dict(patch_sizes=(2, 2), dims=(8, 8, 16), nlayers=(1, 1, 1), nheads=(2, 1, 1), T_MAX=16)
TRITON_FOUR = dict(patch_sizes=(2, 2, 2), dims=(4, 4, 8, 16), nlayers=(1, 1, 1, 1), nheads=(2, 2, 1, 1), T_MAX=16)

STAGES = {
    "three": THREE,
    "four": FOUR,
    "three_alibi_trainable_pad": dict(THREE, positions="alibi", pad="trainable"),
    "four_mixed_options": dict(FOUR, positions=("learned", "alibi", "none", "alibi"),
                               pad=("trainable", "pad_id", "trainable", "trainable"), kv_heads=(2, 1, 1, 2),
                               tie_head=True, final_norm=True),
}


def make(overrides: dict, backend: str = "reference", seed: int = 0, device="cpu") -> Megabyte:
    torch.manual_seed(seed)
    return Megabyte(MegabyteConfig(**BASE, **overrides), backend=backend).to(device).eval()


def _backends():
    out = ["reference", pytest.param("native", marks=pytest.mark.native)]
    out.append(pytest.param("triton", marks=pytest.mark.skipif(not TRITON_RUNS, reason="no Triton path here")))
    return out


def assert_causal(model: Megabyte, T: int, device="cpu", B=2):
    """Logits at byte t depend only on bytes < t, and do depend on them."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (B, T), generator=g).to(device)
    with torch.no_grad():
        base = model(ids).lm_logits
        for t in range(T):
            other = ids.clone()
            other[:, t:] = torch.randint(0, 256, (B, T - t), generator=g).to(device)
            other[:, t] = (ids[:, t] + 1) % 256
            out = model(other).lm_logits
            assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"position <= {t} saw a later byte"
            if t + 1 < T:
                assert not torch.allclose(out[:, t + 1:], base[:, t + 1:]), f"bytes < {t + 1} change nothing"


# ---------------------------------------------------------------------------- causality
@pytest.mark.parametrize("name", list(STAGES))
def test_causality_reference(name):
    assert_causal(make(STAGES[name]), T=14)  # 14: not a multiple of the top unit


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("stages", ["three", "four"])
def test_causality_every_backend(backend, stages):
    if backend == "triton":  # tiny shapes: the interpreter runs every kernel of every stage
        cfg, T, device = (TRITON_THREE if stages == "three" else TRITON_FOUR), 11, DEVICE
    else:
        cfg, T, device = STAGES[stages], 13, "cpu"
    assert_causal(make(cfg, backend, device=device), T=T, device=device, B=1 if backend == "triton" else 2)


# ---------------------------------------------------------------------------- padding
@pytest.mark.parametrize("name", ["three", "four", "three_alibi_trainable_pad"])
def test_length_not_multiple_of_patch_product(name):
    model = make(STAGES[name])
    u0 = model.config.P
    assert u0 == model.config.units[0] > max(model.config.patch_sizes)
    T = 2 * u0 + 3
    ids = torch.randint(0, 256, (3, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(ids).lm_logits
        padded = model(F.pad(ids, (0, 3 * u0 - T), value=model.config.pad_id)).lm_logits
    assert out.shape == (3, T, 264)
    assert torch.equal(out, padded[:, :T])  # internal right-padding is padding by hand


# ---------------------------------------------------------------------------- Triton vs reference
@pytest.mark.skipif(not TRITON_RUNS, reason="the Triton path needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("cfg", [TRITON_THREE, dict(TRITON_FOUR, pad="trainable", positions="alibi")],
                         ids=["three", "four_trainable_alibi"])
def test_triton_matches_reference_logits_and_grads(cfg):
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    outs = []
    for backend in ("reference", "triton"):
        model = make(cfg, backend, device=DEVICE).train()
        out = model(ids, return_loss=True)
        out.loss.backward()
        outs.append((out.lm_logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_g), (got, got_g) = outs
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert set(got_g) == set(ref_g) and any(n.startswith("m_stages.") for n in got_g)
    for n in ref_g:
        assert got_g[n] is not None, n
        torch.testing.assert_close(got_g[n], ref_g[n], atol=1e-4, rtol=1e-3, msg=lambda m: f"{n}: {m}")


@pytest.mark.native
def test_native_matches_reference_logits_and_grads():
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
    outs = []
    for backend in ("reference", "native"):
        model = make(STAGES["four_mixed_options"], backend).train()
        out = model(ids, return_loss=True)
        out.loss.backward()
        outs.append((out.lm_logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    for n, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][n], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


# ---------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", ["three", "four", "four_mixed_options"])
def test_cached_generation_equals_full_recompute_ragged(name):
    """Greedy decoding, a ragged batch (empty, shorter than a unit, across unit and patch borders):
    the same ids and the same next-byte distributions as full recomputation."""
    model = make(STAGES[name])
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (0, 5, 13, 7)]
    ids, logits = generate(model, prompts, 13, temperature=0, vocab="all", return_logits=True)
    ref_ids, ref_logits = generate_uncached(model, prompts, 13, temperature=0, vocab="all", return_logits=True)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logits.softmax(-1), ref_logits.softmax(-1), atol=1e-4, rtol=0)
    # each row alone decodes the same as in the batch
    for i, p in enumerate(prompts[:2]):
        assert torch.equal(model.generate(p, 13, temperature=0, vocab="all"), ids[i:i + 1])


def test_each_stage_steps_once_per_completed_unit():
    model = make(THREE)  # units (6, 2, 1)
    L, new = 7, 12
    calls = {name: [] for name in ("g", "m", "l")}
    mods = {"g": model.g_transformer, "m": model.m_stages[0].transformer, "l": model.l_transformer}
    hooks = [m.register_forward_hook(lambda mod, a, o, k=k: calls[k].append(a[0].shape[1])) for k, m in mods.items()]
    try:
        model.generate(torch.randint(0, 256, (1, L)), new, temperature=0)
    finally:
        for h in hooks:
            h.remove()
    new_bytes = range(L + 1, L + new)  # the bytes predicted after the prefill
    assert calls["g"] == [L // 6 + 1] + [1] * sum(t % 6 == 0 for t in new_bytes)
    assert calls["m"] == [(L % 6) // 2 + 1] + [1] * sum(t % 2 == 0 for t in new_bytes)
    assert calls["l"] == [L % 2 + 1] + [1] * (new - 1)


# ---------------------------------------------------------------------------- the two forms
CLASSIC = dict(V=264, P=4, D_G=8, D_L=16, T_MAX=32, g_nheads=2, g_nlayers=2, l_nheads=2, l_nlayers=1,
               initializer_range=0.3, pad_id=257, eos_id=258, g_kv_heads=2, l_kv_heads=1)
TUPLES = dict(V=264, patch_sizes=(4,), dims=(8, 16), nlayers=(2, 1), nheads=(2, 2), kv_heads=(2, 1), T_MAX=32,
              initializer_range=0.3, pad_id=257, eos_id=258)


@pytest.mark.parametrize("opts", [{}, dict(pad="trainable", positions="alibi"), dict(variant="in_action")])
def test_two_stage_tuple_form_is_the_classic_model(opts, tmp_path):
    a, b = MegabyteConfig(**CLASSIC, **opts), MegabyteConfig(**TUPLES, **opts)
    assert a == b and a.to_dict() == b.to_dict()
    assert not set(a.to_dict()) & {"patch_sizes", "dims", "nlayers", "nheads", "kv_heads"}  # config.json as before
    torch.manual_seed(0)
    ma = Megabyte(a, backend="reference").eval()
    torch.manual_seed(0)
    mb = Megabyte(b, backend="reference").eval()
    assert list(ma.state_dict()) == list(mb.state_dict())
    assert not any(k.startswith("m_stages") for k in ma.state_dict())
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        assert torch.equal(ma(ids).lm_logits, mb(ids).lm_logits)
    ma.save_pretrained(str(tmp_path / "a"))
    mb.save_pretrained(str(tmp_path / "b"))
    assert (tmp_path / "a" / "config.json").read_text() == (tmp_path / "b" / "config.json").read_text()


def test_classic_fields_are_filled_for_more_stages():
    cfg = MegabyteConfig(**BASE, **THREE)
    assert cfg.n_stages == 3 and cfg.units == (6, 2, 1)
    assert (cfg.P, cfg.D_G, cfg.D_L, cfg.g_nheads, cfg.l_nheads, cfg.g_kv_heads, cfg.l_kv_heads) == (6, 4, 8, 2, 2,
                                                                                                      1, 1)
    d = cfg.to_dict()
    assert d["patch_sizes"] == [3, 2] and "P" not in d and "D_G" not in d
    assert MegabyteConfig.from_dict(json.loads(json.dumps(d))) == cfg
    # the classic fields agreeing with the tuples are accepted
    assert MegabyteConfig(**BASE, **THREE, P=6, D_G=4, l_nheads=2) == cfg


def test_new_fields_are_keyword_only():
    with pytest.raises(TypeError):
        MegabyteConfig(*range(24), (2, 2))  # noqa: the 25th positional argument does not exist


def test_save_load_three_stages(tmp_path):
    model = make(STAGES["three_alibi_trainable_pad"])
    model.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["patch_sizes"] == [3, 2] and cfg["dims"] == [4, 6, 8]
    loaded = Megabyte.from_pretrained(str(tmp_path), backend="reference").eval()
    assert loaded.config == model.config
    ids = torch.randint(0, 256, (2, 15))
    with torch.no_grad():
        assert torch.equal(loaded(ids).lm_logits, model(ids).lm_logits)


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kw, match", [
    (dict(P=8), r"P=8 disagrees with patch_sizes=\(3, 2\)"),
    (dict(D_G=5), r"D_G=5 disagrees with dims\[0\]=4"),
    (dict(l_nlayers=3), r"l_nlayers=3 disagrees with nlayers\[-1\]=1"),
    (dict(g_kv_heads=2), r"g_kv_heads=2 disagrees with kv_heads\[0\]=1"),
    (dict(dims=(4, 6)), "dims must have 3 entries"),
    (dict(nheads=(2, 2)), "nheads must have 3 entries"),
    (dict(dims=None), "dims must be given"),
    (dict(patch_sizes=(3, 0)), "patch_sizes entries must be >= 1"),
    (dict(patch_sizes=(3, 2.0)), "patch_sizes must be a tuple of ints"),
    (dict(patch_sizes=()), "patch_sizes must have at least one entry"),
    (dict(dims=(4, 0, 8)), "dims entries must be >= 1"),
    (dict(nlayers=(1, -1, 1)), "nlayers entries must be >= 0"),
    (dict(kv_heads=(1, 4, 1)), r"nheads\[1\]=2 must be a multiple of kv_heads\[1\]=4"),
    (dict(nheads=(2, 5, 2)), r"divisible by nheads\[1\]=5"),
    (dict(T_MAX=40), "T_MAX=40 must be a multiple of the patch size product of patch_sizes"),
    (dict(variant="in_action"), "in_action' is defined for two stages only"),
    (dict(positions=("learned", "learned", "none")), "'learned' is defined for stage 0 only"),
    (dict(positions=("alibi", "none")), "positions must be one of .* or a tuple of 3"),
    (dict(pad=("trainable", "zero", "pad_id")), "pad entries must be one of"),
])
def test_bad_stage_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        MegabyteConfig(**BASE, **{**THREE, **kw})


def test_two_stage_forms_disagreeing_raise():
    with pytest.raises(ValueError, match=r"D_L=32 disagrees with dims\[-1\]=16"):
        MegabyteConfig(**{**TUPLES, "D_L": 32})


# ---------------------------------------------------------------------------- the command line
def test_cli_trains_three_stages_and_eval_generate_read_the_checkpoint(tmp_path, capsys):
    from megabyte.cli import main
    from tests.model.test_train import TINY_MODEL, _write_corpus

    data = _write_corpus(tmp_path / "corpus", n_files=4)
    out = tmp_path / "ckpt"
    args = list(TINY_MODEL)
    for flag in ("--d-global", "--d-local", "--g-layers", "--l-layers", "--g-heads", "--l-heads"):
        i = args.index(flag)
        del args[i:i + 2]
    args[args.index("--steps") + 1] = "4"
    args[args.index("--eval-every") + 1] = "0"
    rc = main(["train", "--data", str(data), "--out", str(out), *args,
               "--patch-sizes", "4,2", "--dims", "4,8,16", "--layers", "1,1,1", "--heads", "2,2,2"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "3 stages, patch sizes 4,2, dims 4,8,16" in cap.out + cap.err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["patch_sizes"] == [4, 2] and cfg["dims"] == [4, 8, 16] and cfg["nheads"] == [2, 2, 2]
    assert main(["eval", "--checkpoint", str(out), "--threads", "1", "--backend", "reference"]) == 0
    assert "bpb" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(out), "--prompt", "def ", "--max-bytes", "9", "--seed", "0",
                 "--threads", "1"]) == 0


def test_cli_stage_flags_must_agree_with_the_classic_ones(tmp_path, capsys):
    from megabyte.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path), "--patch-sizes", "4,2", "--dims", "4,8,16", "--layers", "1,1,1",
              "--heads", "2,2,2", "--patch-size", "4"])
    assert "P=4 disagrees with patch_sizes=(4, 2)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path), "--patch-sizes", "4,x"])
    assert "comma-separated integers" in capsys.readouterr().err


def test_loss_chunk_and_checkpointing_match_the_plain_step():
    ids = torch.randint(0, 256, (2, 15), generator=torch.Generator().manual_seed(4))
    grads = []
    for chunk, ckpt in ((None, False), (7, False), (None, True)):
        model = make(STAGES["three_alibi_trainable_pad"]).train()
        model.set_checkpointing(ckpt, ckpt)
        assert model.m_stages[0].transformer.checkpointing == ckpt
        out = model(ids, return_loss=True, loss_chunk=chunk)
        out.loss.backward()
        grads.append((out.loss.detach(), [p.grad for p in model.parameters()]))
    for loss, g in grads[1:]:
        torch.testing.assert_close(loss, grads[0][0])
        for a, b in zip(g, grads[0][1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
