"""params.yaml typing: the shipped file loads, and a bad value is named with its place before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.common.errors import PipelineError
from pipelines.common.params import load_params

REPO = Path(__file__).resolve().parents[2]


def write_params(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_shipped_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.distill.student.num_layers >= params.distill.student.num_decoder_layers


def test_a_decoder_deeper_than_the_encoder_is_refused(tmp_path):
    # transformers' generate would fail on such a T5 only after training (IndexError in its cache).
    path = write_params(tmp_path, lambda raw: raw["distill"]["student"].update(num_layers=1, num_decoder_layers=2))
    with pytest.raises(PipelineError, match=r"params.yaml: distill.student: .*num_decoder_layers \(2\) > num_layers \(1\)"):
        load_params(path)


def test_unknown_keys_and_out_of_range_values_are_named(tmp_path):
    path = write_params(tmp_path, lambda raw: raw["train"]["t5"].update(d_modle=64))
    with pytest.raises(PipelineError, match=r"train.t5.d_modle"):
        load_params(path)
    path = write_params(tmp_path, lambda raw: raw["train"]["t5"].update(dropout_rate=1.5))
    with pytest.raises(PipelineError, match=r"train.t5.dropout_rate"):
        load_params(path)
