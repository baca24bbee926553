"""The benchmark plots a user reads, drawn from the committed results: whole-number round
ticks, titled heatmap axes, a memory axis from zero, and legend entries a reader can decode."""

from __future__ import annotations

import json

import matplotlib.figure
import pytest
from helpers import ROOT

BENCH = ROOT / "docs" / "benchmarks"


@pytest.fixture
def figures(monkeypatch):
    """Every figure a write_outputs call saves, instead of the PNG files."""
    saved: list[matplotlib.figure.Figure] = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    return saved


def _results(name: str) -> dict:
    return json.loads((BENCH / name / "results.json").read_text())


def test_round_axes_have_whole_number_ticks(tmp_path, figures):
    from node.app.bench import algorithms

    res = _results("algorithms/alpha0.1")
    algorithms.write_outputs(res["runs"], tmp_path, res["meta"])
    rounds_axis = figures[0].axes[0]
    lo, hi = rounds_axis.get_xlim()
    ticks = [t for t in rounds_axis.get_xticks() if lo <= t <= hi]
    assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks), ticks


def test_the_byzantine_heatmap_names_its_axes(tmp_path, figures):
    from node.app.bench import byzantine

    res = _results("byzantine")
    byzantine.write_outputs(res["rows"], tmp_path, res["meta"])
    heatmaps = [ax for ax in figures[0].axes if ax.images]
    assert heatmaps and all(ax.get_xlabel() == "attack" and ax.get_ylabel() == "aggregator" for ax in heatmaps)


def test_the_scale_plot_starts_its_axes_at_zero(tmp_path, figures):
    from node.app.bench import scale

    res = _results("scale")
    scale.write_outputs(res["rows"], tmp_path, res["meta"])
    assert [ax.get_ylim()[0] for ax in figures[0].axes] == [0, 0]


def test_transport_legend_says_what_each_path_is(tmp_path, figures):
    from node.app.bench import transport

    res = _results("transport")
    transport.write_outputs([transport.Row(**r) for r in res["rows"]], tmp_path, res["meta"])
    labels = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert labels and not set(labels) & set(transport.PATHS), labels
    assert "bare gRPC byte stream, no checks" in labels
