import numpy as np

from fedtune.data.sources import Split
from fedtune.modeling import load_tokenizer
from fedtune.training import encode

TEXTS = ("federated learning of adapters " * 20, "a short post", "ünïcode and\nnewlines \ud800"[:-1], "")


def _split(texts=TEXTS):
    return Split(tuple(texts), np.arange(len(texts), dtype=np.int64) % 3, ("g",) * len(texts))


def test_token_cache_hit_equals_tokenizing_again(tmp_path, monkeypatch):
    tok = load_tokenizer("minilm")
    monkeypatch.delenv("FEDTUNE_TOKEN_CACHE", raising=False)
    ref = encode(tok, _split(), 16)
    monkeypatch.setenv("FEDTUNE_TOKEN_CACHE", str(tmp_path))
    miss = encode(tok, _split(), 16)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    hit = encode(tok, _split(), 16)
    for got in (miss, hit):
        assert [x.tolist() for x in got.ids] == [x.tolist() for x in ref.ids]
        assert all(x.dtype == np.int64 for x in got.ids) and np.array_equal(got.labels, ref.labels)
    assert len(ref.ids[0]) == 16
    encode(tok, _split(), 8)  # another max-length, other texts: other entries
    encode(tok, _split(TEXTS[:2]), 16)
    assert len(list(tmp_path.glob("*.npz"))) == 3


def test_token_cache_damaged_entry_is_rebuilt(tmp_path, monkeypatch):
    tok = load_tokenizer("minilm")
    monkeypatch.setenv("FEDTUNE_TOKEN_CACHE", str(tmp_path))
    first = encode(tok, _split(), 16)
    (entry,) = tmp_path.glob("*.npz")
    entry.write_bytes(b"not an npz")
    again = encode(tok, _split(), 16)
    assert [x.tolist() for x in again.ids] == [x.tolist() for x in first.ids]
    assert np.load(entry)["lengths"].tolist() == [len(x) for x in first.ids]
