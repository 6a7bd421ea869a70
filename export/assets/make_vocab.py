"""Regenerates the built-in tiny CLIP vocabulary (vocab.json, merges.txt) beside this file.

Byte-level BPE as in CLIP: every byte symbol alone and word-final, merges for the letters
pairs and a few common words, then the two special tokens. Run: python make_vocab.py

`build(extra_words)` gives the same vocabulary with more whole words: the base ids (special
tokens at 589 and 590 included) are kept and the new tokens follow them, so a model trained with
the extended vocabulary reads the base ids as every other preset does (the `shapes` preset's
tokenizer is made this way by training/train_shapes.py).
"""

import json
from pathlib import Path

from transformers.convert_slow_tokenizer import bytes_to_unicode

WORDS = ["the", "a", "of", "and", "photo", "cat", "dog", "astronaut", "horse", "riding", "painting",
         "portrait", "landscape", "city", "night", "blurry", "low", "quality", "in", "on", "with"]
SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def word_merges(words):
    """(merges, merged tokens) that make each word one word-final token, left to right."""
    merges, tokens = [], []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            a, b = parts[0], parts[1]
            merges.append(f"{a} {b}")
            parts = [a + b] + parts[2:]
            tokens.append(parts[0])
    return merges, tokens


def build(extra_words=()):
    """(vocab {token: id}, merges): the base vocabulary, plus extra_words' tokens after the special ones."""
    symbols = list(bytes_to_unicode().values())
    merges, tokens = word_merges(WORDS)
    vocab = list(dict.fromkeys(symbols + [s + "</w>" for s in symbols] + tokens)) + SPECIAL
    extra_merges, extra_tokens = word_merges(extra_words)
    vocab += [tok for tok in dict.fromkeys(extra_tokens) if tok not in vocab]
    merges = list(dict.fromkeys(merges + extra_merges))
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write(folder, extra_words=()):
    """Writes vocab.json and merges.txt into folder; returns the vocabulary size."""
    vocab, merges = build(extra_words)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


if __name__ == "__main__":
    size = write(Path(__file__).parent)
    print(size, "tokens")
