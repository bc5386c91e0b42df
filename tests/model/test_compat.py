"""Equivalence with the original implementation (github shjwudp/megabyte) on stored weights.

The fixtures were written by running the original code (tests/fixtures/README.md says how);
its code is not part of this repository.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from megabyte import Megabyte, MegabyteConfig
from megabyte.compat import config_from_original, from_original, map_original_key

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")


def load_fixture(variant):
    name = {"megabyte": "original_megabyte", "in_action": "original_in_action"}[variant]
    data = load_file(os.path.join(FIXTURES, f"{name}.safetensors"))
    state = {k[len("model."):]: v.float() for k, v in data.items() if k.startswith("model.")}
    with open(os.path.join(FIXTURES, "original_config.json")) as f:
        cfg = json.load(f)
    return state, cfg, data


@pytest.mark.parametrize("variant", ["megabyte", "in_action"])
def test_from_original_gives_the_original_logits_and_loss(variant):
    state, cfg, data = load_fixture(variant)
    model = from_original(state, cfg, variant=variant, backend="reference").eval()
    ids = data["input_ids"]
    assert (ids == cfg["pad_id"]).any(), "the fixture exercises ignore_index"
    with torch.no_grad():
        out = model(ids, return_loss=True)
    torch.testing.assert_close(out.lm_logits, data["expected_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss.reshape(1), data["expected_loss"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["megabyte", "in_action"])
def test_every_original_key_is_used(variant):
    state, cfg, _ = load_fixture(variant)
    model = Megabyte(config_from_original(cfg, variant))
    assert {map_original_key(k) for k in state} == set(model.state_dict())


def test_from_original_accepts_the_original_namedtuple():
    from collections import namedtuple

    state, cfg, _ = load_fixture("megabyte")
    fields = ["V", "P", "D_G", "D_L", "T_MAX", "g_nheads", "g_nlayers", "l_nheads", "l_nlayers",
              "initializer_range", "pad_id", "eos_id"]
    Original = namedtuple("MegabyteConfig", fields)
    model = from_original(state, Original(**{f: cfg[f] for f in fields}))
    assert isinstance(model.config, MegabyteConfig) and model.config.D_G == cfg["D_G"]


def test_from_original_rejects_the_wrong_variant():
    state, cfg, _ = load_fixture("in_action")
    with pytest.raises(ValueError, match="does not match variant='megabyte'"):
        from_original(state, cfg, variant="megabyte")
