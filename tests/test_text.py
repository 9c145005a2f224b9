"""The byte tokenizer and the tokenizer plug-in point."""
import pytest
import torch

from avdsl.runtime.text import ByteTokenizer, Tokenizer, encode_batch, load_tokenizer


def test_encode_layout_and_vocab():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259
    ids = tok.encode("Hi", 6)
    assert ids.dtype == torch.long
    assert ids.tolist() == [1, ord("H") + 3, ord("i") + 3, 2, 0, 0]
    assert isinstance(tok, Tokenizer)


@pytest.mark.parametrize("text", ["a dog barks twice.", "Grüße, 東京! 🎵", ""])
def test_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, 64)
    assert ids.shape == (64,)
    assert int(ids.max()) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_non_ascii_takes_one_id_per_utf8_byte():
    ids = ByteTokenizer().encode("é", 5)  # é is 0xC3 0xA9 in UTF-8
    assert ids.tolist() == [1, 0xC3 + 3, 0xA9 + 3, 2, 0]


def test_truncation_keeps_eos():
    tok = ByteTokenizer()
    ids = tok.encode("abcdefgh", 5)
    assert ids.tolist() == [1, ord("a") + 3, ord("b") + 3, ord("c") + 3, 2]
    assert tok.decode(ids) == "abc"
    assert tok.encode("abc", 2).tolist() == [1, 2]


def test_truncation_does_not_split_a_character():
    tok = ByteTokenizer()
    # "aé" is 3 bytes; room for 2 would cut é in half, so only "a" is kept
    ids = tok.encode("aé", 4)
    assert ids.tolist() == [1, ord("a") + 3, 2, 0]
    assert tok.decode(ids) == "a"
    text = "東京タワー"
    for length in range(2, 20):
        assert text.startswith(tok.decode(tok.encode(text, length)))


def test_decode_stops_at_eos_and_skips_specials():
    tok = ByteTokenizer()
    assert tok.decode([1, ord("o") + 3, 0, ord("k") + 3, 2, ord("x") + 3]) == "ok"
    assert tok.decode([ord("a") + 3, 0xFF + 3]) == "a\ufffd"  # invalid UTF-8 is shown, not raised
    with pytest.raises(ValueError, match="id 259 is outside"):
        tok.decode([259])


def test_encode_rejects_a_length_without_room_for_bos_and_eos():
    with pytest.raises(ValueError, match="length must be at least 2"):
        ByteTokenizer().encode("a", 1)


def test_encode_batch():
    batch = encode_batch(ByteTokenizer(), ["a", "bc"], 5)
    assert batch.tolist() == [[1, 100, 2, 0, 0], [1, 101, 102, 2, 0]]


def test_load_byte_tokenizer():
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_load_unknown_name_explains_the_choices():
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe': use 'byte' or 'module:attr'"):
        load_tokenizer("bpe")


def test_load_plugin_class(tmp_path, monkeypatch):
    (tmp_path / "my_tokenizers.py").write_text(
        "import torch\n"
        "class Upper:\n"
        "    pad_id, bos_id, eos_id = 0, 1, 2\n"
        "    vocab_size = 30\n"
        "    def encode(self, text, length):\n"
        "        ids = [1] + [ord(c) - ord('A') + 3 for c in text.upper()] + [2]\n"
        "        return torch.tensor((ids + [0] * length)[:length])\n"
        "    def decode(self, ids):\n"
        "        return ''.join(chr(i - 3 + ord('A')) for i in ids if i > 2)\n"
        "class NoDecode:\n"
        "    pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 3\n"
        "    def encode(self, text, length):\n"
        "        return torch.zeros(length, dtype=torch.long)\n"
        "class PadOne(Upper):\n"
        "    pad_id = 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    tok = load_tokenizer("my_tokenizers:Upper")
    assert tok.decode(tok.encode("abc", 8)) == "ABC"
    with pytest.raises(ValueError, match="lacks part of the Tokenizer interface"):
        load_tokenizer("my_tokenizers:NoDecode")
    with pytest.raises(ValueError, match="padding must be id 0"):
        load_tokenizer("my_tokenizers:PadOne")
    with pytest.raises(ValueError, match="has no attribute 'Missing'"):
        load_tokenizer("my_tokenizers:Missing")


def test_load_plugin_from_a_missing_module():
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_here'"):
        load_tokenizer("no_such_module_here:Thing")
