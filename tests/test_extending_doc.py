"""``docs/extending.md`` lists, per extension point, every file a contributor touches and the line
that file holds: each listed file exists and holds it, and every file of the package that holds a
registration is listed (or sits beside a listed file holding the same kind of registration, as
``decomposition/tt.py`` beside the worked example ``decomposition/cp.py``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "extending.md"

#: The kinds of registration in the package, as line patterns.
REGISTRATIONS = {
    "format class": re.compile(r"^class \w+\((FactorizedTensor|CoreTensor)\)"),
    "decomposition": re.compile(r"^register_fit\("),
    "layout": re.compile(r"^class \w+\(\w*Layout\)"),
    "fused form": re.compile(r"^@register_fused_form\("),
    "layer type": re.compile(r"^class \w+Type\(\w*Type\)"),
    "factorized layer": re.compile(r"^class \w+\((FactorizedLayer|_FactorizedConvNd|FactorizedLinear)\)"),
}

ROW = re.compile(r"^\| `([^`]+)` \| `([^`]+)` \| .+ \|$")


def listed_rows() -> list[tuple[str, str]]:
    """(path, line it holds) of every table row of the page."""
    return [(m[1], m[2]) for line in DOC.read_text(encoding="utf-8").splitlines() if (m := ROW.match(line))]


def test_the_page_has_a_table_per_extension_point():
    text = DOC.read_text(encoding="utf-8")
    for heading in ("## Add a format", "## Add a layout", "## Add a layer type"):
        assert heading in text
    rows = listed_rows()
    assert len(rows) >= 15
    assert ("src/stpnet/nn/layer_types.py", "class EmbeddingType(LayerType)") in rows


@pytest.mark.parametrize("path, holds", listed_rows(), ids=lambda v: v if "/" in v else "")
def test_each_listed_file_exists_and_holds_its_line(path, holds):
    file = ROOT / path
    assert file.is_file(), f"docs/extending.md lists {path}, which does not exist"
    assert holds in file.read_text(encoding="utf-8"), f"{path} does not hold `{holds}` (docs/extending.md)"


def test_every_file_holding_a_registration_is_listed():
    rows = listed_rows()
    listed = {path for path, _ in rows}
    # the directories where a listed line is a registration of each kind
    examples = {kind: {str(Path(path).parent) for path, holds in rows if pattern.search(holds)}
                for kind, pattern in REGISTRATIONS.items()}
    for kind, directories in examples.items():
        assert directories, f"docs/extending.md lists no file holding a {kind} registration"
    unlisted = []
    for file in sorted((ROOT / "src" / "stpnet").rglob("*.py")):
        path = str(file.relative_to(ROOT))
        lines = file.read_text(encoding="utf-8").splitlines()
        for kind, pattern in REGISTRATIONS.items():
            if any(pattern.match(line) for line in lines) and path not in listed \
                    and str(Path(path).parent) not in examples[kind]:
                unlisted.append(f"{path} ({kind})")
    assert not unlisted, f"files holding a registration that docs/extending.md does not cover: {unlisted}"
