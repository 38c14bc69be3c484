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


def test_passkey_format():
    import re

    docs = synthetic_documents("passkey", 50, seed=0, min_len=200, max_len=600, key_digits=6)
    tail = "What is the pass key? The pass key is "
    for doc in docs:
        assert 200 <= len(doc) <= 600 + 100 and doc.count(tail) == 1 and doc.endswith(".")
        question, answer = doc.rsplit(tail, 1)
        key = answer.removesuffix(".")
        # Stated once in the context, six digits, and that is the answer.
        assert re.fullmatch(r"[1-9]\d{5}", key)
        assert re.findall(r"The pass key is (\d+)\. Remember it\.", question) == [key]
    # The key sits at different depths: not always right after the start or right before the question.
    depths = [doc.index("Remember it") / len(doc) for doc in docs]
    assert min(depths) < 0.3 and max(depths) > 0.6


def test_babi_single_fact_answer_is_the_last_move():
    import re

    docs = synthetic_documents("babi_single_fact", 50, seed=0, num_facts=5, min_len=100, max_len=400)
    for doc in docs:
        assert 100 <= len(doc) <= 400 + 100
        story, question = doc.rsplit(" Where is ", 1)
        person, answer = question.split("? ")
        moves = re.findall(
            r"([A-Z][a-z]+) (?:went to|moved to|walked to|travelled to|ran to|went back to) the (\w+)\.",
            story,
        )
        assert len(moves) == 5
        assert answer == [place for who, place in moves if who == person][-1]


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("passkey", {"min_len": 50, "max_len": 10}, "min_len <= max_len"),
        ("passkey", {"key_digits": 0}, "key_digits must be in 1..18"),
        ("babi_single_fact", {"num_facts": 0}, "num_facts must be >= 1"),
    ],
)
def test_long_context_options_are_checked(name, options, message):
    with pytest.raises(ValueError, match=message):
        synthetic_documents(name, 2, **options)


def test_passkey_suite_is_the_eval_prompt_and_its_answer():
    """The eval suite's passkey prompt (its header and question), the key after it, exactly ``length`` tokens with
    the end-of-text token; the answer span is the space, the key and the full stop that ends it (the suite matches
    the key as a whole word, so a model has to learn where it stops)."""
    from eval.tasks.passkey import FOOTER, HEADER
    from zoo.data.synthetic import answer_span
    from zoo.data.tokenizer import default_tokenizer

    tokenizer = default_tokenizer()
    for doc in synthetic_documents("passkey_suite", 10, seed=0, length=300):
        start, end = answer_span("passkey_suite", doc)
        key = doc[start + 1 : end - 1]
        assert doc.startswith(HEADER) and doc[:start].endswith(FOOTER) and doc[start] == " "
        assert len(key) == 5 and key.isdigit() and f"The pass key is {key}. Remember it." in doc[:start]
        assert doc[end - 1 :] == "." and end == len(doc) and len(tokenizer(doc)["input_ids"]) == 300
    with pytest.raises(ValueError, match="length"):
        synthetic_documents("passkey_suite", 1, length=64)


def test_passkey_suite_end_share_puts_needles_at_the_ends():
    """``end_share`` of the needles go to an end of the haystack (right after the header, or right before the
    question), both ends occurring; the rest stay at uniform depths; 0 keeps the default documents unchanged."""
    from eval.tasks.passkey import FOOTER, HEADER

    def place(doc):
        key = doc[doc.rindex(" ") + 1 : -1]
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        if doc.startswith(HEADER + needle):
            return "start"
        return "end" if doc.endswith(needle + FOOTER + f" {key}.") else "middle"

    ends = [place(d) for d in synthetic_documents("passkey_suite", 24, seed=3, length=300, end_share=1.0)]
    assert set(ends) == {"start", "end"}
    mixed = [place(d) for d in synthetic_documents("passkey_suite", 60, seed=3, length=300, end_share=0.5)]
    assert {"start", "end", "middle"} <= set(mixed) and 10 <= mixed.count("middle") <= 50
    default = synthetic_documents("passkey_suite", 8, seed=5, length=300)
    assert synthetic_documents("passkey_suite", 8, seed=5, length=300, end_share=0.0) == default
    assert "middle" in {place(d) for d in default}
    with pytest.raises(ValueError, match="end_share"):
        synthetic_documents("passkey_suite", 1, length=300, end_share=1.5)


def test_babi_suite_is_the_eval_prompt_and_its_answer():
    """The eval suite's bAbI prompt (its header, its question and answer cue), the answer after it: the place of
    the asked person's last move among the story's sentences, read back from the document; a prompt of ``length``
    tokens at most (as the suite's), the answer after it; the filler is real text of the corpus's train split, none
    of the test split the suite scores on."""
    import re

    from eval.tasks.babilong import HEADER, PLACES
    from zoo.data.corpus import default_corpus
    from zoo.data.synthetic import answer_span
    from zoo.data.tokenizer import default_tokenizer

    tokenizer = default_tokenizer()
    test_docs = [re.sub(r"\s+", " ", d).strip() for d in default_corpus("test")]
    for doc in synthetic_documents("babi_suite", 8, seed=0, length=384):
        start, end = answer_span("babi_suite", doc)
        question = re.search(r"\n\nQuestion: Where is (\w+)\?\nAnswer:$", doc[:start])
        assert doc.startswith(HEADER) and question is not None and end == len(doc)
        person = question.group(1)
        moves = re.findall(rf"{person} (?:went|moved|travelled|journeyed) to the (\w+)\.", doc[:start])
        assert moves and doc[start:end] == f" {moves[-1]}" and moves[-1] in PLACES
        prompt_tokens = len(tokenizer(doc[:start], add_special_tokens=False)["input_ids"])
        assert 384 - 8 <= prompt_tokens <= 384 and len(tokenizer(doc)["input_ids"]) <= 384 + 10
        # a stretch of filler after the header (cut before the first story sentence) is in no test document
        filler = re.split(r"\b(?:Mary|John|Sandra|Daniel|Alice|Robert) ", doc[len(HEADER) :])[0][:40]
        assert len(filler) < 20 or not any(filler in t for t in test_docs)
    with pytest.raises(ValueError, match="length"):
        synthetic_documents("babi_suite", 1, length=64)
    with pytest.raises(ValueError, match="supporting"):
        synthetic_documents("babi_suite", 1, supporting=4)


def test_babi_suite_num_facts():
    """``num_facts`` sets how many story sentences a document tells (a curriculum's short stories); without it the
    documents are the suite's (4-8 sentences), the same as before the option."""
    import re

    from zoo.data.synthetic import answer_span

    moves = r"\b(?:Mary|John|Sandra|Daniel|Alice|Robert) (?:went|moved|travelled|journeyed) to the \w+\."
    for lo, hi in ((1, 1), (2, 3)):
        counts = set()
        for doc in synthetic_documents("babi_suite", 12, seed=1, length=256, num_facts=[lo, hi]):
            counts.add(len(re.findall(moves, doc[: answer_span("babi_suite", doc)[0]])))
        assert counts == set(range(lo, hi + 1)), (lo, hi, counts)
    default = synthetic_documents("babi_suite", 6, seed=2, length=384)
    assert default == synthetic_documents("babi_suite", 6, seed=2, length=384, num_facts=None)
    assert {len(re.findall(moves, d)) for d in default} <= set(range(4, 9))
    for bad in ([0, 2], [3, 2], [1]):
        with pytest.raises(ValueError, match="num_facts"):
            synthetic_documents("babi_suite", 1, length=256, num_facts=bad)
    with pytest.raises(ValueError, match="supporting=1"):
        synthetic_documents("babi_suite", 1, length=512, supporting=2, num_facts=[1, 2])
