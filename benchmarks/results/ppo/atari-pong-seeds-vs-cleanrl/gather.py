"""ppo.py's Pong seeds and CleanRL's, at equal env steps, from the benchmarks' results.json files: the README's
table (run from the repository root), and this folder's results.json for benchmarks/plot.py.

Runs stopped by SIGTERM short of their 2M-step schedule (CleanRL's seeds from 2 on, in atari-cleanrl-sS-PongNoFrameskip-v4;
ppo.py's seeds from 4 on, in atari-sS-PongNoFrameskip-v4) are read from their compared/results.json (in git), which
compare_runs.py makes here from their TensorBoard logs (runs/, not in git) only where it is missing.

Last, whether the two differ at 950k beyond chance: the exact one-sided rank-sum (Mann-Whitney) test of ppo.py's
seeds against CleanRL's, every split of the pooled scores into groups of those sizes counted."""
import itertools, json, math, os, re, sys, subprocess
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
def seeds(pattern, first):
    found = (re.fullmatch(pattern, d) for d in os.listdir(R))
    return sorted(int(m[1]) for m in found if m and int(m[1]) >= first)
runs = (entries(f"{R}/atari-vs-cleanrl-PongNoFrameskip-v4/results.json")            # ppo.py s1, CleanRL s1
        + entries(f"{R}/atari-s2/results.json", env_id="PongNoFrameskip-v4")          # ppo.py s2
        + entries(f"{R}/atari-s3-PongNoFrameskip-v4/results.json")                    # ppo.py s3
        + [r for s in seeds(r"atari-s(\d+)-PongNoFrameskip-v4", 4)
           for r in stopped(f"{R}/atari-s{s}-PongNoFrameskip-v4", s, "ppo.py")]
        + [r for s in seeds(r"atari-cleanrl-s(\d+)-PongNoFrameskip-v4", 2)
           for r in stopped(f"{R}/atari-cleanrl-s{s}-PongNoFrameskip-v4", s, "CleanRL ppo_atari.py")])
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

# The rank-sum test at 950k: how often a random split of the pooled scores gives ppo.py's group a rank sum as low.
ours, theirs = ([mean100(r["curve"], 950_000) for r in runs if r["script"] == name and max(r["curve"]["steps"]) >= 950_000]
                for name in ("ppo.py", "CleanRL ppo_atari.py"))
pooled = ours + theirs
ranks = [1 + sum(x < v for x in pooled) + (sum(x == v for x in pooled) - 1) / 2 for v in pooled]  # ties: mean rank
observed = sum(ranks[i] for i in range(len(ours)))
splits = list(itertools.combinations(range(len(pooled)), len(ours)))
p = sum(sum(ranks[i] for i in split) <= observed for split in splits) / len(splits)
print(f"at 950k, ppo.py's {len(ours)} seeds against CleanRL's {len(theirs)}: one-sided p (ppo.py lower) = {p:.3f} "
      f"(exact rank-sum over {math.comb(len(pooled), len(ours))} splits)")
