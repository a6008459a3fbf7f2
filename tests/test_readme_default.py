"""The README states the default pipeline once, generated from `CANDIDATES` (issue 29: it named
three different defaults), and no other pipeline is called the default anywhere in it."""
import re
from pathlib import Path

from gradmap.prune.driver import default_pipeline_name
from gradmap.prune.pipeline import CANDIDATES, pipeline_name

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = "<!-- generated from gradmap.prune.pipeline.CANDIDATES; tests/test_readme_default.py checks it -->"
# a `gradmap compare` method string: metric[(options)][+compensation...][@schedule]
METHOD = re.compile(r"`([a-z][a-z-]*(?:\([^`]*\))?(?:\+[a-z][a-z-]*(?:\([^`]*\))?)*(?:@[a-z-]+)?)`")


def default_pipeline_line() -> str:
    """The README's line, written from CANDIDATES (paste this when the default changes)."""
    names = " and ".join(f"`{pipeline_name(c)}`" for c in CANDIDATES)
    return (f"**Default pipeline: `{default_pipeline_name()}`**: runs {names}, each with the pipeline "
            "safeguard, and keeps the one with the lower loss on held-out calibration rows.")


def test_readme_states_the_default_pipeline_from_default_pipeline():
    lines = README.read_text().splitlines()
    assert MARKER in lines, "README lost its generated default-pipeline line"
    want = default_pipeline_line()
    assert lines[lines.index(MARKER) + 1] == want, f"README's default is stale; the line should read:\n{want}"


def test_no_other_pipeline_is_called_the_default():
    allowed = {default_pipeline_name()} | {pipeline_name(c) for c in CANDIDATES}
    for line in README.read_text().splitlines():
        if "default" not in line.lower():
            continue
        others = [m for m in METHOD.findall(line) if ("+" in m or "@" in m) and m not in allowed]
        assert others == [], f"README calls {others} the default? {line!r}"
    assert not re.search(r"`[^`]+`\s*\((?:the\s+)?default\)", README.read_text())
