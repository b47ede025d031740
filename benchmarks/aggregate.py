"""Summarise benchmark runs over seeds as Agarwal et al. (2021) recommend, and check targets.

    python benchmarks/aggregate.py benchmarks/results/ppo_continuous/mujoco/results.json \
        --targets HalfCheetah-v5=3000 Hopper-v5=2500 Walker2d-v5=3000

For each env in the results.json files that benchmark.py writes, over its seeds' final scores
(`final100`, the mean of each run's last 100 training episodes):
  - the mean ± std (population std, as benchmark.py's table);
  - the interquartile mean (IQM: the mean of the middle 50% of the sorted scores, trimming
    int(n/4) from each end, as scipy.stats.trim_mean(x, 0.25)), and its 95% confidence interval
    from the percentile bootstrap over seeds (resample the n runs with replacement);
  - with --targets, whether the target lies below the interval (met), inside it (not shown
    either way at 95%), or above it (missed).
"Deep Reinforcement Learning at the Edge of the Statistical Precipice", NeurIPS 2021. Writes
a Markdown table to stdout, and to --out if given.
"""

import argparse
import json
import os

import numpy as np


def iqm(scores: np.ndarray) -> np.ndarray:
    """Interquartile mean along the last axis: the mean of the sorted scores without the int(n/4) at each end."""
    n = scores.shape[-1]
    k = n // 4
    return np.sort(scores, axis=-1)[..., k:n - k].mean(-1)


def bootstrap_ci(scores: np.ndarray, statistic=iqm, resamples: int = 50_000, seed: int = 0) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of `statistic` over resamples of the runs, drawn with replacement."""
    rng = np.random.default_rng(seed)
    draws = scores[rng.integers(len(scores), size=(resamples, len(scores)))]
    low, high = np.percentile(statistic(draws), [2.5, 97.5])
    return float(low), float(high)


def verdict(target: float, low: float, high: float) -> str:
    if target <= low:
        return "met (target below the 95% CI)"
    if target > high:
        return "missed (target above the 95% CI)"
    return "not shown at 95% (target inside the CI)"


def env_and_score(text: str) -> tuple[str, float]:
    """ENV=SCORE, as --targets takes it."""
    env_id, _, score = text.partition("=")
    try:
        return env_id, float(score)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ENV=SCORE (e.g. HalfCheetah-v5=3000)") from None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results.json files written by benchmarks/benchmark.py")
    p.add_argument("--targets", nargs="*", default=[], type=env_and_score,
                   help="ENV=SCORE pairs to check against the IQM's interval")
    p.add_argument("--out", default=None, help="also write the table here")
    a = p.parse_args()
    targets = dict(a.targets)
    missing = [path for path in a.results if not os.path.isfile(path)]
    if missing:
        p.error(f"not a results.json file: {missing[0]}")
    runs = [r for path in a.results for r in json.load(open(path))]
    envs = list(dict.fromkeys(r["env_id"] for r in runs))
    lines = ["| env | seeds | final per seed | mean ± std | IQM [95% bootstrap CI] | target | verdict |",
             "|---|---|---|---|---|---|---|"]
    for env_id in envs:
        mine = sorted((r for r in runs if r["env_id"] == env_id), key=lambda r: r["seed"])
        scores = np.array([r["final100"] for r in mine])
        low, high = bootstrap_ci(scores)
        target = targets.get(env_id)
        lines.append(f"| {env_id} | {', '.join(str(r['seed']) for r in mine)} "
                     f"| {', '.join(f'{s:.0f}' for s in scores)} | {scores.mean():.0f} ± {scores.std():.0f} "
                     f"| {iqm(scores):.0f} [{low:.0f}, {high:.0f}] "
                     f"| {'—' if target is None else f'≥ {target:.0f}'} "
                     f"| {'—' if target is None else verdict(target, low, high)} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
