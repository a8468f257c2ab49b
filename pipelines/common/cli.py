"""Entry point shared by `python -m pipelines.<stage>`: logging, params, readable failures."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from pipelines.common.errors import PipelineError
from pipelines.common.params import Params, load_params


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_stage(main: Callable[[Params], object]) -> None:
    """Run a stage's main(params) with params.yaml; a PipelineError exits 2 with its message only."""
    setup_logging()
    try:
        main(load_params())
    except PipelineError as exc:
        logging.getLogger(main.__module__).error("%s", exc)
        sys.exit(2)
