"""ppo.py's Pong seeds and CleanRL's, at equal env steps, from the benchmarks' results.json files: the README's
table (run from the repository root), and this folder's results.json for benchmarks/plot.py.

Runs stopped by SIGTERM short of their 2M-step schedule (CleanRL seeds 2 and 3, ppo.py seed 4) are read from
their compared/results.json (in git), which compare_runs.py makes here from their TensorBoard logs (runs/, not
in git) only where it is missing."""
import json, os, sys, subprocess
import numpy as np
R = "benchmarks/results/ppo"
OUT = f"{R}/atari-pong-seeds-vs-cleanrl"
def entries(path, **match):
    return [r for r in json.load(open(path)) if all(r.get(k) == v for k, v in match.items())]
def stopped(folder, seed, label):
    if not os.path.exists(f"{folder}/compared/results.json"):
        subprocess.run([sys.executable, "benchmarks/compare_runs.py", "--env-id", "PongNoFrameskip-v4", "--seed", str(seed),
                        "--runs", f"{label}={folder}", "--at", "250000", "--out", f"{folder}/compared"], check=True,
                       stdout=subprocess.DEVNULL)
    return entries(f"{folder}/compared/results.json")
runs = (entries(f"{R}/atari-vs-cleanrl-PongNoFrameskip-v4/results.json")            # ppo.py s1, CleanRL s1
        + entries(f"{R}/atari-s2/results.json", env_id="PongNoFrameskip-v4")          # ppo.py s2
        + entries(f"{R}/atari-s3-PongNoFrameskip-v4/results.json")                    # ppo.py s3
        + stopped(f"{R}/atari-s4-PongNoFrameskip-v4", 4, "ppo.py")                    # ppo.py s4
        + stopped(f"{R}/atari-cleanrl-s2-PongNoFrameskip-v4", 2, "CleanRL ppo_atari.py")
        + stopped(f"{R}/atari-cleanrl-s3-PongNoFrameskip-v4", 3, "CleanRL ppo_atari.py"))
marks = [250_000, 500_000, 750_000, 900_000, 950_000]
def mean100(curve, step):
    s, r = np.array(curve["steps"]), np.array(curve["returns"])
    return float(r[s <= step][-100:].mean())
table = {}
for r in runs:
    reached = max(r["curve"]["steps"])
    table.setdefault(r["script"], []).append((str(r["seed"]), [mean100(r["curve"], m) if reached >= m else None for m in marks], reached))
for script, rows in table.items():
    for seed, vals, reached in sorted(rows):
        print(f"| {script} | {seed} | " + " | ".join("—" if v is None else f"{v:.1f}" for v in vals) + f" | (last episode at {int(reached):,}) |")
    means = [np.mean([v[i] for _, v, _ in rows]) if all(v[i] is not None for _, v, _ in rows) else None for i in range(len(marks))]
    print(f"| {script} | mean of {len(rows)} | " + " | ".join("—" if v is None else f"{v:.1f}" for v in means) + " |")
os.makedirs(OUT, exist_ok=True)
json.dump(runs, open(f"{OUT}/results.json", "w"))
