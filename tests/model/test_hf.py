"""The optional Hugging Face adapter (megabyte.hf); skipped when `transformers` is not installed."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from megabyte.hf import ByteVocabLogitsProcessor, MegabyteForCausalLM, MegabyteHFConfig, MegabyteTokenizer  # noqa: E402

from .test_model import make  # noqa: E402


@pytest.fixture(scope="module")
def hf():
    mb = make()
    return mb, MegabyteForCausalLM.from_megabyte(mb).eval(), MegabyteTokenizer()


def test_readme_generate_matches_cached_decoding(hf):
    mb, model, tokenizer = hf
    inputs = tokenizer("Today is", return_tensors="pt")
    assert inputs["input_ids"].tolist() == [list(b"Today is")]
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert torch.equal(out[:, :8], inputs["input_ids"])
    assert torch.equal(out[:, 8:], mb.generate(b"Today is", 12, temperature=0, eos_id=mb.config.eos_id))
    assert isinstance(tokenizer.decode(out[0]), str)


def test_left_padded_batch_equals_ragged_prompts(hf):
    mb, model, tokenizer = hf
    batch = tokenizer(["Today is", "Hi", "é"], return_tensors="pt", padding=True)
    assert tokenizer.padding_side == "left" and (batch["input_ids"][1, :6] == mb.config.pad_id).all()
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(out[:, batch["input_ids"].shape[1]:],
                       mb.generate(["Today is", "Hi", "é"], 6, temperature=0, eos_id=mb.config.eos_id))


def test_forward_logits_are_next_byte_and_loss_is_shifted(hf):
    mb, model, _ = hf
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        own = mb(torch.cat([ids, ids[:, :1]], dim=1)).lm_logits
    torch.testing.assert_close(out.logits, own[:, 1:])
    manual = F.cross_entropy(own[:, 1:-1].reshape(-1, mb.config.V), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)


@pytest.fixture(scope="module")
def untrained_512():
    """The untrained V=512 model (initializer_range 0.3) whose unrestricted choices are often specials."""
    mb = make(V=512)
    return mb, MegabyteForCausalLM.from_megabyte(mb).eval(), MegabyteTokenizer()


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.95)])
def test_generate_returns_bytes_eos_or_pad_by_default(untrained_512, kw):
    mb, model, tokenizer = untrained_512
    batch = tokenizer(["Today is", "Hi"], return_tensors="pt", padding=True)
    T = batch["input_ids"].shape[1]
    torch.manual_seed(0)
    free = model.generate(**batch, max_new_tokens=6, vocab="all", **kw)[:, T:]
    assert (free >= 256).any()  # without the processor: special ids
    torch.manual_seed(0)
    out = model.generate(**batch, max_new_tokens=6, **kw)[:, T:]
    eos, pad = mb.config.eos_id, mb.config.pad_id
    for row in out.tolist():
        cut = row.index(eos) if eos in row else len(row)
        assert all(i < 256 for i in row[:cut]) and all(i == pad for i in row[cut + 1:]), row
    if not kw["do_sample"]:  # the processor is the mask of Megabyte.generate(vocab="bytes")
        assert torch.equal(out, mb.generate(["Today is", "Hi"], 6, temperature=0, eos_id=eos))
    with pytest.raises(ValueError, match="vocab"):
        model.generate(**batch, max_new_tokens=1, vocab="ascii")


def test_forward_logits_are_not_restricted(untrained_512):
    mb, model, _ = untrained_512
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        own = mb(torch.cat([ids, ids[:, :1]], dim=1)).lm_logits[:, 1:]
    assert torch.equal(logits, own) and torch.isfinite(logits).all()
    assert (logits.argmax(-1) >= 256).any()  # the restriction would have changed them
    processor = ByteVocabLogitsProcessor(mb.config.V, mb.config.eos_id)
    restricted = processor(ids, logits[:, -1])
    assert torch.equal(torch.isfinite(restricted[0]), (torch.arange(512) < 256) | (torch.arange(512) == 258))


def test_tokenizer_round_trip_and_specials():
    tok = MegabyteTokenizer()
    text = "héllo, wörld ✓"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (257, 258, 256)
    assert tok.decode(ids + [258], skip_special_tokens=True) == text
    assert tok.decode([0xFF, 104]) == "\ufffdh"  # invalid UTF-8 never raises


def test_save_and_load_pretrained(hf, tmp_path):
    mb, model, _ = hf
    model.save_pretrained(tmp_path)
    loaded = MegabyteForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.config, MegabyteHFConfig)
    assert loaded.config.to_megabyte_config() == mb.config
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
