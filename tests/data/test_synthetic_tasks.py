import math
import random

import pytest

from zoo.data import SYNTHETIC_TASKS, markov_chain, synthetic_dataset, synthetic_documents


@pytest.mark.parametrize("name", sorted(SYNTHETIC_TASKS))
def test_deterministic_by_seed(name):
    a = synthetic_documents(name, 20, seed=0)
    assert a == synthetic_documents(name, 20, seed=0)
    assert a != synthetic_documents(name, 20, seed=1)
    assert len(a) == 20 and all(isinstance(d, str) and d and d.isascii() for d in a)


@pytest.mark.parametrize("name", sorted(SYNTHETIC_TASKS))
def test_dataset(name):
    ds = synthetic_dataset(name, 5, seed=3)
    assert ds.column_names == ["text"]
    assert ds["text"] == synthetic_documents(name, 5, seed=3)


def test_unknown_task_lists_known():
    with pytest.raises(ValueError, match="associative_recall"):
        synthetic_documents("nope", 3)


def _answer(doc):
    question, answer = doc.split(" -> ")
    return question, answer


def test_answers_are_right():
    for doc in synthetic_documents("copy", 50, 0):
        q, a = _answer(doc)
        assert q == f"copy {a}"
    for doc in synthetic_documents("reverse", 50, 0):
        q, a = _answer(doc)
        assert q.split()[1][::-1] == a
    for doc in synthetic_documents("sort", 50, 0):
        q, a = _answer(doc)
        assert "".join(sorted(q.split()[1])) == a
    for doc in synthetic_documents("counting", 50, 0):
        q, a = _answer(doc)
        _, c, _, s = q.split()
        assert s.count(c) == int(a)
    for doc in synthetic_documents("arithmetic", 50, 0, max_digits=4):
        lhs, rhs = doc.split("=")
        x, y = lhs.split("+")
        assert int(x) + int(y) == int(rhs)
    for doc in synthetic_documents("associative_recall", 50, 0, num_pairs=6):
        q, a = _answer(doc)
        pairs, query = q.split(" ? ")
        table = dict(p.split(":") for p in pairs.split())
        assert len(table) == 6 and table[query] == a


def test_markov_entropy_matches_samples():
    chain = markov_chain("abcd", 0.5, chain_seed=0)
    assert abs(sum(chain.stationary.values()) - 1) < 1e-9
    assert 0 < chain.entropy_rate < math.log2(4)
    # The empirical cross-entropy of a long sample under the true chain approaches the entropy rate.
    text = chain.sample(50_000, random.Random(0))
    nll = -sum(
        math.log2(chain.transitions[text[i - 2 : i]][chain.alphabet.index(text[i])])
        for i in range(2, len(text))
    ) / (len(text) - 2)
    assert abs(nll - chain.entropy_rate) < 0.05
    # Different sampling seeds share the chain; different chain seeds do not.
    docs = synthetic_documents("markov", 3, seed=5, length=64, alphabet="abcd", concentration=0.5)
    assert all(len(d) == 64 and set(d) <= set("abcd") for d in docs)
    assert markov_chain("abcd", 0.5, chain_seed=1).transitions != chain.transitions
