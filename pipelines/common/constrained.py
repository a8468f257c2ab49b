"""Constrained decoding: at each step only tokens that can be part of SQL over this schema for this question.

A token is allowed when every run of letters in it is part of an allowed word: an SQL keyword or function,
a table or column name of the schema (or a word of one), a table alias (`t1`..`t9`), or a word of the
question (string literals are copied from the question). Digits, whitespace, operators, quotes and
parentheses are always allowed, and so is the end-of-sequence token. The check is on the token's text, so
it works whatever pieces the tokenizer made (`.category_id`, `count(*)`) and for any model with the
`generate` of either backend (PyTorch or ONNX Runtime) through a `LogitsProcessor`.

This removes invented identifiers and words, the commonest invalid outputs of a small model; it does not
check grammar (execution-guided selection among beams catches what still does not run).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from transformers import LogitsProcessor

from pipelines.common.sql import SQLITE_KEYWORDS

_LETTERS = re.compile(r"[^\W\d_]+", re.UNICODE)
_WORDS = re.compile(r"[^\W_]+", re.UNICODE)
SQL_FUNCTIONS = ("count", "sum", "avg", "min", "max", "abs", "round", "length", "lower", "upper", "substr",
                 "cast", "coalesce", "ifnull", "strftime", "date", "julianday", "distinct", "asc", "desc")
ALIASES = tuple(f"t{i}" for i in range(1, 10))


def allowed_words(question: str, schema: Any) -> set[str]:
    """Lower-cased words the output may be made of, for `question` over `schema`."""
    words = {k.lower() for k in SQLITE_KEYWORDS} | set(SQL_FUNCTIONS) | set(ALIASES)
    for table in schema.tables:
        names = [table.name] + [c.name for c in table.columns]
        for name in names:
            words.add(name.lower())
            words.update(w.lower() for w in _WORDS.findall(name))
    words.update(w.lower() for w in _WORDS.findall(question))
    return words


def _fragments(words: Iterable[str]) -> set[str]:
    # Every substring: a token may hold any part of a word ("categ" + "ory_id").
    return {word[i:j] for word in words for i in range(len(word)) for j in range(i + 1, len(word) + 1)}


class VocabularyText:
    """The decoded text of every token id of a tokenizer, computed once per tokenizer."""

    def __init__(self, tokenizer):
        self.size = len(tokenizer)
        self.texts = tokenizer.convert_ids_to_tokens(list(range(self.size)))
        self.special = set(tokenizer.all_special_ids)
        self.eos = tokenizer.eos_token_id


def allowed_mask(vocabulary: VocabularyText, words: set[str], model_vocab_size: int) -> torch.Tensor:
    """Boolean mask over the model's vocabulary: True where the token may be generated."""
    fragments = _fragments(words)
    mask = torch.zeros(model_vocab_size, dtype=torch.bool)
    for token_id, text in enumerate(vocabulary.texts[:model_vocab_size]):
        if token_id in vocabulary.special:
            continue
        mask[token_id] = all(run.lower() in fragments for run in _LETTERS.findall(text or ""))
    if vocabulary.eos is not None:
        mask[vocabulary.eos] = True
    return mask


class AllowedTokensProcessor(LogitsProcessor):
    """Sets the score of every disallowed token to -inf; `masks` has one row per input, each repeated over
    that input's beams (generate lays rows out input-major)."""

    def __init__(self, masks: torch.Tensor, num_beams: int):
        self.masks = masks
        self.num_beams = num_beams

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        masks = self.masks.to(scores.device).repeat_interleave(self.num_beams, dim=0)
        width = min(scores.shape[-1], masks.shape[-1])
        blocked = torch.ones_like(scores, dtype=torch.bool)
        blocked[:, :width] = ~masks[:, :width]
        return scores.masked_fill(blocked, float("-inf"))
