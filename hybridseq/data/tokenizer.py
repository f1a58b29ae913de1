"""Hugging Face ``tokenizers`` files: load one, find its end-of-document token, train a byte-level
BPE on a stream of documents.

    tok = load_tokenizer("tokenizer.json")           # a tokenizers.Tokenizer; errors name the file
    eos_id, eos = find_eos(tok, "tokenizer.json")    # <|endoftext|>, </s>, ... (or --eos-token)
    tok = train_byte_bpe(iter_texts, vocab_size=8192)   # streams the texts; adds <|endoftext|>

A tokenizer file is JSON: reading one runs no code. ``tokenizers`` is a core dependency (wheels
for Linux, macOS and Windows); it is imported only when a tokenizer is used.
"""
from __future__ import annotations

import os
from typing import Iterable

from ..errors import HybridSeqError

TOKENIZER_NAME = "tokenizer.json"
ENDOFTEXT = "<|endoftext|>"
# special tokens that end a document, in the order they are looked for
EOS_CANDIDATES = (ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>")
MIN_BPE_VOCAB = 257  # the 256 byte symbols and <|endoftext|>


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise HybridSeqError("tokenizers are read with the tokenizers package, which is not installed: "
                             "pip install tokenizers") from None
    return tokenizers


def load_tokenizer(path: str):
    """The ``tokenizers.Tokenizer`` stored in the JSON file ``path``."""
    tk = _tokenizers()
    if not os.path.isfile(path):
        raise HybridSeqError(f"{path}: no such tokenizer file")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        return tk.Tokenizer.from_str(text)
    except Exception as e:  # a bad encoding, bad JSON, or what tokenizers raises (a plain Exception)
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise HybridSeqError(f"{path}: not a tokenizers JSON file ({first})") from None


def tokenizer_from_json(text: str):
    """A ``tokenizers.Tokenizer`` from its JSON text (what worker processes receive)."""
    return _tokenizers().Tokenizer.from_str(text)


def find_eos(tok, where: str = TOKENIZER_NAME, name: str | None = None) -> tuple[int, str]:
    """(id, token) of the end-of-document token: ``name`` when given, else the first of
    ``EOS_CANDIDATES`` the tokenizer knows."""
    for cand in ([name] if name else EOS_CANDIDATES):
        i = tok.token_to_id(cand)
        if i is not None:
            return int(i), cand
    if name:
        raise HybridSeqError(f"{where}: has no token {name!r} (--eos-token)")
    raise HybridSeqError(f"{where}: no end-of-document token (looked for {', '.join(EOS_CANDIDATES)}); "
                         "name one with --eos-token")


def vocab_size(tok) -> int:
    """One more than the largest id the tokenizer can produce (its model's vocabulary and its
    added tokens; ids need not be dense)."""
    ids = tok.get_vocab(with_added_tokens=True).values()
    return max(int(tok.get_vocab_size(with_added_tokens=True)), max(ids, default=-1) + 1)


def train_byte_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None):
    """A byte-level BPE (GPT-2's scheme: every byte is a symbol, so any text encodes without an
    unknown token) trained on ``texts`` as they stream by, with ``<|endoftext|>`` as its one
    special token (id 0). ``vocab_size`` counts the bytes, the merges and the special token."""
    tk = _tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    if int(vocab_size) < MIN_BPE_VOCAB:
        raise HybridSeqError(f"--train-tokenizer {vocab_size}: a byte-level BPE needs a vocabulary of at "
                             f"least {MIN_BPE_VOCAB} (256 bytes + {ENDOFTEXT})")
    tok = tk.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=2, show_progress=False,
                                  special_tokens=[ENDOFTEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


__all__ = ["ENDOFTEXT", "EOS_CANDIDATES", "TOKENIZER_NAME", "find_eos", "load_tokenizer",
           "tokenizer_from_json", "train_byte_bpe", "vocab_size"]
