"""SQL generation from a PyTorch T5 (transformers' `generate`) or an ONNX export (`OnnxSeq2Seq.generate`,
the same options and the same search). Evaluation, distillation, export parity and serving all decode here,
so greedy output means the same thing everywhere.

- `generate`: greedy (`num_beams=1`) or beam search, `num_return_sequences` candidates per input, best first.
  Inputs are batched by length (less padding), results come back in input order, tidied (`tidy_sql`: the
  spaced SQL of `serialization.split_punctuation` back to `t1.name`, `count(*)`).
- `allowed`: optional per-input boolean masks over the vocabulary (`common/constrained.py`): tokens outside
  the mask are never generated (constrained decoding), for greedy and beam search alike.
- `execution_guided`: of a list of candidates, the first that is a single SELECT and executes without error
  on the database (read-only, time-limited), else the top candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipelines.common.serialize import tidy_sql
from pipelines.common.sql import SQLError, execute_readonly

log = logging.getLogger(__name__)

# Show a progress bar only when there is enough work for it to mean something.
_PROGRESS_MIN_BATCHES = 4


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def generate(
    model,
    tokenizer,
    inputs: Sequence[str],
    *,
    num_beams: int = 1,
    num_return_sequences: int = 1,
    max_new_tokens: int,
    batch_size: int = 16,
    max_source_length: int | None = None,
    progress: bool | None = None,
    allowed: Sequence[torch.Tensor] | None = None,
) -> list[list[str]]:
    """`num_return_sequences` decoded strings per input (best first), for each input in order.

    Decoding is deterministic (no sampling). `max_source_length` truncates inputs the way training did;
    `progress=None` shows a bar only for long lists."""
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} needs at least as many beams, "
                         f"got num_beams={num_beams}")
    if not inputs:
        return []
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    show = progress if progress is not None else len(batches) >= _PROGRESS_MIN_BATCHES
    device = _model_device(model)
    outputs: list[list[str] | None] = [None] * len(inputs)
    generation_options = {
        "num_beams": num_beams,
        "num_return_sequences": num_return_sequences,
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        # Not early_stopping=True: it ends the search once num_beams hypotheses have finished, and short
        # junk ones ("se</s>") finish first, pushing the best complete query out of the returned beams.
        "early_stopping": False,
    }
    with torch.inference_mode():
        for batch in tqdm(batches, desc=f"generate (beams={num_beams})", unit="batch", disable=not show):
            encoded = tokenizer(
                [inputs[i] for i in batch],
                return_tensors="pt",
                padding=True,
                truncation=max_source_length is not None,
                max_length=max_source_length,
            )
            encoded = {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
            constraint = {}
            if allowed is not None:
                from transformers import LogitsProcessorList

                from pipelines.common.constrained import AllowedTokensProcessor

                masks = torch.stack([allowed[i] for i in batch])
                constraint["logits_processor"] = LogitsProcessorList([AllowedTokensProcessor(masks, num_beams)])
            sequences = model.generate(**encoded, **generation_options, **constraint)
            texts = tokenizer.batch_decode(sequences, skip_special_tokens=True,
                                           clean_up_tokenization_spaces=False)
            for position, index in enumerate(batch):
                group = texts[position * num_return_sequences : (position + 1) * num_return_sequences]
                outputs[index] = [tidy_sql(t.strip()) for t in group]
    return outputs  # type: ignore[return-value]


def first_executable(candidates: Sequence[str], target: str | Path, *, timeout_s: float,
                     max_rows: int = 1) -> int | None:
    """Index of the first candidate that runs read-only on `target` without error, None if none does."""
    for index, sql in enumerate(candidates):
        try:
            # One row is enough to know it executes; the row limit keeps large results cheap.
            execute_readonly(target, sql, timeout_s=timeout_s, max_rows=max_rows)
        except SQLError as exc:
            log.debug("candidate %d rejected: %s", index, exc)
            continue
        return index
    return None


def execution_guided(candidates: Sequence[str], target: str | Path, timeout_s: float) -> str:
    """The first beam that parses as a single SELECT and executes without error, else the top beam."""
    if not candidates:
        raise ValueError("execution_guided needs at least one candidate")
    index = first_executable(candidates, target, timeout_s=timeout_s)
    return candidates[index if index is not None else 0]
