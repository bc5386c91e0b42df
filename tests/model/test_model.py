"""Tier-1 tests of the reference model: shapes, causality, padding, loss, errors, checkpoints."""
import math

import pytest
import torch
import torch.nn.functional as F

from megabyte import Megabyte, MegabyteConfig

TINY = dict(V=264, P=4, D_G=8, D_L=8, T_MAX=32, g_nheads=2, g_nlayers=2, l_nheads=2, l_nlayers=1,
            initializer_range=0.3, pad_id=257, eos_id=258)

# every config option that changes the math, each checked for causality
VARIANTS = {
    "original": {},
    "in_action": dict(variant="in_action"),
    "alibi": dict(positions="alibi"),
    "no_positions": dict(positions="none"),
    "trainable_pad": dict(pad="trainable"),
    "gqa": dict(g_nheads=4, g_kv_heads=2, l_kv_heads=2),
    "full_heads": dict(g_kv_heads=2, l_kv_heads=2),
    "tied_relu_norm": dict(tie_head=True, activation="relu", final_norm=True),
    "P1": dict(P=1, D_G=16),
    "P3": dict(P=3, g_nheads=3, T_MAX=33),  # learned positions: T_MAX a multiple of P
    "in_action_trainable_pad": dict(variant="in_action", pad="trainable"),
}


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return Megabyte(MegabyteConfig(**{**TINY, **kw})).eval()


def test_readme_example_runs_unchanged():
    V, P, D_G, D_L, T, B = 512, 4, 512, 128, 64, 2
    config = MegabyteConfig(V=V, P=P, D_G=D_G, D_L=D_L, T_MAX=1024, initializer_range=0.02, g_nlayers=4,
                            g_nheads=32, l_nlayers=2, l_nheads=2, pad_id=257, eos_id=258)
    megabyte = Megabyte(config)
    input_ids = torch.randint(0, 255, (B, T))
    out = megabyte(input_ids, return_loss=True)
    out.loss.backward()
    assert out.lm_logits.shape == (B, T, V)
    assert out.loss.dtype == torch.float32 and math.isfinite(out.loss.item())
    # freshly initialised: close to the uniform distribution's loss
    assert abs(out.loss.item() - math.log(V)) < 0.5
    assert megabyte.g_embedder.weight.grad is not None


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causality(name):
    """Logits at byte t depend only on bytes < t: perturbing bytes >= t leaves logits <= t unchanged."""
    model = make(**VARIANTS[name])
    T = 14
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, T), generator=g)
    with torch.no_grad():
        base = model(ids).lm_logits
        for t in range(T):
            other = ids.clone()
            other[:, t:] = torch.randint(0, 256, (2, T - t), generator=g)
            other[:, t] = (ids[:, t] + 1) % 256  # byte t surely changes
            out = model(other).lm_logits
            assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"position <= {t} saw a later byte"
            if t + 1 < T:  # and the model is not trivially constant: later logits do change
                assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])


@pytest.mark.parametrize("name", ["original", "in_action", "trainable_pad", "P3"])
def test_length_not_multiple_of_patch(name):
    model = make(**VARIANTS[name])
    P = model.config.P
    ids = torch.randint(0, 256, (3, 4 * P + 1))
    with torch.no_grad():
        short = model(ids[:, : 3 * P + 1]).lm_logits
        padded = model(F.pad(ids[:, : 3 * P + 1], (0, P - 1), value=model.config.pad_id)).lm_logits
        longer = model(ids).lm_logits
    assert short.shape == (3, 3 * P + 1, model.config.V)
    # internal right-padding is the same computation as padding by hand
    assert torch.equal(short, padded[:, : 3 * P + 1])
    torch.testing.assert_close(short, longer[:, : 3 * P + 1], atol=1e-5, rtol=1e-5)


def test_single_byte_and_batch_one():
    model = make()
    out = model(torch.tensor([[65]]), return_loss=True)
    assert out.lm_logits.shape == (1, 1, 264) and math.isfinite(out.loss.item())


def test_loss_ignores_pad_and_matches_cross_entropy():
    model = make()
    ids = torch.randint(0, 256, (2, 12))
    ids[0, 3] = ids[1, 7] = ids[1, 11] = model.config.pad_id
    out = model(ids, return_loss=True, return_metrics=True)
    keep = ids != model.config.pad_id
    logp = out.lm_logits.float().log_softmax(-1)
    manual = -logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)[keep].mean()
    torch.testing.assert_close(out.loss, manual)
    torch.testing.assert_close(out.metrics["bits_per_byte"], manual.detach() / math.log(2))
    # changing a pad target's logit row changes nothing: its targets carry no gradient
    out.loss.backward()


def test_bad_inputs_raise_clear_errors():
    model = make()
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 264\)"):
        model(torch.tensor([[1, 2, 300]]))
    with pytest.raises(ValueError, match=r"ids must lie"):
        model(torch.tensor([[1, -2, 3]]))
    with pytest.raises(ValueError, match="exceeds T_MAX=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 8))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.zeros(8, dtype=torch.long))


def test_alibi_and_none_positions_accept_sequences_past_t_max():
    model = make(positions="alibi")
    assert model(torch.randint(0, 256, (1, 45))).lm_logits.shape == (1, 45, 264)


@pytest.mark.parametrize("kw, match", [
    (dict(P=0), "P must be"),
    (dict(g_nheads=3), "divisible by g_nheads"),
    (dict(D_L=10, l_nheads=4), "divisible by l_nheads"),
    (dict(T_MAX=2, P=4), "T_MAX=2 must be at least"),
    (dict(T_MAX=30, P=4), "T_MAX=30 must be a multiple of the patch size"),
    (dict(pad_id=300), "pad_id must lie"),
    (dict(g_kv_heads=3, g_nheads=2), "multiple of g_kv_heads"),
    (dict(positions="rope"), "positions must be one of"),
    (dict(variant="in_action", tie_head=True), "tie_head"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        MegabyteConfig(**{**TINY, **kw})


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        Megabyte(MegabyteConfig(**TINY), backend="cuda")


@pytest.mark.parametrize("name", ["original", "in_action", "tied_relu_norm", "trainable_pad"])
def test_save_load_round_trip(tmp_path, name):
    model = make(**VARIANTS[name])
    ids = torch.randint(0, 256, (2, 9))
    model.save_pretrained(tmp_path)
    loaded = Megabyte.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(ids).lm_logits, model(ids).lm_logits)
    if model.config.tie_head:
        assert loaded.to_logits.weight is loaded.l_embedder.weight


def test_corrupted_checkpoint_gives_clear_error(tmp_path):
    make().save_pretrained(tmp_path)
    w = tmp_path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot load weights"):
        Megabyte.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="config.json is missing"):
        Megabyte.from_pretrained(tmp_path / "nope")


def test_dropout_only_in_training():
    model = make(dropout=0.5)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        a, b = model(ids).lm_logits, model(ids).lm_logits
        assert torch.equal(a, b)
        model.train()
        assert not torch.equal(model(ids).lm_logits, a)


def test_activation_checkpointing_gives_same_gradients():
    model = make().train()
    ids = torch.randint(0, 256, (2, 12))
    model(ids, return_loss=True).loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_checkpointing(True, True)
    model(ids, return_loss=True).loss.backward()
    for r, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, r)
