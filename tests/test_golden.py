"""Every pruning / sparsity configuration still produces what it produced before the restructure.

The records in tests/golden/ were made on main before issue 13 moved the code (tests/golden.py).
Tiny fp64 models must match bitwise; SmolLM2 to 1e-6 relative. A run must match one platform's
record (tests/golden.py, "Platforms"): the low bits depend on the CPU's kernels.
"""
from __future__ import annotations

import json
import math

import pytest

import golden
from tiny import paired_leaves


def _tiny_differences(want: dict, got: dict) -> list:
    assert sorted(got) == sorted(want)
    return [path for name in want for x, y, path in paired_leaves(want[name], got[name], name) if x != y]


def _close(x, y) -> bool:
    if isinstance(x, float) and isinstance(y, float):
        return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
    return x == y


def _smollm2_differences(want: dict, got: dict) -> list:
    assert sorted(got) == sorted(want)
    bad = []
    for name in want:
        for x, y, path in paired_leaves(want[name], got[name], name):
            if path.endswith("]") and ".state." in path and isinstance(x, float):
                continue  # sums compared below against the tensor's absolute sum
            if not _close(x, y):
                bad.append((path, x, y))
        for key, (s, a, w, z) in want[name]["state"].items():
            s2, a2, w2, z2 = got[name]["state"][key]
            scale = max(a, 1e-30)
            if abs(s - s2) > 1e-6 * scale or abs(a - a2) > 1e-6 * scale or abs(w - w2) > 1e-6 * scale \
                    or z != z2:
                bad.append((f"{name}.state.{key}", (s, a, w, z), (s2, a2, w2, z2)))
    return bad


def _assert_matches_one(kind: str, got: dict, differences) -> None:
    recs = golden.records(kind)
    assert recs, f"no golden record for {kind} in {golden.GOLDEN_DIR}"
    bad = {name: differences(want, got) for name, want in recs.items()}
    if not all(bad.values()):
        return
    lines = [f"{name}: {len(b)} values differ, first: {b[:3]}" for name, b in bad.items()]
    raise AssertionError(f"{kind}: matches no platform's golden record\n" + "\n".join(lines))


def test_tiny_models_match_golden_bitwise():
    _assert_matches_one("tiny", json.loads(json.dumps(golden.run_tiny())), _tiny_differences)


@pytest.mark.slow
def test_smollm2_matches_golden():
    _assert_matches_one("smollm2", json.loads(json.dumps(golden.run_smollm2())), _smollm2_differences)


def test_a_changed_record_fails():
    """The comparison can fail: a record with one removed layer changed differs from every record."""
    for name, want in golden.records("tiny").items():
        case = sorted(want)[0]
        got = json.loads(json.dumps(want))
        leaf = got[case]["removed"]
        leaf[0] = leaf[0] + 1
        assert _tiny_differences(want, got), name
