"""a2c.py with --num-envs 32 (the probe) against its default 16 envs and SB3's A2C on Breakout and Pong, at equal env steps:
the README's table, and this folder's results.json and curves.png (run from the repository root).

Each probe run is `OMP_NUM_THREADS=1 python benchmarks/benchmark.py --script a2c.py --env-ids GAMENoFrameskip-v4
--seeds 1 --ratio-runs 0 --eval --extra "--total-timesteps 2000000 --num-envs 32 --exp-name a2c-32envs"
--out benchmarks/results/a2c/atari-32envs-probe-GAMENoFrameskip-v4`, the two games at once on the two cores,
as the 16-env runs it is compared with ran (their folders below; older a2c.py code, the same defaults;
Pong seed 3, `atari-s3-PongNoFrameskip-v4`, ran later, alone, on the newest code).
The second probe adds `--learning-rate 1e-3` (the default 7e-4 times about √2, for the doubled batch) and
`lr1e-3` to the names, without --eval; its seed 2 (`--seeds 2`, `-s2` after `probe` in the folder's name) with
--eval. SB3's A2C (rl-zoo's Atari settings, `benchmarks/sb3_a2c.py`) is there for the issue's comparison at
equal env steps: its runs beside a2c.py (`atari-vs-sb3-GAME`, stopped at 1.3M steps) and Pong seed 1 to 2M,
`OMP_NUM_THREADS=1 python benchmarks/benchmark.py --ratio-runs 0 --script benchmarks/sb3_a2c.py --env-ids
PongNoFrameskip-v4 --seeds 1 --extra "--total-timesteps 2000000" --out benchmarks/results/a2c/sb3-PongNoFrameskip-v4-2M`,
beside a probe run.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, "benchmarks")
import benchmark  # noqa: E402

R = "benchmarks/results/a2c"
OUT = f"{R}/atari-32envs-probe"
SIXTEEN = ["atari-s1", "atari-s2-BreakoutNoFrameskip-v4", "atari-vs-sb3-BreakoutNoFrameskip-v4/ours",
           "atari-vs-sb3-PongNoFrameskip-v4/ours", "atari-s3-PongNoFrameskip-v4"]
MARKS = [250_000, 500_000, 1_000_000, 1_250_000, 1_500_000, 1_990_000]


def mean100(curve, step):
    """The mean of the last 100 games that ended by `step`; None if the run stopped before it."""
    s, r = np.array(curve["steps"]), np.array(curve["returns"])
    return float(r[s <= step][-100:].mean()) if s.max() >= step else None


runs = []
for folder in SIXTEEN:
    for r in json.load(open(f"{R}/{folder}/results.json")):
        runs.append(dict(r, script="a2c.py (16 envs)", folder=folder))
PROBES = {"atari-32envs-probe": "a2c.py --num-envs 32",  # folder name: label
          "atari-32envs-lr1e-3-probe": "a2c.py --num-envs 32 --learning-rate 1e-3"}
for name, label in PROBES.items():
    for game in ("Breakout", "Pong"):
        for seed in ("", "-s2"):
            path = f"{R}/{name}{seed}-{game}NoFrameskip-v4/results.json"
            if os.path.exists(path):
                runs += [dict(r, script=label, folder=os.path.relpath(os.path.dirname(path), R))
                         for r in json.load(open(path))]
for game in ("Breakout", "Pong"):  # compare_runs.py's results hold both runs of the pair
    folder = f"atari-vs-sb3-{game}NoFrameskip-v4"
    runs += [dict(r, folder=folder) for r in json.load(open(f"{R}/{folder}/results.json")) if r["script"] == "SB3 A2C"]
if os.path.exists(f"{R}/sb3-PongNoFrameskip-v4-2M/results.json"):
    runs += [dict(r, script="SB3 A2C", folder="sb3-PongNoFrameskip-v4-2M")
             for r in json.load(open(f"{R}/sb3-PongNoFrameskip-v4-2M/results.json"))]

print("| game | run | seed | " + " | ".join(f"at {m / 1e6:g}M" for m in MARKS) + " | eval | SPS | folder |")
print("|---|---|---|" + "---|" * len(MARKS) + "---|---|---|")
for game in ("BreakoutNoFrameskip-v4", "PongNoFrameskip-v4"):
    for r in sorted((r for r in runs if r["env_id"] == game), key=lambda r: (r["script"], r["seed"])):
        cells = " | ".join("—" if v is None else f"{v:.1f}" for v in (mean100(r["curve"], m) for m in MARKS))
        print(f"| {game[:-len('NoFrameskip-v4')]} | {r['script']} | {r['seed']} | {cells} "
              f"| {benchmark.fmt(r.get('eval'))} | {r['sps']:.0f} | `{r['folder']}` |")

print("\nMeans over runs (a mark counts only the runs that reached it; 16 envs on Breakout ran seed 1 twice):\n")
print("| game | run | runs | " + " | ".join(f"at {m / 1e6:g}M" for m in MARKS) + " |")
print("|---|---|---|" + "---|" * len(MARKS))
for game in ("BreakoutNoFrameskip-v4", "PongNoFrameskip-v4"):
    for script in sorted({r["script"] for r in runs if r["env_id"] == game}):
        group = [r for r in runs if r["env_id"] == game and r["script"] == script]
        means = []
        for m in MARKS:
            values = [v for v in (mean100(r["curve"], m) for r in group) if v is not None]
            means.append(f"{np.mean(values):.1f} ({len(values)})" if values else "—")
        print(f"| {game[:-len('NoFrameskip-v4')]} | {script} | {len(group)} | " + " | ".join(means) + " |")
os.makedirs(OUT, exist_ok=True)
json.dump(runs, open(f"{OUT}/results.json", "w"))
benchmark.plot(runs, f"{OUT}/curves.png")
