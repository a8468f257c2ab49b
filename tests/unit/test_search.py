"""Greedy and beam search (pipelines.common.search) on a toy model whose next-token distribution depends
on the whole prefix, so a wrong cache reorder or a wrong score shows up as a different answer."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.common.search import beam_search, greedy_search

START, EOS, A, B, C = 0, 1, 2, 3, 4  # start doubles as padding, as in T5
PAD = START
VOCAB = 5
# Probabilities of the next token after each prefix (tuples of generated tokens); anything unlisted is
# uniform. Greedy takes A (0.5) and then nothing good; the best sequence is B C </s> (0.4 * 0.9 * 0.9).
TABLE = {
    (): {A: 0.5, B: 0.4, EOS: 0.1},
    (A,): {A: 0.34, B: 0.32, EOS: 0.33},
    (B,): {C: 0.9, EOS: 0.1},
    (B, C): {EOS: 0.9, A: 0.1},
    (A, A): {EOS: 1.0},
}


def distribution(prefix: tuple[int, ...]) -> torch.Tensor:
    probabilities = torch.full((VOCAB,), 1.0 / VOCAB)
    if prefix in TABLE:
        probabilities = torch.full((VOCAB,), 1e-6)
        for token, p in TABLE[prefix].items():
            probabilities[token] = p
    return probabilities.log()


class ToyModel:
    """A step function with a per-row history as its "cache", reordered the way a key/value cache is."""

    def __init__(self, rows: int):
        self.history = [() for _ in range(rows)]
        self.calls = 0

    def __call__(self, tokens: torch.Tensor, reorder: torch.Tensor | None) -> torch.Tensor:
        if reorder is not None:
            self.history = [self.history[i] for i in reorder.tolist()]
        if self.calls:  # the first call sees the start token, which is not part of the prefix
            self.history = [h + (int(t),) for h, t in zip(self.history, tokens)]
        self.calls += 1
        return torch.stack([distribution(h) for h in self.history])


TOKENS = dict(start_token_id=START, eos_token_id=EOS, pad_token_id=PAD)


def test_greedy_takes_the_locally_best_token_and_pads_finished_rows():
    out = greedy_search(ToyModel(1), 1, max_new_tokens=6, **TOKENS)
    assert out.tolist() == [[START, A, A, EOS]]
    # Two rows: one that ends at once (forced by a processor), padded while the other goes on.
    first_row_ends = lambda seqs, scores: torch.where(  # noqa: E731
        (torch.arange(len(scores)) == 0)[:, None] & (torch.arange(VOCAB) != EOS), -math.inf, scores)
    out = greedy_search(ToyModel(2), 2, max_new_tokens=6, processors=[first_row_ends], **TOKENS)
    assert out.tolist() == [[START, EOS, PAD, PAD], [START, A, A, EOS]]


def test_greedy_respects_max_and_min_new_tokens():
    assert greedy_search(ToyModel(1), 1, max_new_tokens=1, **TOKENS).tolist() == [[START, A]]
    # End-of-sequence is blocked for 3 tokens: after A A (where only EOS is likely) comes the next best.
    out = greedy_search(ToyModel(1), 1, max_new_tokens=8, min_new_tokens=3, **TOKENS)
    assert out[0, :3].tolist() == [START, A, A] and out[0, 3] != EOS and out.shape[1] > 4


def test_beam_search_finds_the_most_likely_sequence_best_first():
    out = beam_search(ToyModel(2), 1, num_beams=2, num_return_sequences=2, max_new_tokens=6,
                      length_penalty=0.0, **TOKENS)
    best, second = out.tolist()
    assert best[:4] == [START, B, C, EOS]          # 0.4 * 0.9 * 0.9 = 0.324
    assert second[:4] == [START, A, A, EOS]        # 0.5 * 0.34 * 1.0 = 0.17
    assert all(t == PAD for t in best[4:] + second[4:])


def test_beam_search_batches_inputs_independently_and_returns_k_per_input():
    out = beam_search(ToyModel(2 * 3), 2, num_beams=3, num_return_sequences=1, max_new_tokens=6,
                      length_penalty=0.0, **TOKENS)
    assert [row[:4] for row in out.tolist()] == [[START, B, C, EOS]] * 2
    with_ends = beam_search(ToyModel(3), 1, num_beams=3, num_return_sequences=3, max_new_tokens=6,
                            length_penalty=0.0, **TOKENS)
    assert len({tuple(row) for row in with_ends.tolist()}) == 3


def test_length_penalty_divides_by_length():
    def top3(length_penalty):
        out = beam_search(ToyModel(3), 1, num_beams=3, num_return_sequences=3, max_new_tokens=6,
                          length_penalty=length_penalty, **TOKENS)
        return [[t for t in row if t != PAD] for row in out.tolist()]

    # Sum of log-probabilities: B C </s> (0.324), A A </s> (0.17), A </s> (0.165).
    assert top3(0.0) == [[B, C, EOS], [A, A, EOS], [A, EOS]]
    # Times the length (penalty -1, favouring short outputs): </s> (-2.30), B C </s> (-3.38), A </s> (-3.60).
    assert top3(-1.0) == [[EOS], [B, C, EOS], [A, EOS]]


def test_beam_search_cut_at_max_new_tokens_returns_the_running_beams():
    out = beam_search(ToyModel(2), 1, num_beams=2, num_return_sequences=2, max_new_tokens=1,
                      length_penalty=0.0, **TOKENS)
    assert out.tolist() == [[START, A], [START, B]]


@pytest.mark.parametrize("beams", [1, 2])
def test_processors_see_the_prefix_and_can_forbid_tokens(beams):
    seen = []

    def no_a(sequences, scores):
        seen.append(sequences.shape)
        scores = scores.clone()
        scores[:, A] = -math.inf
        return scores

    search = greedy_search if beams == 1 else beam_search
    extra = {} if beams == 1 else dict(num_beams=beams, num_return_sequences=1, length_penalty=0.0)
    rows = 1 if beams == 1 else beams
    out = search(ToyModel(rows), 1, max_new_tokens=6, processors=[no_a], **TOKENS, **extra)
    assert A not in out.tolist()[0]
    assert out.tolist()[0][:4] == [START, B, C, EOS]
    assert seen[0] == (rows, 1) and seen[1] == (rows, 2)
