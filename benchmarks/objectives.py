"""The PPO paper's Table 1 for the runs benchmarks/kl_penalty.sh makes: which objective learns best.

    python benchmarks/objectives.py benchmarks/results/ppo_continuous/objectives

The folder holds a benchmark.py --out folder per setting (cpi, clip, kl-adapt, kl-fixed) and env. As in
the paper (Schulman et al. 2017, section 6.1): a run's score is the mean return of its last 100
episodes; per env, a setting's score is the mean over its seeds, normalised so that a random
policy scores 0 and the best setting 1; the table averages that over the envs. The random
policy's score is measured here: uniform random actions for 100 episodes (seeds 0-99) of each env.
Writes results.md (the table, beside the paper's) and curves.png into the folder.
"""

import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plot  # noqa: E402

SETTINGS = {"cpi": "no clipping or penalty", "clip": "clipping, ε = 0.2", "kl-adapt": "adaptive KL, d_targ = 0.01",
            "kl-fixed": "fixed KL, β = 1"}
PAPER = {"cpi": -0.39, "clip": 0.82, "kl-adapt": 0.74, "kl-fixed": 0.71}  # its Table 1, 7 MuJoCo envs, 1M steps


def random_score(env_id, episodes=100):
    import gymnasium as gym
    env = gym.make(env_id)
    env.action_space.seed(0)
    returns = []
    for seed in range(episodes):
        env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    return float(np.mean(returns))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    a = p.parse_args(argv)
    runs = {}
    for s in SETTINGS:  # FOLDER/SETTING/ENV_ID/results.json, as kl_penalty.sh writes them
        for path in sorted(glob.glob(os.path.join(a.folder, s, "**", "results.json"), recursive=True)):
            with open(path) as f:
                runs.setdefault(s, []).extend(json.load(f))
    if not runs:
        p.exit(2, f"objectives.py: no setting's results.json under {a.folder}\n")
    envs = sorted({r["env_id"] for results in runs.values() for r in results})
    score = {(s, e): float(np.mean([r["final100"] for r in results if r["env_id"] == e])) for s, results in runs.items()
             for e in envs if any(r["env_id"] == e for r in results)}
    random = {e: random_score(e) for e in envs}
    best = {e: max(score[s, e] for s in runs if (s, e) in score) for e in envs}
    lines = ["| setting | " + " | ".join(f"{e} (seeds)" for e in envs) + " | normalised score (ours) | the paper's |",
             "|---|" + "---|" * len(envs) + "---|---|",
             "| random policy | " + " | ".join(f"{random[e]:.1f}" for e in envs) + " | 0 | 0 |"]
    for s in SETTINGS:
        if s not in runs:
            continue
        cells = []
        for e in envs:
            seeds = [r["final100"] for r in runs[s] if r["env_id"] == e]
            cells.append(f"{np.mean(seeds):.1f} ± {np.std(seeds):.1f} ({len(seeds)})" if seeds else "—")
        normalised = [(score[s, e] - random[e]) / (best[e] - random[e]) for e in envs if (s, e) in score]
        lines.append(f"| {SETTINGS[s]} | " + " | ".join(cells) + f" | {np.mean(normalised):.2f} | {PAPER[s]:.2f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(a.folder, "results.md"), "w") as f:
        f.write(table + "\n")
    results = [dict(r, script=s) for s, rs in runs.items() for r in rs]
    plot.benchmark.plot(results, os.path.join(a.folder, "curves.png"))


if __name__ == "__main__":
    main()
