"""A character-level tokenizer (Hugging Face `tokenizers`, so it saves as a tokenizer.json and
exports with a checkpoint like any other): one id per character of an alphabet, plus the special
tokens `<pad>` (0), `<bos>` (1), `<eos>` (2), `<unk>` (3)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def char_tokenizer(alphabet: str) -> Tokenizer:
    """A tokenizer whose vocabulary is SPECIALS followed by the distinct characters of `alphabet`."""
    chars = list(dict.fromkeys(alphabet))
    vocab = {token: i for i, token in enumerate([*SPECIALS, *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    return tok
