import pytest
from transformers import AutoTokenizer

from zoo.data import DEFAULT_VOCAB_SIZE, default_tokenizer, load_tokenizer

TEXTS = [
    "Hello, world!",
    "héllo wörld — naïve café, 日本語, 🎉🚀, Ω≈ç√",
    "  leading and trailing spaces  \n\ttabs\r\nand newlines\n",
    "special-looking text: </s> <pad> <unk> stays text",
    "",
]


def test_vocab_and_special_ids():
    tok = default_tokenizer()
    assert len(tok) == DEFAULT_VOCAB_SIZE == 259
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok("A", add_special_tokens=False)["input_ids"] == [ord("A") + 3]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_utf8(text):
    tok = default_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [b + 3 for b in text.encode("utf-8")]
    assert tok.decode(ids) == text
    with_eos = tok(text)["input_ids"]
    assert with_eos[-1] == tok.eos_token_id
    assert tok.decode(with_eos, skip_special_tokens=True) == text


def test_save_and_load_with_auto_tokenizer(tmp_path):
    tok = default_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == DEFAULT_VOCAB_SIZE
    assert loaded.pad_token_id == 0 and loaded.eos_token_id == 1
    for text in TEXTS:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    # load_tokenizer goes through AutoTokenizer for a path.
    assert load_tokenizer(str(tmp_path))(TEXTS[1])["input_ids"] == tok(TEXTS[1])["input_ids"]


@pytest.mark.parametrize("name", [None, "byte"])
def test_load_default(name):
    tok = load_tokenizer(name)
    assert len(tok) == DEFAULT_VOCAB_SIZE and tok.pad_token_id == 0


def test_load_missing_path_names_it(tmp_path):
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(OSError, match="no-such-tokenizer"):
        load_tokenizer(str(missing))
