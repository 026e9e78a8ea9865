"""SVG charts for the report: pure functions, read back as XML (no browser)."""

from __future__ import annotations

import itertools
import json
import math
import re
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from savepoints.report.svg import (
    MARKER_KINDS,
    Marker,
    Series,
    downsample,
    heatmap,
    human_bytes,
    line_chart,
    storage_chart,
)


def parse(markup: str) -> ET.Element:
    """The figure as XML, with the SVG namespace stripped so tags read as in the HTML."""
    root = ET.fromstring(markup)
    for el in root.iter():
        el.tag = el.tag.split("}")[-1]
    return root


def with_class(root: ET.Element, name: str) -> list[ET.Element]:
    return [el for el in root.iter() if name in (el.get("class") or "").split()]


def path_points(d: str) -> int:
    return len(re.findall(r"-?\d+(?:\.\d+)? -?\d+(?:\.\d+)?", d))


def luminance(fill: str) -> float:
    r, g, b = (int(fill[i : i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def noisy(n: int) -> list[tuple[float, float]]:
    return [(float(i), math.sin(i / 50) + (i % 7) * 0.01) for i in range(n)]


# ---------------------------------------------------------------- downsample


def test_downsample_keeps_first_last_and_extremes_within_the_budget() -> None:
    pts = noisy(10_000)
    pts[1234] = (1234.0, 50.0)  # a spike
    pts[7777] = (7777.0, -50.0)
    out = downsample(pts, 600)
    assert len(out) <= 600
    assert out[0] == pts[0] and out[-1] == pts[-1]
    assert (1234.0, 50.0) in out and (7777.0, -50.0) in out
    assert [p[0] for p in out] == sorted(p[0] for p in out)


def test_downsample_returns_short_input_unchanged() -> None:
    pts = [(1, 0.5), (2, 0.25), (3, 0.75)]
    assert downsample(pts, 600) == pts
    assert downsample([], 600) == []


def test_downsample_drops_non_finite_points_instead_of_comparing_them() -> None:
    pts = [(float(i), float("nan") if i % 3 == 0 else float(i)) for i in range(2000)]
    out = downsample(pts, 100)
    assert out and all(math.isfinite(y) for _, y in out)


# ---------------------------------------------------------------- line chart


@pytest.mark.parametrize("n", [10, 10_000])
def test_line_chart_draws_one_bounded_path_per_series_and_stays_small(n: int) -> None:
    out = line_chart("loss", [Series("loss", noisy(n), "#1f77b4")], chart_id="c")
    root = parse(out)
    assert root.tag == "figure" and root.get("id") == "c" and "chart" in root.get("class", "")
    assert root.find("figcaption").text == "loss"  # type: ignore[union-attr]
    (path,) = with_class(root, "series")
    assert path.tag == "path" and path.get("fill") == "none"
    assert path.get("stroke") == "#1f77b4" and path.get("data-series") == "loss"
    assert 2 <= path_points(path.get("d", "")) <= 1300
    assert len(out) < 60_000


def test_line_chart_svg_carries_the_ranges_a_hover_script_needs() -> None:
    root = parse(line_chart("loss", [Series("loss", [(10, 1.0), (20, 3.0)], "red")]))
    svg = root.find("svg")
    assert svg is not None and svg.get("role") == "img" and svg.get("aria-label") == "loss"
    assert svg.get("data-x0") == "10" and svg.get("data-x1") == "20"
    assert float(svg.get("data-y0", "")) < 1.0 < 3.0 < float(svg.get("data-y1", ""))
    px0, px1 = float(svg.get("data-px0", "")), float(svg.get("data-px1", ""))
    py0, py1 = float(svg.get("data-py0", "")), float(svg.get("data-py1", ""))
    assert 0 < px0 < px1 <= 760 and 0 < py1 < py0 <= 300


def test_line_chart_embeds_the_downsampled_points_as_json() -> None:
    out = line_chart("lr", [Series("a</script><b>", noisy(5000), "#123456")])
    (script,) = with_class(parse(out), "chart-data")
    assert script.get("type") == "application/json"
    assert "</" not in (script.text or "")
    data = json.loads(script.text or "")
    (s,) = data["series"]
    assert s["name"] == "a</script><b>" and s["color"] == "#123456"
    assert 2 < len(s["points"]) <= 1000 and s["points"][0] == [0, 0]


def test_step_ticks_are_integers_and_y_ticks_are_nice_numbers() -> None:
    root = parse(line_chart("loss", [Series("loss", [(0, 0.13), (1000, 0.91)], "red")]))
    labels = [t.text or "" for g in with_class(root, "ticks") for t in g]
    assert "0" in labels and "1000" in labels
    assert not any("." in t for t in labels if t.isdigit())
    assert {"0.2", "0.4", "0.6", "0.8"} <= set(labels)


def test_a_flat_series_gets_a_padded_y_range() -> None:
    svg = parse(line_chart("x", [Series("x", [(1, 2.0), (2, 2.0)], "red")])).find("svg")
    assert svg is not None
    assert float(svg.get("data-y0", "")) < 2.0 < float(svg.get("data-y1", ""))


def test_a_single_point_is_drawn_as_a_circle() -> None:
    root = parse(line_chart("x", [Series("x", [(5, 1.0)], "red")]))
    (dot,) = with_class(root, "series")
    assert dot.tag == "circle" and dot.get("data-series") == "x"


def test_non_finite_values_are_skipped() -> None:
    pts = [(1, 1.0), (2, math.nan), (3, math.inf), (4, -math.inf), (5, 2.0)]
    root = parse(line_chart("x", [Series("x", pts, "red")]))
    (path,) = with_class(root, "series")
    assert path_points(path.get("d", "")) == 2
    assert "nan" not in ET.tostring(root, encoding="unicode").lower()


@pytest.mark.parametrize(
    "series",
    [[], [Series("x", [], "red")], [Series("x", [(1, math.nan), (2, math.inf)], "red")]],
)
def test_no_finite_values_give_the_empty_paragraph(series: list[Series]) -> None:
    root = parse(line_chart("loss", series))
    assert root.find("svg") is None
    (p,) = with_class(root, "empty")
    assert p.tag == "p" and "no values" in (p.text or "")


def test_a_series_without_values_draws_nothing_next_to_one_with_values() -> None:
    root = parse(line_chart("x", [Series("a", [], "red"), Series("b", [(1, 1), (2, 2)], "blue")]))
    assert [el.get("data-series") for el in with_class(root, "series")] == ["b"]


def test_every_marker_kind_has_a_lane_symbol_with_step_and_tip() -> None:
    markers = [Marker(100 * i, None, kind, f"{kind} at {100 * i}") for i, kind in
               enumerate(MARKER_KINDS, start=1)]  # fmt: skip
    root = parse(line_chart("x", [Series("x", noisy(800), "red")], markers=markers))
    for m in markers:
        (el,) = with_class(root, f"marker-{m.kind}")
        assert "marker" in el.get("class", "").split()
        assert el.get("data-step") == str(int(m.step))
        assert el.get("data-tip") == m.label
        assert el.find("title").text == m.label  # type: ignore[union-attr]
    legend = " ".join(t.text or "" for g in with_class(root, "legend") for t in g.iter("text"))
    for text in MARKER_KINDS.values():
        assert text in legend


def test_a_marker_with_a_value_is_drawn_on_the_plot_and_on_the_lane() -> None:
    markers = [Marker(50, 0.5, "best", "best"), Marker(60, None, "kept", "kept")]
    root = parse(line_chart("x", [Series("x", noisy(100), "red")], markers=markers))
    best = with_class(root, "marker-best")
    assert len(best) == 2 and sum("on-plot" in el.get("class", "") for el in best) == 1
    assert len(with_class(root, "marker-kept")) == 1
    assert with_class(root, "guide")


def test_marker_labels_and_names_are_escaped() -> None:
    evil = '<script>alert("x")</script> \' & "'
    out = line_chart(
        evil,
        [Series(evil, noisy(20), "red")],
        markers=[Marker(5, 0.1, "tagged", evil, href="ckpt/5?a=1&b=2")],
        breaks=[(10, evil)],
        y_label=evil,
        chart_id=evil,
    )
    assert "<script>alert" not in out
    root = parse(out)  # well-formed despite quotes and angle brackets
    tips = {el.get("data-tip") for el in with_class(root, "marker-tagged")}
    assert tips == {evil}
    links = [el for el in root.iter("a")]
    assert links and all(a.get("href") == "ckpt/5?a=1&b=2" for a in links)


def test_javascript_hrefs_are_not_linked() -> None:
    m = Marker(5, None, "kept", "k", href="JavaScript:alert(1)")
    root = parse(line_chart("x", [Series("x", noisy(20), "red")], markers=[m]))
    assert not list(root.iter("a"))
    assert with_class(root, "marker-kept")


def test_breaks_draw_dashed_lines_with_labels() -> None:
    root = parse(
        line_chart(
            "x",
            [Series("x", noisy(400), "red")],
            breaks=[(200, "resumed from 200"), (210, "resumed from 210")],
        )
    )
    lines = with_class(root, "break")
    assert len(lines) == 2 and all(el.get("stroke-dasharray") for el in lines)
    labels = with_class(root, "break-label")
    assert [t.text for t in labels] == ["resumed from 200", "resumed from 210"]
    assert labels[0].get("y") != labels[1].get("y")  # close breaks do not overprint


def test_x_range_covers_markers_and_breaks_beyond_the_data() -> None:
    svg = parse(
        line_chart(
            "x",
            [Series("x", [(10, 1.0), (20, 2.0)], "red")],
            markers=[Marker(5, None, "kept", "k")],
            breaks=[(30, "b")],
        )
    ).find("svg")
    assert svg is not None and svg.get("data-x0") == "5" and svg.get("data-x1") == "30"


def test_faded_and_dashed_series_are_styled_and_share_one_superseded_legend_entry() -> None:
    series = [
        Series("loss", [(0, 3), (200, 2)], "#1f77b4", faded=True),
        Series("loss", [(200, 2), (400, 1)], "#1f77b4"),
        Series("run-b · loss", [(0, 3), (400, 1.5)], "#ff7f0e", dashed=True),
    ]
    root = parse(line_chart("loss", series))
    faded, current, dashed = with_class(root, "series")
    assert faded.get("opacity") == "0.4" and faded.get("stroke-dasharray")
    assert current.get("stroke-dasharray") is None
    assert dashed.get("stroke-dasharray") and dashed.get("opacity") is None
    legend = [t.text for g in with_class(root, "legend") for t in g.iter("text")]
    assert legend == ["loss", "run-b · loss", "superseded by a resume"]


floats = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=150, deadline=None)
@given(
    points=st.lists(st.tuples(floats, floats), max_size=40),
    markers=st.lists(
        st.builds(
            Marker,
            floats,
            st.none() | floats,
            st.sampled_from([*MARKER_KINDS, "x y"]),
            st.text(max_size=8),
        ),
        max_size=4,
    ),
)
def test_any_numbers_give_well_formed_svg_without_nan_coordinates(
    points: list[tuple[float, float]], markers: list[Marker]
) -> None:
    out = line_chart("t", [Series("s", points, "red")], markers=markers, breaks=[(3, "b")])
    root = parse(out)
    for el in root.iter():
        for attr in ("d", "x", "y", "cx", "cy", "x1", "x2", "transform", "data-x0", "data-y1"):
            assert not re.search(r"nan|inf", el.get(attr) or "", re.I), (attr, el.get(attr))


# ---------------------------------------------------------------- heatmap


def test_heatmap_has_one_cell_per_row_and_column_and_marks_missing_and_zero() -> None:
    rows = ["embeddings", "layer 0", "head"]
    cols = ["100→200", "200→300"]
    out = heatmap("change", rows, cols, [[1e-3, None], [0.0, 1e-5], [math.inf, 0.2]], note="n")
    root = parse(out)
    assert "heatmap" in root.get("class", "").split()
    cells = with_class(root, "cell")
    assert len(cells) == len(rows) * len(cols)
    (missing,) = with_class(root, "missing")
    (zero,) = with_class(root, "zero")
    assert missing.get("fill") != zero.get("fill")
    assert zero.get("fill") == "#fff"
    tips = [c.get("data-tip") for c in cells]
    assert "embeddings · 100→200: 1.0e-03" in tips
    assert all(c.find("title") is not None for c in cells)
    (note,) = with_class(root, "note")
    assert note.text == "n"


def test_heatmap_colour_scale_is_log_and_monotonic() -> None:
    values = [10.0**e for e in range(-6, 1)]
    root = parse(heatmap("c", ["layer"], [str(i) for i in range(len(values))], [values]))
    lum = [luminance(c.get("fill", "")) for c in with_class(root, "cell")]
    assert all(a > b for a, b in itertools.pairwise(lum))
    # log scale: equal ratios give (roughly) equal colour steps, not one dark cell
    assert lum[3] < lum[0] - 40 and lum[3] > lum[-1] + 40


def test_heatmap_truncates_long_row_names_but_keeps_them_in_a_title() -> None:
    name = "model.layers.12.self_attn.q_proj.lora_A"
    root = parse(heatmap("c", [name], ["a"], [[0.1]]))
    label = next(t for g in with_class(root, "row-labels") for t in g)
    assert "…" in "".join(label.itertext()) and label.find("title").text == name  # type: ignore[union-attr]


def test_heatmap_with_many_columns_rotates_labels() -> None:
    cols = [f"{i * 100}→{(i + 1) * 100}" for i in range(60)]
    root = parse(heatmap("c", ["a", "b"], cols, [[0.1] * 60, [0.01] * 60]))
    labels = [t for g in with_class(root, "col-labels") for t in g]
    assert labels and all("rotate" in (t.get("transform") or "") for t in labels)
    assert len(with_class(root, "cell")) == 120


def test_heatmap_escapes_names_and_handles_empty_input() -> None:
    out = heatmap("<b>", ["<script>alert(1)</script>"], ["a&b"], [[0.5]])
    assert "<script>alert" not in out
    parse(out)
    empty = parse(heatmap("c", [], [], []))
    assert empty.find("svg") is None and with_class(empty, "empty")


# ---------------------------------------------------------------- storage


def test_human_bytes_uses_1000_based_units() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(999) == "999 B"
    assert human_bytes(12_300_000) == "12.3 MB"
    assert human_bytes(999_700) == "1 MB"
    assert human_bytes(2.5e9) == "2.5 GB"


def test_storage_chart_shows_dedup_ratio_and_byte_ticks() -> None:
    steps = [100, 200, 300, 400]
    logical = [1_000_000_000 * i for i in range(1, 5)]
    physical = [1_000_000_000, 1_100_000_000, 1_200_000_000, 1_250_000_000]
    out = storage_chart("storage", steps, logical, physical, chart_id="s")
    root = parse(out)
    (ratio,) = with_class(root, "ratio")
    assert ratio.text == "dedup 3.2x"
    ticks = [t.text or "" for g in with_class(root, "ticks") for t in g]
    assert "0 B" in ticks and any(t.endswith(" GB") for t in ticks)
    assert len(with_class(root, "series")) == 2 and with_class(root, "saved")
    (script,) = with_class(root, "chart-data")
    assert json.loads(script.text or "")["y_unit"] == "bytes"


def test_storage_chart_without_saves_is_empty() -> None:
    root = parse(storage_chart("storage", [], [], []))
    assert with_class(root, "empty")
