import os
import sys

import pytest

# libgomp's idle threads spin by default; on a shared, oversubscribed box that makes small-model
# tests 10-30x slower. It must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# as gradmap itself reads it (gradmap.core.calibration.data_dir): $GRADMAP_DATA_DIR, else ../shared/data
DATA = os.path.abspath(os.environ.get("GRADMAP_DATA_DIR")
                       or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture(scope="session")
def data_dir():
    if not os.path.isdir(DATA):
        pytest.fail(f"evaluation data not found at {DATA}; set GRADMAP_DATA_DIR to the folder "
                    "holding c4/, wikitext2/ and tasks/ (default: ../shared/data)")
    return DATA


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct model (fp32, CPU), loaded once per test session."""
    from gradmap import load_model
    return load_model("smollm2-135m")
