"""ppo.py on Pong with one thing changed from its defaults (the probes), against ppo.py's defaults and CleanRL's
ppo_atari.py, at equal env steps: the README's table, and this folder's results.json and curves.png (run from
the repository root).

Each flag probe run is `python benchmarks/benchmark.py --ratio-runs 0 --script ppo.py --env-ids PongNoFrameskip-v4
--seeds S --extra "--total-timesteps 2000000 FLAG" --out benchmarks/results/ppo/atari-NAME-probe-sS` (the
2M-step schedule of the runs it is compared with), stopped by SIGTERM past 950k steps; the env probe runs
`--script benchmarks/ppo_cleanrl_env_probe.py` with `--exp-name ppo-cleanrl-env` added, the same way. Its curve is read
from its compared/results.json (in git), which compare_runs.py makes here from the run's TensorBoard log
(runs/, not in git) only where it is missing.
"""
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, "benchmarks")
import benchmark  # noqa: E402

R = "benchmarks/results/ppo"
OUT = f"{R}/atari-pong-probes"
PROBES = {"clip-vloss": "ppo.py --clip-vloss", "float32": "ppo.py --cnn-precision float32",  # folder name: label
          "cleanrl-env": "ppo.py on CleanRL's env"}
MARKS = [250_000, 500_000, 750_000, 900_000, 950_000]


def probe_runs(name, label):
    runs = []
    prefix = f"atari-{name}-probe-s"
    for seed in sorted(int(d[len(prefix):]) for d in os.listdir(R) if d.startswith(prefix)):
        folder = f"{R}/{prefix}{seed}"
        if not os.path.exists(f"{folder}/compared/results.json"):
            subprocess.run([sys.executable, "benchmarks/compare_runs.py", "--env-id", "PongNoFrameskip-v4",
                            "--seed", str(seed), "--runs", f"{label}={folder}", "--at", "250000",
                            "--out", f"{folder}/compared"], check=True, stdout=subprocess.DEVNULL)
        runs += json.load(open(f"{folder}/compared/results.json"))
    return runs


def mean100(curve, step):
    """The mean of the last 100 games that ended by `step`; None if the run stopped before it."""
    s, r = np.array(curve["steps"]), np.array(curve["returns"])
    return float(r[s <= step][-100:].mean()) if s.max() >= step else None


if not os.path.exists(f"{R}/atari-pong-seeds-vs-cleanrl/results.json"):
    subprocess.run([sys.executable, f"{R}/atari-pong-seeds-vs-cleanrl/gather.py"], check=True, stdout=subprocess.DEVNULL)
runs = json.load(open(f"{R}/atari-pong-seeds-vs-cleanrl/results.json"))  # ppo.py's defaults and CleanRL
for name, label in PROBES.items():
    runs += probe_runs(name, label)

groups = {}
for r in runs:
    groups.setdefault(r["script"], []).append(r)
print("| run | seed | " + " | ".join(f"at {m // 1000}k" for m in MARKS) + " |")
print("|---|---|" + "---|" * len(MARKS))
for script, rs in groups.items():
    for r in sorted(rs, key=lambda r: r["seed"]):
        print(f"| {script} | {r['seed']} | " + " | ".join("—" if v is None else f"{v:.1f}"
                                                       for v in (mean100(r["curve"], m) for m in MARKS)) + " |")
    cells = []
    for m in MARKS:
        values = [mean100(r["curve"], m) for r in rs]
        cells.append("—" if None in values else f"{np.mean(values):.1f}")
    print(f"| {script} | **mean of {len(rs)}** | " + " | ".join(cells) + " |")
os.makedirs(OUT, exist_ok=True)
json.dump(runs, open(f"{OUT}/results.json", "w"))
benchmark.plot(runs, f"{OUT}/curves.png")  # by env step; the wall-time panel mixes machines' loads
