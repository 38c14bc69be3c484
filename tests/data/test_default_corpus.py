import inspect
import json

import pytest

from zoo.data import corpus, default_corpus, default_corpus_dataset

SMALL = 10  # files per source: a corpus of ~85 documents, built in about a second


@pytest.fixture(autouse=True)
def _fresh_memo():
    corpus._load_or_build.cache_clear()
    yield
    corpus._load_or_build.cache_clear()


def _splits(cache_dir, max_files=SMALL):
    return {split: default_corpus(split, max_files=max_files, cache_dir=cache_dir) for split in corpus.SPLITS}


def test_deterministic_and_disjoint(tmp_path):
    first = _splits(tmp_path / "a")
    corpus._load_or_build.cache_clear()
    second = _splits(tmp_path / "b")
    assert first == second
    sets = {name: set(docs) for name, docs in first.items()}
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    everything = corpus.build_documents(max_files=SMALL, progress=False)
    assert sorted(d for docs in first.values() for d in docs) == sorted(everything)
    assert len(everything) == len(set(everything))
    assert all(len(d) >= corpus.MIN_DOCUMENT_CHARS for d in everything)
    assert all(first[corpus.split_of(d)].count(d) == 1 for d in everything)


def test_cache_reused_and_written_atomically(tmp_path, monkeypatch):
    built = _splits(tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"
    assert json.loads(files[0].read_text())["key"] == corpus.corpus_cache_key(SMALL)

    corpus._load_or_build.cache_clear()

    def no_build(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(corpus, "build_documents", no_build)
    assert _splits(tmp_path) == built


def test_zoo_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    assert corpus.default_cache_dir() == tmp_path / "corpus"
    default_corpus("validation", max_files=SMALL)
    assert len(list((tmp_path / "corpus").glob("corpus-*.json"))) == 1


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        default_corpus("dev")


def test_clean_docstring_keeps_prose_only():
    doc = """Return the sum of the elements along the given axis, as a new array.

    >>> np.sum([1, 2])
    3

    Copyright (c) 2005 Someone. All rights reserved.

    ----------
    x = {a: b[1] + c[2] * (d - e) / f}; g(h[0], i[1])
    """
    cleaned = corpus.clean_docstring(inspect.cleandoc(doc))
    assert cleaned == "Return the sum of the elements along the given axis, as a new array."


@pytest.mark.slow
def test_full_corpus(tmp_path):
    ds = default_corpus_dataset(cache_dir=tmp_path)
    assert set(ds) == {"train", "validation", "test"}
    sizes = {name: sum(len(t.encode("utf-8")) for t in ds[name]["text"]) for name in ds}
    total = sum(sizes.values())
    assert 2_000_000 < total < 8_000_000, sizes
    assert len(ds["train"]) > 500 and len(ds["validation"]) > 0 and len(ds["test"]) > 0
    assert sizes["validation"] < 0.05 * total and sizes["test"] < 0.05 * total
    # Real English prose: the commonest words are there.
    words = " ".join(ds["train"]["text"][:200]).lower().split()
    assert {"the", "of", "is", "a", "to"} <= set(words)
