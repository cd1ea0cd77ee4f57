"""REPORT.md (frog.experiments.report): each claim of the paper judged on results built to make it hold or
fail, the networks' gap to backprop, and the tables written from the rows."""

from __future__ import annotations

import pytest

from frog.experiments.report import beyond_claims, beyond_section, claims, network_claims, write_report

COSINES = {  # n = 64, k -> cosine: frog rises to exact at k = n, the conical combinations stay below
    ("frog", False): {1: 0.30, 4: 0.50, 64: 1.0},
    ("mean", False): {1: 0.30, 4: 0.40, 64: 0.45},
    ("sum", False): {1: 0.30, 4: 0.40, 64: 0.45},
    ("mean", True): {1: 0.30, 4: 0.45, 64: 0.50},
    ("sum", True): {1: 0.30, 4: 0.45, 64: 0.50},
}


def approx_rows(cosines=COSINES, n=64):
    return [{"n": str(n), "k": str(k), "method": method, "normalized": str(normalized).lower(),
             "cosine_mean": str(cos), "cosine_ci": "0.01", "norm_ratio_mean": "1.0" if method == "frog" else "0.5",
             "norm_ratio_ci": "0.02", "angle": ""}
            for (method, normalized), by_k in cosines.items() for k, cos in by_k.items()]


def angle_rows(frog=(0.8, 0.8), mean=(0.2, 0.6)):
    return [{"n": "64", "k": "16", "method": method, "normalized": "false", "cosine_mean": str(cos),
             "cosine_ci": "0.01", "norm_ratio_mean": "1.0", "norm_ratio_ci": "0.01", "angle": angle}
            for method, values in (("frog", frog), ("mean", mean)) for angle, cos in zip(("15.0", "90.0"), values, strict=True)]


def summary_rows(best):
    """best: (function, n, method, k) -> best value."""
    return [{"function": f, "n": n, "method": m, "k": k, "angle": "", "optimizer": "sgd", "best_mean": value,
             "minimum": 0.0} for (f, n, m, k), value in best.items()]


BEST = {("sphere", 8, "fg-mean", 1): 4.0, ("sphere", 8, "fg-mean", 16): 1.0, ("sphere", 8, "frog", 16): 0.5,
        ("sphere", 64, "fg-mean", 1): 40.0, ("sphere", 64, "fg-mean", 16): 30.0, ("sphere", 64, "frog", 16): 3.0,
        ("sphere", 8, "bp", None): 0.0}


def verdicts(found):
    return {claim: holds for claim, holds, _ in found}


def test_every_claim_holds_on_results_that_show_it():
    found = claims(approx_rows(), angle_rows(), summary_rows(BEST))
    assert len(found) == 5
    assert list(verdicts(found).values()) == [True, True, True, True, "yes"]
    evidence = [why for _, _, why in found]
    assert "frog 0.300 -> 1.000, mean 0.300 -> 0.450 for k = 1 -> 64" in evidence[0]
    assert "exceptions: none" in evidence[1] and "cosine 1.0000000, norm ratio 1.0000000" in evidence[1]
    assert "frog vs fg-mean over 2 (function, n, k): 2 lower, 0 equal, 0 higher" in evidence[4]


def test_claims_fail_on_results_that_contradict_them():
    cosines = {**COSINES, ("sum", True): {1: 0.30, 4: 0.60, 64: 0.50}}  # normalized sum beats frog at k = 4
    cosines[("frog", False)] = {1: 0.30, 4: 0.50, 64: 0.99}  # and frog is not exact at k = n
    worse = {**BEST, ("sphere", 8, "frog", 16): 2.0, ("sphere", 64, "frog", 16): 30.0}  # frog loses once, ties once
    found = claims(approx_rows(cosines), angle_rows(frog=(0.5, 0.8), mean=(0.6, 0.6)), summary_rows(worse))
    holds = list(verdicts(found).values())
    assert holds[0] is True  # still rising with k
    assert holds[1] is False and "exceptions: [4]" in found[1][2]
    assert holds[2] is False  # frog falls at 15 degrees; the mean does not degrade
    assert holds[4] is False  # 0 lower, 1 equal, 1 higher
    more_tangents_lose = {**BEST, ("sphere", 8, "fg-mean", 16): 5.0, ("sphere", 64, "fg-mean", 16): 50.0}
    assert verdicts(claims(approx_rows(), angle_rows(), summary_rows(more_tangents_lose)))[
        "In optimization more tangents help."] is False


def test_mostly_ties_make_frog_beat_the_mean_partly():
    best = {**BEST, ("sphere", 8, "frog", 16): 1.0, ("sphere", 16, "fg-mean", 1): 4.0,
            ("sphere", 16, "fg-mean", 16): 2.0, ("sphere", 16, "frog", 16): 2.0}  # 1 lower, 2 equal, 0 higher
    assert claims(approx_rows(), angle_rows(), summary_rows(best))[-1][1] == "partly"


def test_missing_results_are_named():
    cosines = {key: {k: c for k, c in by_k.items() if k != 64} for key, by_k in COSINES.items()}
    with pytest.raises(ValueError, match="the results have no frog row at k = n = 64"):
        claims(approx_rows(cosines), [], [])
    # without angle rows or optimization results those claims are left out
    assert len(claims(approx_rows(), [], [])) == 2


def network_rows(accuracies):
    return [{"dataset": d, "model": "fc", "width": w, "method": m, "k": k, "seed": 0, "epochs": 1, "best_epoch": 1,
             "best_val_accuracy": acc, "test_accuracy": acc, "seconds_per_epoch": 2.0}
            for (d, w, m, k), acc in accuracies.items()]


def test_the_gap_to_backprop_and_its_growth():
    rows = network_rows({("digits", 16, "bp", None): 0.9, ("digits", 16, "fg-mean", 4): 0.7,
                         ("digits", 16, "frog", 4): 0.8, ("digits", 64, "bp", None): 0.95,
                         ("digits", 64, "frog", 4): 0.75})
    (gap, growth) = network_claims(rows)
    assert gap[1] is True and "digits width 16: +0.100, digits width 64: +0.200" in gap[2]
    assert growth[0] == "The gap grows with model size (digits)." and growth[1] is True
    closed = network_rows({("digits", 16, "bp", None): 0.9, ("digits", 16, "frog", 4): 0.95})
    assert network_claims(closed) == [("On networks a gap to backprop remains.", False,
                                       "bp test accuracy minus the best forward-gradient one: digits width 16: -0.050")]
    assert network_claims(network_rows({("digits", 16, "bp", None): 0.9})) == []  # nothing to compare


def test_write_report_writes_the_claims_and_tables(tmp_path):
    networks = network_rows({("digits", 16, "bp", None): 0.9, ("digits", 16, "frog", 4): 0.8})
    networks.append({**networks[0], "model": "resnet18", "method": "frog", "k": 4, "test_accuracy": 0.5})
    summary = summary_rows(BEST)
    path = write_report(tmp_path, "tiny", "A note.", approx_rows(), angle_rows(), summary, [], networks,
                        {"approx": 1.25, "networks": 10.0})
    assert path == tmp_path / "REPORT.md"
    lines = path.read_text().splitlines()
    assert lines[0] == "# frog reproduction report (tiny variant)" and "A note." in lines
    assert "Wall time: approx 1.2 s, networks 10.0 s" in lines
    claim_lines = [line for line in lines if line.startswith(("| The approximation", "| On networks"))]
    assert [line.split(" | ")[1] for line in claim_lines] == ["yes", "yes"]
    assert "| 4 | 0.5000 ± 0.0100 | 0.4000 ± 0.0100 | 0.4500 ± 0.0100 | 1.0000 ± 0.0200 | 0.5000 ± 0.0200 |" in lines
    assert "| sphere | 8 | 0 | 0 | 4 | 1 | 0.5 |" in lines  # bp, fg-mean k=1, fg-mean k=16, frog k=16
    assert "| function | n | minimum | bp  | fg-mean k=1 | fg-mean k=16 | frog k=16 |" in lines
    assert "| digits | 16 | frog | 4 | 0 | 1 | 0.8000 | 0.8000 | 2.0 |" in lines
    assert "## ResNet18 and ViT (Sec. 4.5, Table I): test accuracy at the best validation epoch" in lines
    assert "| digits | resnet18 | frog | 4 | 0 | 1 | 0.9000 | 0.5000 | 2.0 |" in lines


def test_the_gap_counts_the_papers_forward_gradients_only():
    """frog with guesses or local learning closing the gap does not close the paper's."""
    rows = network_rows({("digits", 16, "bp", None): 0.9, ("digits", 16, "frog", 16): 0.7,
                         ("digits", 16, "frog-guess", 16): 0.95, ("digits", 16, "local", None): 0.92})
    ((_, holds, why),) = network_claims(rows)
    assert holds is True and "digits width 16: +0.200" in why


def test_beyond_the_paper_claims_and_table():
    rows = network_rows({("digits", 16, "bp", None): 0.9, ("digits", 16, "frog", 16): 0.7,
                         ("digits", 16, "frog-guess", 16): 0.85, ("digits", 16, "local", None): 0.8,
                         ("digits", 64, "frog-guess", 16): 0.8, ("digits", 64, "local", None): 0.8004,
                         ("mnist", 16, "frog-guess", 16): 0.5, ("mnist", 16, "local", None): 0.6,
                         ("fashion", 16, "frog-guess", 16): 0.5})  # no local run there: no claim
    rows.append({**rows[2], "seed": 1, "test_accuracy": 0.75})  # frog-guess at width 16: mean 0.8 over two seeds
    found = beyond_claims(rows)
    assert [(claim.split("(")[1], holds) for claim, holds, _ in found] == [
        ("digits, width 16).", "tied"), ("digits, width 64).", "tied"), ("mnist, width 16).", False)]
    assert found[2][2] == "test accuracy 0.5000 against 0.6000"
    rows[3]["test_accuracy"] = 0.7  # local at width 16 falls behind
    assert beyond_claims(rows)[0][1] is True
    lines = beyond_section(rows)
    assert "## Beyond the paper: guessed tangents and local learning" in lines
    assert "| digits | 16 | 0.9000 | 0.7000 | 0.8000 | 0.7000 |" in lines  # bp, frog k = 16, frog-guess, local
    assert "| mnist | 16 | – | – | 0.5000 | 0.6000 |" in lines
    assert beyond_section(network_rows({("digits", 16, "bp", None): 0.9})) == []  # no local runs: no section
