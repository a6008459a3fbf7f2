"""Fixtures shared by the pruning benchmarks: the model and calibration set they time.

Knobs (environment): GRADMAP_BENCH_NCAL x GRADMAP_BENCH_SEQ calibration tokens (16 x 256),
GRADMAP_BENCH_NPRUNE layers removed (8), GRADMAP_BENCH_THREADS torch threads (<= 2).
Under --benchmark-disable (CI smoke runs) a tiny random Llama stands in for SmolLM2, so the
benchmark files run in seconds and never rot.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

THREADS = int(os.environ.get("GRADMAP_BENCH_THREADS", str(max(1, min(2, os.cpu_count() or 1)))))
NCAL = int(os.environ.get("GRADMAP_BENCH_NCAL", "16"))
SEQ = int(os.environ.get("GRADMAP_BENCH_SEQ", "256"))
NPRUNE = int(os.environ.get("GRADMAP_BENCH_NPRUNE", "8"))


@pytest.fixture(scope="session")
def prune_setup(request):
    """(model, calib, n_prune, batch_size): SmolLM2 when timing, a tiny model under --benchmark-disable."""
    from gradmap.runtime.batching import default_batch_size

    torch.set_num_threads(THREADS)
    if request.config.getoption("benchmark_disable", False):
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from tiny import random_ids, tiny_model
        return tiny_model("llama", n_layers=6), random_ids(4, 16), 2, 2
    from gradmap import load_model
    from gradmap.core.calibration import calibration_data
    model, tok = load_model("smollm2-135m")
    calib = calibration_data(tok, "c4", NCAL, SEQ, seed=0)
    return model, calib, NPRUNE, default_batch_size(SEQ)
