"""Tokenizer training/loading, token shards and the memory-mapped dataset (trainer.data, trainer.tokenizer)."""

import hashlib
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from elastic.slicer.errors import ElasticError
from elastic.trainer.data import TokenDataset, build_token_shards, corpus_files, iter_texts, stdlib_corpus
from elastic.trainer.tokenizer import ByteTok, load_tokenizer, train_tokenizer

TEXTS = [
    "plain ASCII: def f(x):\n    return x + 1\r\n",
    "UTF-8: héllo wörld, naïve café, Ελληνικά, 日本語のテキスト, emoji 🙂🚀, combining e\u0301",
    "  leading spaces, \t tabs,\n\n\nblank lines and trailing spaces   ",
]


class FakeTok:
    """One id per character: ord(c) + offset. Exact control over ids and token counts."""

    def __init__(self, vocab_size=300, offset=0, eos_id=None):
        self.vocab_size, self.offset, self.eos_id, self.bos_id = vocab_size, offset, eos_id, None

    def encode(self, text):
        return [ord(c) + self.offset for c in text]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    info = train_tokenizer(stdlib_corpus(150_000), 400, out)
    return out, info


@pytest.fixture
def docs(tmp_path):
    """200 distinct short documents in a jsonl file."""
    texts = [f"doc {i}: " + "abcdefghij"[i % 10] * (5 + i % 17) for i in range(200)]
    return write_jsonl(tmp_path / "docs.jsonl", texts), texts


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_special_ids(tok_dir):
    out, info = tok_dir
    tok = load_tokenizer(out)
    assert (info.unk_id, info.bos_id, info.eos_id, info.pad_id) == (0, 1, 2, 3)
    assert tok.vocab_size == info.vocab_size == 400
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert max(ids) < 400 and min(ids) > 3
    assert len(tok.encode("return x + 1")) < len("return x + 1".encode())  # merges learned


def test_special_token_text_in_corpus_stays_text(tok_dir):
    tok = load_tokenizer(tok_dir[0])
    ids = tok.encode("a</s>b<s>")
    assert not set(ids) & {0, 1, 2, 3}
    assert tok.decode(ids) == "a</s>b<s>"


def test_transformers_loads_saved_tokenizer(tok_dir):
    from transformers import AutoTokenizer

    out, _ = tok_dir
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == "</s>"
    hf = AutoTokenizer.from_pretrained(out)
    tok = load_tokenizer(out)
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    for text in TEXTS:
        assert hf.encode(text) == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text


def test_byte_fallback_without_tokenizer_json(tmp_path):
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, ByteTok) and tok.vocab_size == 256 and tok.bos_id is None and tok.eos_id is None
    assert tok.encode("é") == [0xC3, 0xA9]
    assert all(tok.decode(tok.encode(t)) == t for t in TEXTS)


def test_tokenizer_refuses_tiny_vocab(tmp_path):
    with pytest.raises(ElasticError, match="below 260"):
        train_tokenizer(stdlib_corpus(50_000), 100, tmp_path)


# ---------------------------------------------------------------- corpus


def test_stdlib_corpus_is_bounded_sorted_and_stdlib_only():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_corpus(300_000)
    assert files == stdlib_corpus(300_000)
    assert sum(f.stat().st_size for f in files) <= 300_000 and len(files) > 5
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert not any("site-packages" in r or "/test/" in r for r in rel)
    big = stdlib_corpus(6_000_000)
    assert any("/" in f.relative_to(root).as_posix() for f in big)  # packages, not just top-level modules


def test_directory_walk_is_sorted_and_skips_other_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("zz")
    (tmp_path / "a.txt").write_text("aa")
    (tmp_path / "c.bin").write_bytes(b"\xff")
    for skipped in ("__pycache__", ".venv/lib/site-packages", "site-packages"):
        (tmp_path / skipped).mkdir(parents=True)
        (tmp_path / skipped / "x.py").write_text("no")
    write_jsonl(tmp_path / "b" / "y.jsonl", ["y1", "", "y2"])
    assert [p.relative_to(tmp_path).as_posix() for p in corpus_files(tmp_path)] == ["a.txt", "b/y.jsonl", "b/z.md"]
    assert list(iter_texts(tmp_path)) == ["aa", "y1", "y2", "zz"]


def test_missing_path_is_named(tmp_path):
    with pytest.raises(ElasticError, match="does not exist") as e:
        list(iter_texts(tmp_path / "nope"))
    assert "nope" in str(e.value)


def test_empty_corpus_is_named(tmp_path):
    with pytest.raises(ElasticError, match="no corpus files") as e:
        list(iter_texts(tmp_path))
    assert str(tmp_path) in str(e.value)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ElasticError, match="no non-empty document"):
        list(iter_texts(tmp_path))
    with pytest.raises(ElasticError, match="no non-empty document"):
        build_token_shards(tmp_path, FakeTok(), tmp_path / "out")


@pytest.mark.parametrize("line, why", [('{"txt": "x"}', 'no string "text"'), ("{not json", "not valid JSON"),
                                        ('["x"]', 'no string "text"')])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, why):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(ElasticError, match=why) as e:
        list(iter_texts(bad))
    assert f"{bad}:3" in str(e.value)
    with pytest.raises(ElasticError, match=why):
        build_token_shards(tmp_path, FakeTok(), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))  # atomic


def test_non_utf8_file_is_named(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ElasticError, match="not UTF-8") as e:
        list(iter_texts(tmp_path))
    assert "latin1.txt" in str(e.value)


# ---------------------------------------------------------------- shards


def read_split(shard_dir, meta, split):
    """Each shard of a split as a numpy array, read without TokenDataset."""
    return [np.fromfile(shard_dir / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]]


def test_shards_hold_every_document_once_split_by_document(tmp_path, docs):
    path, texts = docs
    tok = FakeTok(eos_id=299)
    meta = build_token_shards(path, tok, tmp_path / "sh", shard_tokens=500, val_fraction=0.3, seed=1)
    assert meta["dtype"] == "uint16" and meta["eos_after_each_document"]
    out = {}
    for split in ("train", "val"):
        shards = read_split(tmp_path / "sh", meta, split)
        assert [len(s) for s in shards] == [s["tokens"] for s in meta["splits"][split]["shards"]]
        assert all(len(s) == 500 for s in shards[:-1]) and 0 < len(shards[-1]) <= 500
        stream = np.concatenate(shards)
        assert len(stream) == meta["splits"][split]["tokens"]
        # the oracle: decode the stream by hand and cut it at eos
        out[split] = "".join(chr(i) if i != 299 else "\0" for i in stream).split("\0")[:-1]
    train, val = out["train"], out["val"]
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(texts)  # every document exactly once, whole
    assert [t for t in texts if t in set(val)] == val  # order kept inside a split
    assert 30 <= len(val) <= 90  # ~0.3 of 200
    assert meta["splits"]["val"]["documents"] == len(val)
    again = build_token_shards(path, tok, tmp_path / "sh2", shard_tokens=500, val_fraction=0.3, seed=1)
    assert again["splits"] == meta["splits"]
    other = build_token_shards(path, tok, tmp_path / "sh3", shard_tokens=500, val_fraction=0.3, seed=2)
    assert other["splits"]["val"]["tokens"] != meta["splits"]["val"]["tokens"]


def test_meta_records_sources_and_tokenizer(tmp_path, docs, tok_dir):
    path, texts = docs
    tok = load_tokenizer(tok_dir[0])
    meta = build_token_shards(path, tok, tmp_path / "sh", val_fraction=0.1)
    assert meta == json.loads((tmp_path / "sh" / "meta.json").read_text())
    assert meta["sources"] == [{"path": str(path.resolve()), "bytes": path.stat().st_size,
                                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]
    assert meta["tokenizer"]["vocab_size"] == 400 and meta["tokenizer"]["eos_id"] == 2
    assert meta["tokenizer"]["sha256"] == hashlib.sha256((tok_dir[0] / "tokenizer.json").read_bytes()).hexdigest()
    total = sum(len(tok.encode(t)) + 1 for t in texts)
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == total


def test_out_dir_is_not_clobbered_unless_asked(tmp_path, docs):
    path, _ = docs
    build_token_shards(path, FakeTok(), tmp_path / "sh", val_fraction=0)
    with pytest.raises(ElasticError, match="already exists"):
        build_token_shards(path, FakeTok(), tmp_path / "sh")
    meta = build_token_shards(path, FakeTok(eos_id=299), tmp_path / "sh", overwrite=True, val_fraction=0)
    assert meta["eos_after_each_document"] and sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "sh"]


def test_uint32_shards_for_large_vocab(tmp_path, docs):
    path, texts = docs
    tok = FakeTok(vocab_size=70_000, offset=65_500)
    meta = build_token_shards(path, tok, tmp_path / "sh", val_fraction=0)
    assert meta["dtype"] == "uint32"
    f = tmp_path / "sh" / "train_000.bin"
    assert f.stat().st_size == 4 * meta["splits"]["train"]["tokens"]
    ds = TokenDataset(tmp_path / "sh")
    x, y = next(ds.iter_eval(1, 20))
    assert x[0].tolist() == tok.encode("".join(texts))[:20] and int(x.max()) > 65_535


def test_ids_outside_the_vocabulary_are_refused(tmp_path, docs):
    with pytest.raises(ElasticError, match="outside its vocabulary of 100") as e:
        build_token_shards(docs[0], FakeTok(vocab_size=100), tmp_path / "sh")
    assert "docs.jsonl" in str(e.value)


def test_too_few_documents_for_validation(tmp_path):
    write_jsonl(tmp_path / "one.jsonl", ["only one"])
    with pytest.raises(ElasticError, match="none of the 1 document.s. went to validation"):
        build_token_shards(tmp_path, FakeTok(), tmp_path / "sh", val_fraction=0.01, seed=0)


# ---------------------------------------------------------------- dataset


@pytest.fixture
def shards(tmp_path, docs, tok_dir):
    tok = load_tokenizer(tok_dir[0])
    build_token_shards(docs[0], tok, tmp_path / "sh", shard_tokens=300, val_fraction=0.2)
    meta = json.loads((tmp_path / "sh" / "meta.json").read_text())
    expected = {}
    for split in ("train", "val"):  # the oracle: tokens of the source text, cut into shards
        members = split_texts(tmp_path / "sh", meta, split, tok)
        texts = [t for t in docs[1] if t in members]
        stream = np.array([i for t in texts for i in tok.encode(t) + [2]], dtype=np.int64)
        expected[split] = [stream[k:k + 300] for k in range(0, len(stream), 300)]
    return tmp_path / "sh", expected


def split_texts(shard_dir, meta, split, tok):
    stream = np.concatenate(read_split(shard_dir, meta, split)).tolist()
    return set(tok.decode(stream).split("</s>"))


def find_window(shards, window):
    """(shard, offset) where ``window`` lies entirely inside one expected shard, else None."""
    for s, arr in enumerate(shards):
        for o in np.flatnonzero(arr[: len(arr) - len(window) + 1] == window[0]):
            if np.array_equal(arr[o:o + len(window)], window):
                return s, int(o)
    return None


def test_batches_are_shifted_windows_of_the_source(shards):
    shard_dir, expected = shards
    ds = TokenDataset(shard_dir, "train")
    assert len(ds) == sum(len(s) for s in expected["train"]) and len(expected["train"]) > 3
    x, y = ds.batch(torch.Generator().manual_seed(0), batch_size=64, seq_len=40)
    assert x.shape == y.shape == (64, 40) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        assert find_window(expected["train"], np.append(row_x, row_y[-1])) is not None


def test_batch_is_deterministic_given_generator_state(shards):
    ds = TokenDataset(shards[0])
    g = torch.Generator().manual_seed(123)
    state = g.get_state()
    first, second = ds.batch(g, 4, 16), ds.batch(g, 4, 16)
    assert not torch.equal(first[0], second[0])
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(ds.batch(g2, 4, 16)[0], first[0]) and torch.equal(ds.batch(g2, 4, 16)[1], second[1])


def test_window_starts_are_uniform_over_shards(tmp_path):
    # token id = 256 + position in the stream, so a window's first id says where it starts
    write_jsonl(tmp_path / "c.jsonl", ["".join(chr(256 + i) for i in range(2000))])
    build_token_shards(tmp_path / "c.jsonl", FakeTok(vocab_size=3000), tmp_path / "sh", shard_tokens=700,
                       val_fraction=0)
    x, y = TokenDataset(tmp_path / "sh").batch(torch.Generator().manual_seed(0), 5000, 10)
    pos = x[:, 0].numpy() - 256
    assert np.array_equal(y.numpy() - 256, pos[:, None] + np.arange(1, 11))  # contiguous, shifted by one
    shard, offset = pos // 700, pos % 700
    starts = np.array([690, 690, 590])  # shards of 700, 700, 600 tokens; a window holds 11
    assert (offset < starts[shard]).all()  # no window crosses a shard boundary
    share = np.bincount(shard, minlength=3) / len(pos)
    assert np.abs(share - starts / starts.sum()).max() < 0.03
    assert len(np.unique(pos)) > 0.85 * starts.sum()  # ~92% of the 1970 starts hit by 5000 draws
    assert offset[shard == 2].max() == 589


def test_eval_windows_are_fixed_and_consecutive(shards):
    shard_dir, expected = shards
    ds = TokenDataset(shard_dir, "val")
    batches = list(ds.iter_eval(batch_size=3, seq_len=50))
    assert batches and all(torch.equal(a[0], b[0]) for a, b in zip(batches, ds.iter_eval(3, 50)))
    first = expected["val"][0]
    x, y = batches[0]
    assert x[0].tolist() == first[:50].tolist() and y[0].tolist() == first[1:51].tolist()
    assert x[1].tolist() == first[50:100].tolist()
    windows = sum(len(b[0]) for b in batches)
    assert windows == sum((len(s) - 1) // 50 for s in expected["val"])
    assert len(list(ds.iter_eval(3, 50, max_batches=1))) == 1


def test_dataset_errors(tmp_path, shards):
    with pytest.raises(ElasticError, match="no meta.json"):
        TokenDataset(tmp_path)
    with pytest.raises(ElasticError, match="unknown split 'test'"):
        TokenDataset(shards[0], "test")
    with pytest.raises(ElasticError, match="seq_len"):
        TokenDataset(shards[0]).batch(torch.Generator(), 1, 10_000)
    shard = shards[0] / "train_000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ElasticError, match="rebuild the shards") as e:
        TokenDataset(shards[0])
    assert "train_000.bin" in str(e.value)
