"""Regenerates the built-in tiny CLIP vocabulary (vocab.json, merges.txt) beside this file.

Byte-level BPE as in CLIP: every byte symbol alone and word-final, merges for the letters
pairs and a few common words, then the two special tokens. Run: python make_vocab.py
"""

import json
from pathlib import Path

from transformers.convert_slow_tokenizer import bytes_to_unicode

WORDS = ["the", "a", "of", "and", "photo", "cat", "dog", "astronaut", "horse", "riding", "painting",
         "portrait", "landscape", "city", "night", "blurry", "low", "quality", "in", "on", "with"]


def build():
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            a, b = parts[0], parts[1]
            merges.append(f"{a} {b}")
            parts = [a + b] + parts[2:]
            vocab.append(parts[0])
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    merges = list(dict.fromkeys(merges))
    return {tok: i for i, tok in enumerate(vocab)}, merges


if __name__ == "__main__":
    here = Path(__file__).parent
    vocab, merges = build()
    (here / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (here / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    print(len(vocab), "tokens,", len(merges), "merges")
