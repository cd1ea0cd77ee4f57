"""REPORT.md of ``frog reproduce``: the figures, key numbers and a check of the paper's claims."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from ..training.results import Row

T = TypeVar("T")


def _is_true(value: object) -> bool:
    return str(value) in ("True", "true")


def _approx(rows: Sequence[Row], method: str, k: int, normalized: bool = False, angle: str = "") -> Row | None:
    for row in rows:
        if (row["method"] == method and int(row["k"]) == k and _is_true(row["normalized"]) == normalized
                and str(row.get("angle") or "") == angle and int(row["n"]) == 64):
            return row
    return None


def _found(value: T | None, what: str) -> T:
    """``value``, a result the claims need; ValueError naming ``what`` when the results lack it."""
    if value is None:
        raise ValueError(f"the results have no {what}")
    return value


def _cell(row: Row | None, metric: str) -> str:
    return "–" if row is None else f"{float(row[f'{metric}_mean']):.4f} ± {float(row[f'{metric}_ci']):.4f}"


def _best(summary: Sequence[Row], function: str, n: int, method: str, k: object, angle: str = "") -> float | None:
    for row in summary:
        if (row["function"] == function and int(row["n"]) == n and row["method"] == method
                and str(row["k"] or "") == str(k or "") and str(row["angle"] or "") == angle):
            return float(row["best_mean"])
    return None


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _compare(a: float, b: float) -> int:
    """-1 if a is clearly lower than b, 1 if clearly higher, 0 for a tie (relative 1e-3)."""
    if abs(a - b) <= 1e-3 * (abs(a) + abs(b) + 1e-9):
        return 0
    return -1 if a < b else 1


def claims(approx: Sequence[Row], angles: Sequence[Row], summary: Sequence[Row]) -> list[tuple[str, object, str]]:
    """(claim, holds, evidence) for each of the paper's claims (docs/reproducing.md, "Claims of the paper").

    holds is True, False, or "partly" (better more often than worse, but mostly tied)."""
    out: list[tuple[str, object, str]] = []
    ks = sorted({int(r["k"]) for r in approx if int(r["n"]) == 64})
    frog_cos = [float(_found(_approx(approx, "frog", k), f"frog row, k = {k}")["cosine_mean"]) for k in ks]
    mean_cos = [float(_found(_approx(approx, "mean", k), f"mean row, k = {k}")["cosine_mean"]) for k in ks]
    monotone = all(b >= a - 1e-9 for a, b in itertools.pairwise(frog_cos)) and all(
        b >= a - 0.01 for a, b in itertools.pairwise(mean_cos))
    out.append(("The approximation (cosine similarity) improves with k.", monotone,
                (f"n = 64: frog {frog_cos[0]:.3f} -> {frog_cos[-1]:.3f}, mean {mean_cos[0]:.3f} -> {mean_cos[-1]:.3f} "
                f"for k = {ks[0]} -> {ks[-1]}")))
    beaten = [k for k in ks if 1 < k and float(_found(_approx(approx, "frog", k), "frog row")["cosine_mean"]) + 1e-12
              < max(float(_found(_approx(approx, m, k, z), f"{m} row")["cosine_mean"])
                    for m in ("mean", "sum") for z in (False, True))]
    exact = _approx(approx, "frog", 64)
    exact = _found(exact, "frog row at k = n = 64")
    exact_ok = float(exact["cosine_mean"]) > 0.99999 and abs(float(exact["norm_ratio_mean"]) - 1) < 1e-4
    out.append(("frog is better than the conical combinations (sum, mean) and exact at k = n.",
                not beaten and exact_ok,
                (f"frog's cosine >= every conical combination at each k > 1 (exceptions: {beaten or 'none'}); "
                f"at k = n = 64: cosine {float(exact['cosine_mean']):.7f}, norm ratio {float(exact['norm_ratio_mean']):.7f}")))
    small, right = "15.0", "90.0"
    frog_small, frog_right = _approx(angles, "frog", 16, angle=small), _approx(angles, "frog", 16, angle=right)
    mean_small, mean_right = _approx(angles, "mean", 16, angle=small), _approx(angles, "mean", 16, angle=right)
    if frog_small is not None and frog_right is not None and mean_small is not None and mean_right is not None:
        stable = abs(float(frog_small["cosine_mean"]) - float(frog_right["cosine_mean"])) <= (
            float(frog_small["cosine_ci"]) + float(frog_right["cosine_ci"]) + 1e-9)
        degrades = float(mean_small["cosine_mean"]) < float(mean_right["cosine_mean"]) - float(mean_right["cosine_ci"])
        out.append(("frog stays accurate when tangents are nearly parallel, where the mean degrades.",
                    stable and degrades,
                    (f"k = 16, n = 64: frog cosine {float(frog_small['cosine_mean']):.3f} at 15 deg vs "
                    f"{float(frog_right['cosine_mean']):.3f} at 90 deg; mean {float(mean_small['cosine_mean']):.3f} vs "
                    f"{float(mean_right['cosine_mean']):.3f}")))
    fg_ks = sorted({int(r["k"]) for r in summary if r["method"] == "fg-mean"})
    cells = sorted({(str(r["function"]), int(r["n"])) for r in summary})
    if len(fg_ks) > 1:
        results = [_compare(_found(_best(summary, f, n, "fg-mean", fg_ks[-1]), f"fg-mean run {f} n = {n}"),
                            _found(_best(summary, f, n, "fg-mean", fg_ks[0]), f"fg-mean run {f} n = {n}"))
                   for f, n in cells]
        wins, ties, losses = results.count(-1), results.count(0), results.count(1)
        out.append(("In optimization more tangents help.", wins >= losses and wins > 0,
                    (f"fg-mean k = {fg_ks[-1]} vs k = {fg_ks[0]} over {len(cells)} (function, n): "
                    f"{wins} lower, {ties} equal, {losses} higher best value")))
    pairs = [(f, n, k) for f, n in cells for k in fg_ks if _best(summary, f, n, "frog", k) is not None]
    if pairs:
        results = [_compare(_found(_best(summary, f, n, "frog", k), f"frog run {f} n = {n} k = {k}"),
                            _found(_best(summary, f, n, "fg-mean", k), f"fg-mean run {f} n = {n} k = {k}"))
                   for f, n, k in pairs]
        wins, ties, losses = results.count(-1), results.count(0), results.count(1)
        dims = sorted({n for _, n, _ in pairs})
        large = [r for (f, n, k), r in zip(pairs, results, strict=False) if n == dims[-1]]
        verdict = "yes" if wins > losses and wins >= ties else ("partly" if wins > losses else False)
        out.append(("frog beats the mean at equal k, most in high dimension.", verdict,
                    (f"frog vs fg-mean over {len(pairs)} (function, n, k): {wins} lower, {ties} equal, {losses} higher; "
                    f"at n = {dims[-1]}: {large.count(-1)} lower, {large.count(0)} equal, {large.count(1)} higher")))
    return out


def _verdict(holds: object) -> str:
    return holds if isinstance(holds, str) else ("yes" if holds else "**no**")


def network_claims(networks: Sequence[Row]) -> list[tuple[str, bool, str]]:
    """The gap to backprop on networks: present at every (dataset, width), growing with width."""
    gaps: dict[tuple[str, int], float] = {}
    for dataset, width in sorted({(str(r["dataset"]), int(r["width"])) for r in networks}):
        cell = [r for r in networks if r["dataset"] == dataset and int(r["width"]) == width]
        bp = [float(r["test_accuracy"]) for r in cell if r["method"] == "bp"]
        fg = [float(r["test_accuracy"]) for r in cell if r["method"] in ("fg-mean", "fg-sum", "frog")]
        if bp and fg:
            gaps[(dataset, width)] = sum(bp) / len(bp) - max(fg)
    if not gaps:
        return []
    text = ", ".join(f"{d} width {w}: {g:+.3f}" for (d, w), g in gaps.items())
    out = [("On networks a gap to backprop remains.", all(g > 0 for g in gaps.values()),
            f"bp test accuracy minus the best forward-gradient one: {text}")]
    for dataset in sorted({d for d, _ in gaps}):
        widths = sorted(w for d, w in gaps if d == dataset)
        if len(widths) > 1:
            series = [gaps[(dataset, w)] for w in widths]
            out.append((f"The gap grows with model size ({dataset}).", series[-1] > series[0],
                        ", ".join(f"width {w}: {g:+.3f}" for w, g in zip(widths, series, strict=False))))
    return out


BEYOND_ROWS = [("bp", "backprop"), ("frog", "frog k = 16, the paper's shared tangents"),
               ("frog-guess", "frog k = 16, guesses from local heads"), ("local", "local learning, the same heads")]


def _mean_accuracy(rows: Sequence[Row], method: str, k: int | None = None) -> float | None:
    found = [float(r["test_accuracy"]) for r in rows if r["method"] == method and (k is None or str(r["k"]) == str(k))]
    return sum(found) / len(found) if found else None


def beyond_claims(networks: Sequence[Row]) -> list[tuple[str, object, str]]:
    """Beyond the paper: whether frog with guesses beats local learning with the same heads (mean test accuracy
    over the seeds, per dataset and width; a difference under 0.001 is a tie)."""
    out: list[tuple[str, object, str]] = []
    for dataset, width in sorted({(str(r["dataset"]), int(r["width"])) for r in networks if r["method"] == "local"}):
        cell = [r for r in networks if r["dataset"] == dataset and int(r["width"]) == width]
        guessed, local = _mean_accuracy(cell, "frog-guess"), _mean_accuracy(cell, "local")
        if guessed is None or local is None:
            continue
        holds: object = "tied" if abs(guessed - local) < 1e-3 else guessed > local
        out.append((f"frog with guesses beats local learning with the same heads ({dataset}, width {width}).", holds,
                    f"test accuracy {guessed:.4f} against {local:.4f}"))
    return out


def beyond_section(networks: Sequence[Row]) -> list[str]:
    """REPORT.md's "Beyond the paper" section: FC networks with backprop, the paper's frog, frog with
    guesses and local learning (the baseline that shows what frog's projection adds to the same heads)."""
    cells = sorted({(str(r["dataset"]), int(r["width"])) for r in networks if r["method"] == "local"})
    if not cells:
        return []
    lines = ["", "## Beyond the paper: guessed tangents and local learning", "",
             ("Test accuracy at the best validation epoch (mean over the seeds); the same runs as the table above "
              "where they overlap. Local learning trains each hidden block by its head's loss alone (no forward "
              "gradient); frog with guesses uses the same heads' gradients as tangents "
              "(docs/guides/closing-the-gap.md)."),
             "", "| dataset | width | " + " | ".join(name for _, name in BEYOND_ROWS) + " |",
             "|---|---|" + "---|" * len(BEYOND_ROWS)]
    for dataset, width in cells:
        cell = [r for r in networks if r["dataset"] == dataset and int(r["width"]) == width]
        values = [_mean_accuracy(cell, m, 16 if m == "frog" else None) for m, _ in BEYOND_ROWS]
        lines.append(f"| {dataset} | {width} | " + " | ".join("–" if v is None else f"{v:.4f}" for v in values) + " |")
    lines += ["", "| claim | holds | evidence |", "|---|---|---|"]
    lines += [f"| {c} | {_verdict(ok)} | {why} |" for c, ok, why in beyond_claims(networks)]
    return lines


def write_report(
    out: Path,
    variant: str,
    note: str,
    approx: Sequence[Row],
    angles: Sequence[Row],
    summary: Sequence[Row],
    angle_summary: Sequence[Row],
    networks: Sequence[Row],
    seconds: dict[str, float],
) -> Path:
    """Write ``out/REPORT.md`` and return its path."""
    lines = [f"# frog reproduction report ({variant} variant)", "", note, "",
             "Wall time: " + ", ".join(f"{name} {s:.1f} s" for name, s in seconds.items()), ""]
    lines += ["## Claims of the paper", "", "| claim | holds | evidence |", "|---|---|---|"]
    fc_all = [r for r in networks if r["model"] == "fc"]
    fc = [r for r in fc_all if r["method"] in ("bp", "fg-mean", "fg-sum", "frog")]
    table1 = [r for r in networks if r["model"] != "fc"]
    found = claims(approx, angles, summary) + network_claims(fc)
    lines += [f"| {c} | {_verdict(ok)} | {why} |" for c, ok, why in found]
    lines += ["", "## Approximation quality (Fig. 3), n = 64", "", "![approximation](approximation/approximation.png)", "",
              "| k | frog cosine | mean cosine | mean (normalized) cosine | frog norm ratio | mean norm ratio |",
              "|---|---|---|---|---|---|"]
    for k in sorted({int(r["k"]) for r in approx if int(r["n"]) == 64}):
        frog, mean, unit = _approx(approx, "frog", k), _approx(approx, "mean", k), _approx(approx, "mean", k, True)
        lines.append(f"| {k} | {_cell(frog, 'cosine')} | {_cell(mean, 'cosine')} | {_cell(unit, 'cosine')} | "
                     f"{_cell(frog, 'norm_ratio')} | {_cell(mean, 'norm_ratio')} |")
    lines += ["", "## Tangents at a fixed angle (Fig. 5), n = 64", "", "![angles](angles/approximation.png)", "",
              ("| angle | frog cos k=16 | mean cos k=16 | frog cos k=64 | mean cos k=64 | ST best/n fg-mean k=16 | "
              "ST best/n frog k=16 |"), "|---|---|---|---|---|---|---|"]
    for angle in sorted({str(r["angle"]) for r in angles}, key=float):
        cells = [_cell(_approx(angles, m, k, angle=angle), "cosine") for k in (16, 64) for m in ("frog", "mean")]
        best = [_best(angle_summary, "styblinski-tang", 64, m, 16, angle) for m in ("fg-mean", "frog")]
        per_dim = [_fmt(None if b is None else b / 64) for b in best]
        lines.append(f"| {float(angle):g} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {per_dim[0]} | {per_dim[1]} |")
    lines += ["", "## Closed-form optimization (Fig. 4): best value, mean over seeds", "",
              "![optimization](optimization/optimization.png)", ""]
    columns = sorted({(str(r["method"]), str(r["k"] or "")) for r in summary},
                     key=lambda mk: (["bp", "fg-mean", "frog"].index(mk[0]), int(mk[1] or 0)))
    lines += ["| function | n | minimum | " + " | ".join(f"{m} {('k=' + k) if k else ''}" for m, k in columns) + " |",
              "|---|---|---|" + "---|" * len(columns)]
    for function, n in sorted({(str(r["function"]), int(r["n"])) for r in summary}):
        minimum = next(float(r["minimum"]) for r in summary if r["function"] == function and int(r["n"]) == n)
        values = [_fmt(_best(summary, function, n, m, k)) for m, k in columns]
        lines.append(f"| {function} | {n} | {minimum:.4g} | " + " | ".join(values) + " |")
    for title, rows, size in (("Fully-connected networks (Sec. 4.4)", fc, "width"),
                              ("ResNet18 and ViT (Sec. 4.5, Table I)", table1, "model")):
        if rows:
            lines += ["", f"## {title}: test accuracy at the best validation epoch", "",
                      f"| dataset | {size} | method | k | seed | epochs | best val acc | test acc | s / epoch |",
                      "|---|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['dataset']} | {r[size]} | {r['method']} | {r['k'] or '–'} | {r['seed']} | {r['epochs']} | "
                      f"{float(r['best_val_accuracy']):.4f} | {float(r['test_accuracy']):.4f} | "
                      f"{float(r['seconds_per_epoch']):.1f} |" for r in rows]
    lines += beyond_section(fc_all)
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path
