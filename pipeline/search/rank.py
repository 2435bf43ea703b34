"""Naming a winner that holds up: candidates ranked by their mean over fresh seeds (pure).

A re-check retrains a study's best few trials with the same fresh training seeds each (paired).
Here, over plain rows ``{"candidate", "seed", "value", "test_acc"}`` (one per re-check run):

- each candidate's mean, standard deviation and 95 % t-interval of the objective over its seeds,
  and the same for test accuracy (reported, never used to rank);
- the ranking: best mean first, ties by trial number (the earlier trial);
- ``selection_optimism``: the winner's own single-run value (the one the search selected it on)
  minus its re-check mean, i.e. how much that selection flattered it;
- the winner against the runner-up, paired over the seeds both ran: the mean difference and its
  95 % t-interval; when the interval contains 0 the two cannot be told apart.

The original runs are left out of the means: they were chosen for being high.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

CONFIDENCE = 0.95


def recheck_seed(study_seed: int, index: int) -> int:
    """The training seed of re-check ``index`` (0, 1, ...): the same for every candidate (paired),
    and never a trial's seed (pipeline.search.objective.trial_seed: study_seed * 1_000_003 +
    trial number, with trial numbers far below 2**30)."""
    return (study_seed * 1_000_003 + 2**30 + index) % 2**31


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of the mean; (nan, nan) with fewer than two values."""
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    if sd == 0:
        return mean, mean
    from scipy import stats  # 1.4 s to import: only where an interval is asked for

    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=sd / math.sqrt(n))
    return float(low), float(high)


def _describe(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def rank_candidates(rows: Sequence[Mapping], originals: Mapping[int, float],
                    direction: str = "maximize", confidence: float = CONFIDENCE) -> dict:
    """The re-check's verdict (see the module docstring). ``originals``: each candidate's
    single-run objective from the search. Candidates without a re-check run are left out."""
    by_candidate: dict[int, dict[int, Mapping]] = {}
    for row in rows:
        if row.get("value") is not None and math.isfinite(row["value"]):
            by_candidate.setdefault(int(row["candidate"]), {})[int(row["seed"])] = row
    sign = -1.0 if direction == "maximize" else 1.0
    table = []
    for number, runs in by_candidate.items():
        values = [r["value"] for r in runs.values()]
        tests = [r["test_acc"] for r in runs.values() if r.get("test_acc") is not None]
        mean, sd = _describe(values)
        low, high = t_interval(values, confidence)
        test_mean, test_sd = _describe(tests)
        original = originals.get(number, math.nan)
        table.append({"candidate": number, "n": len(values), "val_mean": mean, "val_std": sd,
                      "val_ci_low": low, "val_ci_high": high, "test_mean": test_mean,
                      "test_std": test_sd, "original": original,
                      "optimism": original - mean if direction == "maximize"
                      else mean - original})
    table.sort(key=lambda r: (sign * r["val_mean"], r["candidate"]))
    out = {"ranking": table, "winner": None, "runner_up": None, "confidence": confidence}
    if not table:
        return out
    out["winner"] = table[0]["candidate"]
    out["selection_optimism"] = table[0]["optimism"]
    if len(table) > 1:
        out["runner_up"] = table[1]["candidate"]
        out["difference"] = paired_difference(by_candidate[table[0]["candidate"]],
                                              by_candidate[table[1]["candidate"]], confidence)
    return out


def paired_difference(a: Mapping[int, Mapping], b: Mapping[int, Mapping],
                      confidence: float = CONFIDENCE) -> dict:
    """``a`` minus ``b`` over the seeds both ran: mean, t-interval, and whether it excludes 0."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s]["value"] - b[s]["value"] for s in seeds]
    mean = statistics.fmean(diffs) if diffs else math.nan
    low, high = t_interval(diffs, confidence)
    distinguishable = bool(diffs) and math.isfinite(low) and (low > 0 or high < 0)
    return {"n": len(diffs), "mean": mean, "ci_low": low, "ci_high": high,
            "distinguishable": distinguishable}


def _pm(mean: float, sd: float) -> str:
    return f"{mean:.4f}" + (f" ± {sd:.4f}" if math.isfinite(sd) else "")


def headline(verdict: dict, metric: str = "val_acc") -> list[str]:
    """The verdict in a few sentences: the winner as mean ± standard deviation over the fresh
    seeds with its interval, the runner-up and whether the two can be told apart, and how much
    the search's own number flattered the winner."""
    if verdict.get("winner") is None:
        return ["re-check: no candidate completed a re-check run"]
    win = verdict["ranking"][0]
    pct = round(100 * verdict.get("confidence", CONFIDENCE))
    lines = [f"winner: trial {win['candidate']}, {metric} {_pm(win['val_mean'], win['val_std'])} "
             f"({pct} % interval {win['val_ci_low']:.4f} to {win['val_ci_high']:.4f}), "
             f"test_acc {_pm(win['test_mean'], win['test_std'])}, over {win['n']} fresh seeds "
             f"({verdict.get('varied', 'weight initialisation and data order')} varied)"]
    if (diff := verdict.get("difference")) and verdict.get("runner_up") is not None:
        second = verdict["ranking"][1]
        verdict_text = ("the two can be told apart" if diff["distinguishable"] else
                        "the two cannot be told apart: the interval contains 0")
        lines.append(f"runner-up: trial {second['candidate']}, {metric} "
                     f"{_pm(second['val_mean'], second['val_std'])}; paired difference "
                     f"{diff['mean']:+.4f} ({pct} % interval {diff['ci_low']:+.4f} to "
                     f"{diff['ci_high']:+.4f}, {diff['n']} seeds): {verdict_text}")
    lines.append(f"selection optimism {verdict['selection_optimism']:+.4f}: the search's own run "
                 f"of trial {win['candidate']} said {win['original']:.4f}, its re-check mean is "
                 f"{win['val_mean']:.4f}")
    return lines

