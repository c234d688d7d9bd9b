"""Hand-written text data for the ``text_class`` tests: a toy sentiment corpus as a CSV, and a tiny BERT folder
(config and a word-piece vocabulary, no weights) that ``model.hf_init=random`` builds from, with no download."""

from __future__ import annotations

from pathlib import Path

import numpy as np

POSITIVE = ("good", "great", "fine", "lovely")
NEGATIVE = ("bad", "awful", "poor", "dull")
NEUTRAL = ("the", "film", "was", "plot", "cast", "and", "very", "quite")
RESERVED = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB = RESERVED + POSITIVE + NEGATIVE + NEUTRAL


def is_test_row(i: int) -> bool:
    """Whether row ``i`` of a corpus written with ``split`` is held out: every fourth pair (both labels)."""
    return (i // 2) % 4 == 3


def write_corpus(path: Path, n: int = 72, seed: int = 0, split: bool = False) -> list[tuple[str, str]]:
    """A CSV of ``n`` texts (columns text,label[,split]): a few neutral words and one word of the label's side;
    labels alternate positive/negative. With ``split``, the rows of :func:`is_test_row` are ``test``. Returns
    the (text, label) rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = list(rng.choice(NEUTRAL, size=int(rng.integers(2, 6))))
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(POSITIVE if i % 2 == 0 else NEGATIVE)))
        rows.append((" ".join(words), label))
    header = "text,label,split" if split else "text,label"
    lines = [
        f"{text},{label},{'test' if is_test_row(i) else 'train'}" if split else f"{text},{label}"
        for i, (text, label) in enumerate(rows)
    ]
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return rows


def write_tiny_bert(folder: Path) -> Path:
    """A BERT folder (hidden 32, 2 layers, 2 heads) with a word-piece tokenizer over :data:`VOCAB`, no weights."""
    from transformers import BertConfig, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    BertTokenizer(str(vocab)).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    config.save_pretrained(folder)
    return folder
