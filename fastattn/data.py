"""Data for the demo: an embedded synthetic sentiment-with-negation task, or an aclImdb directory.

Both give a :class:`TextData`: padded int64 token ids per split, lengths and 0/1 labels, with
``Split.batch(indices)`` returning the classifier's sequence-first ``(tokens (L, N), padding_mask
(N, L) bool True = pad, labels (N,))``. Token id 0 is padding, 1 is unknown.
"""
from __future__ import annotations

import collections
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import Tensor

__all__ = ["Split", "TextData", "make_synthetic", "load_aclimdb", "tokenize", "build_vocab", "encode",
           "POSITIVE_WORDS", "NEGATIVE_WORDS", "NEGATION"]

PAD, UNK = 0, 1
POSITIVE_WORDS = ("good", "great", "superb", "fun")
NEGATIVE_WORDS = ("bad", "dull", "awful", "boring")
NEGATION = "not"


@dataclass
class Split:
    """tokens (num, max_len) int64 padded with 0; lengths (num,) int64 >= 1; labels (num,) float 0/1."""

    tokens: Tensor
    lengths: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, indices: Tensor, device="cpu") -> tuple[Tensor, Tensor, Tensor]:
        """(tokens (L, N) int64, padding_mask (N, L) bool True = pad, labels (N,) float), L = longest in batch."""
        lengths = self.lengths[indices]
        seq_len = int(lengths.max())
        tokens = self.tokens[indices, :seq_len].t().contiguous()
        padding_mask = torch.arange(seq_len).unsqueeze(0) >= lengths.unsqueeze(1)
        return tokens.to(device), padding_mask.to(device), self.labels[indices].to(device)


@dataclass
class TextData:
    name: str
    description: str
    vocab: list[str]
    train: Split
    test: Split
    notes: list[str] = field(default_factory=list)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.vocab[int(i)] for i in ids if int(i) != PAD)


def _pack(seqs: list[list[int]], labels: list[int]) -> Split:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    tokens = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.int64)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.int64)
    return Split(tokens, lengths, torch.tensor(labels, dtype=torch.float32))


# -- synthetic -------------------------------------------------------------------------------------

def make_synthetic(num_train: int = 4000, num_test: int = 1000, min_len: int = 8, max_len: int = 48,
                   num_fillers: int = 200, seed: int = 0) -> TextData:
    """A deterministic sentiment task that a bag of words cannot solve.

    Every sequence holds filler words, exactly one sentiment word (positive: good/great/superb/fun,
    negative: bad/dull/awful/boring) and exactly one "not", at two distinct random positions. The
    "not" negates the sentiment word when it comes anywhere before it, not when it comes after. The
    label is 1 (positive) iff the sentiment word is positive XOR negated. Whether it is negated is
    drawn independently of everything else in the bag (the sentiment word, the fillers, the length),
    so the multiset of words carries no information about the label: any bag-of-words model scores
    50% in expectation. Learning it takes attention between the two words across the sequence and
    their order (the positions).
    """
    if min_len < 3 or max_len < min_len:
        raise ValueError(f"make_synthetic: arguments 'min_len', 'max_len' got {min_len}, {max_len}; expected "
                         "3 <= min_len <= max_len")
    vocab = ["<pad>", "<unk>", NEGATION, *POSITIVE_WORDS, *NEGATIVE_WORDS] + [f"w{i}" for i in range(num_fillers)]
    neg_id = 2
    pos_ids = list(range(3, 3 + len(POSITIVE_WORDS)))
    bad_ids = list(range(3 + len(POSITIVE_WORDS), 3 + len(POSITIVE_WORDS) + len(NEGATIVE_WORDS)))
    first_filler = 3 + len(POSITIVE_WORDS) + len(NEGATIVE_WORDS)
    gen = torch.Generator().manual_seed(seed)

    def rand_int(lo: int, hi: int) -> int:  # inclusive bounds
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    def sample(count: int) -> Split:
        seqs, labels = [], []
        for _ in range(count):
            length = rand_int(min_len, max_len)
            seq = torch.randint(first_filler, first_filler + num_fillers, (length,), generator=gen).tolist()
            positive = rand_int(0, 1) == 1
            negated = rand_int(0, 1) == 1
            word = (pos_ids if positive else bad_ids)[rand_int(0, len(pos_ids) - 1)]
            # two distinct positions: "not" at a, the sentiment word at b; negated iff a < b
            a, b = torch.randperm(length, generator=gen)[:2].tolist()
            if (a < b) != negated:
                a, b = b, a
            seq[a], seq[b] = neg_id, word
            seqs.append(seq)
            labels.append(int(positive != negated))
        return _pack(seqs, labels)

    train, test = sample(num_train), sample(num_test)
    description = (
        f"SYNTHETIC data (generated, seed {seed}): {num_train} train / {num_test} test sequences of "
        f"{min_len}-{max_len} tokens, vocabulary {len(vocab)}. Each holds one sentiment word and one "
        f"'{NEGATION}' somewhere; the label is the sentiment, flipped when '{NEGATION}' comes before the word. "
        "A bag of words cannot solve it (the bag is independent of the label); attention across the "
        "sequence with word order can.")
    return TextData("synthetic", description, vocab, train, test)


# -- aclImdb ---------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_TAG = re.compile(r"<[^>]+>")


def tokenize(text: str) -> list[str]:
    """Lowercase words: HTML tags such as <br /> dropped, runs of letters/digits with an optional 's / n't."""
    return _TOKEN.findall(_TAG.sub(" ", text.lower()))


def build_vocab(texts: Iterable[list[str]], size: int) -> list[str]:
    """["<pad>", "<unk>"] + the (size - 2) most frequent words, ties broken alphabetically."""
    if size < 3:
        raise ValueError(f"build_vocab: argument 'size' got {size}; expected >= 3")
    counts = collections.Counter()
    for words in texts:
        counts.update(words)
    common = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: size - 2]
    return ["<pad>", "<unk>"] + [w for w, _ in common]


def encode(words: list[str], index: dict[str, int], max_len: int) -> list[int]:
    ids = [index.get(w, UNK) for w in words[:max_len]]
    return ids or [UNK]  # an empty review still has one token, so no row is all padding


def _read_reviews(root: str, split: str) -> tuple[list[list[str]], list[int]]:
    docs, labels = [], []
    for label_name, label in (("neg", 0), ("pos", 1)):
        folder = os.path.join(root, split, label_name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--data: expected an aclImdb-layout directory with {split}/pos and "
                                    f"{split}/neg of .txt reviews; {folder} is missing")
        for name in sorted(os.listdir(folder)):
            if name.endswith(".txt"):
                with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                    docs.append(tokenize(f.read()))
                labels.append(label)
    if not docs:
        raise FileNotFoundError(f"--data: no .txt reviews under {os.path.join(root, split)}/pos or /neg")
    return docs, labels


def load_aclimdb(root: str, vocab_size: int = 20000, max_len: int = 256,
                 limit: Optional[int] = None, seed: int = 0) -> TextData:
    """Reviews from ``root/{train,test}/{pos,neg}/*.txt``; vocabulary from the training split.

    Reviews are cut to their first ``max_len`` tokens. ``limit`` keeps a random subset (fixed by
    ``seed``) of at most that many reviews per split.
    """
    train_docs, train_labels = _read_reviews(root, "train")
    test_docs, test_labels = _read_reviews(root, "test")
    vocab = build_vocab(train_docs, vocab_size)
    index = {w: i for i, w in enumerate(vocab)}

    def split(docs, labels) -> Split:
        order = list(range(len(docs)))
        if limit is not None and len(order) > limit:
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
        return _pack([encode(docs[i], index, max_len) for i in order], [labels[i] for i in order])

    train, test = split(train_docs, train_labels), split(test_docs, test_labels)
    description = (f"aclImdb reviews from {root}: {len(train)} train / {len(test)} test, vocabulary "
                   f"{len(vocab)} (most frequent training words), cut to {max_len} tokens")
    return TextData("aclImdb", description, vocab, train, test)
