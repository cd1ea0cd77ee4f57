"""The figures (frog.training.plots): each PNG has the size its layout asks for, and each panel draws the
rows it is given (read back from the figure before it is closed)."""

from __future__ import annotations

import struct

import matplotlib.figure
import pytest

from frog.training.plots import plot_approximation, plot_optimization, plot_tune


@pytest.fixture
def figures(monkeypatch):
    """The figures the plots save, kept for inspection."""
    saved = []
    save = matplotlib.figure.Figure.savefig

    def keep(self, *args, **kwargs):
        saved.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return saved


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def approx_row(n, k, method, normalized, cosine, ratio, angle=""):
    return {"n": str(n), "k": str(k), "method": method, "normalized": "true" if normalized else "false",
            "cosine_mean": str(cosine), "cosine_ci": "0.01", "norm_ratio_mean": str(ratio), "norm_ratio_ci": "0.02",
            "angle": angle}


def test_approximation_has_a_row_of_panels_per_dimension_and_a_line_per_method(tmp_path, figures):
    rows = [approx_row(n, k, m, z, 0.1 * k + (0.05 if m == "frog" else 0), n / k)
            for n in (4, 8) for k in (4, 1, 2) for m, z in (("frog", False), ("mean", False), ("mean", True))]
    path = plot_approximation(rows, tmp_path / "approximation.png")
    assert png_size(path) == (11 * 110, round(2 * 3.2 * 110))  # figsize (11, 3.2 per n) at 110 dpi
    (fig,) = figures
    cosine, ratio = fig.axes[0], fig.axes[1]  # n = 4
    assert cosine.get_title() == "cosine similarity, n = 4" and ratio.get_title() == "norm ratio, n = 4"
    assert fig.axes[2].get_title() == "cosine similarity, n = 8"
    assert cosine.get_xscale() == "log" and ratio.get_yscale() == "log"
    lines = {c.get_label(): c.lines[0] for c in cosine.containers}
    assert set(lines) == {"frog", "mean", "mean (normalized)"}
    assert list(lines["frog"].get_xdata()) == [1, 2, 4]  # sorted by k
    assert list(lines["frog"].get_ydata()) == pytest.approx([0.15, 0.25, 0.45])
    ratios = {c.get_label(): list(c.lines[0].get_ydata()) for c in ratio.containers}
    assert ratios["mean"] == pytest.approx([4.0, 2.0, 1.0])


def test_approximation_with_angles_has_a_row_per_angle(tmp_path, figures):
    rows = [approx_row(16, k, "frog", False, 0.5, 1.0, angle) for angle in ("15.0", "90.0") for k in (1, 4)]
    plot_approximation(rows, tmp_path / "angles.png")
    titles = [ax.get_title() for ax in figures[0].axes]
    assert titles == ["cosine similarity, n = 16, angle 15.0 deg", "norm ratio, n = 16, angle 15.0 deg",
                      "cosine similarity, n = 16, angle 90.0 deg", "norm ratio, n = 16, angle 90.0 deg"]


def summary_row(function, n, method, k, best, angle="", optimizer="sgd"):
    return {"function": function, "n": str(n), "method": method, "k": k, "angle": angle, "optimizer": optimizer,
            "best_mean": str(best)}


def test_optimization_has_a_panel_per_function_and_divides_styblinski_tang_by_n(tmp_path, figures):
    summary = [summary_row(f, n, m, k, best) for f in ("sphere", "styblinski-tang") for n in (8, 2)
               for m, k, best in (("bp", "", -3.0 * n), ("fg-mean", "4", -2.0 * n))]
    summary.append(summary_row("sphere", 8, "frog", "16", 0.5, angle="15.0", optimizer="line-search"))
    path = plot_optimization(summary, tmp_path / "optimization.png")
    assert png_size(path) == (round(2 * 5.5 * 110), 4 * 110)
    (fig,) = figures
    sphere, st = fig.axes
    assert (sphere.get_title(), st.get_title()) == ("sphere", "styblinski-tang")
    lines = {line.get_label(): line for line in st.lines}
    assert set(lines) == {"bp", "fg-mean k=4"}
    assert list(lines["bp"].get_xdata()) == [2, 8]
    assert list(lines["bp"].get_ydata()) == pytest.approx([-3.0, -3.0])  # best / n
    sphere_lines = {line.get_label(): line for line in sphere.lines}
    assert set(sphere_lines) == {"bp", "fg-mean k=4", "frog k=16 15.0 deg line-search"}
    assert list(sphere_lines["fg-mean k=4"].get_ydata()) == pytest.approx([-4.0, -16.0])  # not divided
    assert sphere.get_yscale() == "symlog" and st.get_yscale() == "linear"


def trial(lr, state, value=None, last=None):
    return {"lr": str(lr), "state": state, "value": None if value is None else str(value), "last_value": last}


def test_tune_marks_complete_best_pruned_and_diverged_trials(tmp_path, figures):
    studies = {
        "study gradient_approach=frog k=4": [trial(0.1, "complete", 2.0), trial(0.3, "complete", 1.0),
                                             trial(1.0, "pruned", last=5.0), trial(3.0, "diverged")],
        "b": [trial(0.1, "complete", 1.0)], "c": [trial(0.1, "complete", 1.0)], "d": [trial(0.1, "complete", 1.0)],
    }
    path = plot_tune(studies, tmp_path / "tune.png")
    assert png_size(path) == (3 * 5 * 100, round(2 * 3.4 * 100))  # 4 studies: 3 columns, 2 rows
    (fig,) = figures
    assert [ax.get_visible() for ax in fig.axes] == [True] * 4 + [False] * 2
    ax = fig.axes[0]
    assert ax.get_title() == "frog k=4" and ax.get_xscale() == "log"
    points = {c.get_label(): c.get_offsets().tolist() for c in ax.collections}
    assert points["complete"] == [[0.1, 2.0], [0.3, 1.0]]
    assert points["best"] == [[0.3, 1.0]]
    assert points["pruned"] == [[1.0, 5.0]]
    assert points["diverged"] == [[3.0, 5.0]]  # on the top edge: the largest value shown
