"""Greedy and beam search over a decoder step function, with the semantics of Hugging Face `generate`
(transformers 4.57: `_sample` without sampling, and the vectorized `_beam_search` with `early_stopping=False`),
so a model decoded here returns the same sequences as the same model under `model.generate` (the same
tokens up to each hypothesis's end; the padding after it may differ: transformers pads finished beams with
the end-of-sequence id when the pad id is 0, here they are padded with the pad id).

The ONNX Runtime model (`pipelines.common.onnx_model.OnnxSeq2Seq`) decodes with these. Its graphs do the
arithmetic in microseconds per step at our model sizes; the generic `generate` loop spends more than that
per step in Python bookkeeping (input preparation, cache objects, stopping-criteria objects), which
`bench/export_speed.py` measures side by side.

A step function takes the last token of every row (`[rows]`) and, for beam search, the row each new row
continues (`reorder`, `[rows]`, None on the first step) and returns next-token logits `[rows, vocab]`. It
keeps its own key/value cache and reorders it by `reorder` before computing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Step = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
# A LogitsProcessor-like callable: (sequences so far [rows, length], scores [rows, vocab]) -> scores.
Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_NEG = -1.0e9  # Hugging Face's "impossible" score; kept identical so ties break the same way


def _constrain(scores: torch.Tensor, sequences: torch.Tensor, processors: list[Processor],
               generated: int, min_new_tokens: int, eos_token_id: int) -> torch.Tensor:
    if generated < min_new_tokens:
        scores = scores.clone()
        scores[:, eos_token_id] = float("-inf")
    for processor in processors:
        scores = processor(sequences, scores)
    return scores


def greedy_search(step: Step, rows: int, *, start_token_id: int, eos_token_id: int, pad_token_id: int,
                  max_new_tokens: int, min_new_tokens: int = 0, processors: list[Processor] = (),
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """`[rows, 1 + generated]` token ids (start token first): the argmax token at each step; a row that
    produced end-of-sequence continues with padding, and decoding stops once every row has."""
    sequences = torch.full((rows, 1), start_token_id, dtype=torch.long, device=device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    processors = list(processors)
    for generated in range(max_new_tokens):
        logits = step(sequences[:, -1], None).float()
        scores = _constrain(logits, sequences, processors, generated, min_new_tokens, eos_token_id)
        next_tokens = torch.where(unfinished, scores.argmax(dim=-1), pad_token_id)
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        unfinished &= next_tokens != eos_token_id
        if not unfinished.any():
            break
    return sequences


def _gather(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Beams of `tensor` ([batch, beams, ...]) picked by `indices` ([batch, picked])."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


def beam_search(step: Step, batch_size: int, *, num_beams: int, num_return_sequences: int,
                start_token_id: int, eos_token_id: int, pad_token_id: int, max_new_tokens: int,
                min_new_tokens: int = 0, length_penalty: float = 1.0, processors: list[Processor] = (),
                device: torch.device | str = "cpu") -> torch.Tensor:
    """`[batch_size * num_return_sequences, 1 + generated]` token ids, each input's best hypotheses first
    (score: sum of log-probabilities / length ** length_penalty). Rows of the step function are
    `batch_size * num_beams`, input-major. Stops when no running beam can beat the worst finished one
    (Hugging Face's `early_stopping=False` heuristic) or at `max_new_tokens`."""
    k, max_length = num_beams, 1 + max_new_tokens
    keep = 2 * k  # one end-of-sequence token: the top 2k continuations always leave k that go on
    processors = list(processors)
    running = torch.full((batch_size, k, max_length), pad_token_id, dtype=torch.long, device=device)
    running[:, :, 0] = start_token_id
    finished = running.clone()
    running_scores = torch.zeros((batch_size, k), device=device)
    running_scores[:, 1:] = _NEG  # all beams start identical: only the first may expand at step one
    finished_scores = torch.full((batch_size, k), _NEG, device=device)
    is_finished = torch.zeros((batch_size, k), dtype=torch.bool, device=device)
    can_improve = torch.ones((batch_size, 1), dtype=torch.bool, device=device)
    top_k_mask = torch.cat([torch.ones(k, dtype=torch.bool), torch.zeros(keep - k, dtype=torch.bool)]).to(device)
    batch_offset = torch.arange(batch_size, device=device)[:, None] * k
    reorder = None
    length = 1
    while True:
        flat = running[:, :, :length].reshape(batch_size * k, length)
        log_probs = torch.log_softmax(step(flat[:, -1], reorder).float(), dim=-1)
        log_probs = _constrain(log_probs, flat, processors, length - 1, min_new_tokens, eos_token_id)
        vocab_size = log_probs.shape[-1]
        totals = (log_probs.view(batch_size, k, vocab_size) + running_scores[:, :, None]).view(batch_size, -1)

        top_scores, top_indices = torch.topk(totals, keep)
        source_beam = top_indices // vocab_size
        candidates = _gather(running, source_beam)
        candidates[:, :, length] = top_indices % vocab_size
        ends = (candidates[:, :, length] == eos_token_id) | (length + 1 >= max_length)

        # The k best continuations that did not end go on running.
        open_scores = top_scores + ends.float() * _NEG
        chosen = torch.topk(open_scores, k).indices
        running = _gather(candidates, chosen)
        running_scores = _gather(open_scores, chosen)
        reorder = (_gather(source_beam, chosen) + batch_offset).view(-1)

        # Hypotheses that ended among the top k enter the finished list if they beat its worst entry.
        just_finished = ends & top_k_mask[None, :]
        ended_scores = top_scores / (length ** length_penalty)
        ended_scores = ended_scores + (~can_improve).float() * _NEG + (~just_finished).float() * _NEG
        merged = torch.topk(torch.cat([finished_scores, ended_scores], dim=1), k).indices
        finished = _gather(torch.cat([finished, candidates], dim=1), merged)
        finished_scores = _gather(torch.cat([finished_scores, ended_scores], dim=1), merged)
        is_finished = _gather(torch.cat([is_finished, just_finished], dim=1), merged)

        length += 1
        best_running = running_scores[:, :1] / ((length - 1) ** length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, _NEG)
        can_improve &= (best_running > worst_finished).any(dim=-1, keepdim=True)
        if not can_improve.any() or ends.all():
            break

    best = finished[:, :num_return_sequences].reshape(batch_size * num_return_sequences, max_length)
    # Crop the padding after the longest returned hypothesis.
    lengths = ((best != pad_token_id) | (torch.arange(max_length, device=device) == 0)).long().cumsum(1).argmax(1)
    return best[:, : int(lengths.max()) + 1]
