"""ingest.synthetic_ratio: schema-driven pairs added to the train split only, never repeating held-out ones."""

from __future__ import annotations

import pandas as pd

from pipelines import ingest
from pipelines.common.paths import INGEST_MANIFEST, INGESTED_EXAMPLES
from pipelines.common.io import read_json
from conftest import make_tiny_params
from test_ingest import _tiny_spiderman


def test_synthetic_pairs_go_to_train_only_at_the_ratio(workspace):
    root = _tiny_spiderman(workspace / "spiderman", n_databases=4)
    params = make_tiny_params(ingest={"source": "spiderman", "path": str(root), "split_mode": "by_database",
                                      "dev_fraction": 0.25, "test_fraction": 0.25, "synthetic_ratio": 2.0})
    ingest.main(params)
    frame = pd.read_parquet(INGESTED_EXAMPLES)
    synthetic, human = frame[frame["source"] == "synthetic"], frame[frame["source"] == "spiderman"]
    assert len(human) == 16
    assert set(synthetic["split"]) == {"train"}
    train_dbs = set(human.loc[human["split"] == "train", "db_id"])
    assert set(synthetic["db_id"]) == train_dbs
    # At most ratio x human train pairs per database (the tiny databases may support fewer templates).
    per_db = synthetic.groupby("db_id").size()
    assert 0 < per_db.max() <= 2 * 4
    held_out = {q.casefold() for q in human.loc[human["split"] != "train", "question"]}
    assert not held_out & {q.casefold() for q in synthetic["question"]}
    assert frame["example_id"].is_unique
    assert read_json(INGEST_MANIFEST)["synthetic_train_examples"] == len(synthetic)


def test_ratio_zero_adds_nothing(workspace):
    root = _tiny_spiderman(workspace / "spiderman", n_databases=3)
    ingest.main(make_tiny_params(ingest={"source": "spiderman", "path": str(root)}))
    assert set(pd.read_parquet(INGESTED_EXAMPLES)["source"]) == {"spiderman"}
