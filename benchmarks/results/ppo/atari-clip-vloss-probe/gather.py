"""ppo.py on Pong with --clip-vloss (CleanRL's default; ppo.py's is off) against ppo.py's defaults and CleanRL's
ppo_atari.py, at equal env steps, mean over seeds: the README's table (run from the repository root).

Each probe run is `python benchmarks/benchmark.py --ratio-runs 0 --script ppo.py --env-ids PongNoFrameskip-v4
--seeds S --extra "--total-timesteps 2000000 --clip-vloss" --out benchmarks/results/ppo/atari-clip-vloss-probe-sS`
(the 2M-step schedule of the runs it is compared with), stopped by SIGTERM past 1M steps."""
import json, os, subprocess, sys
import numpy as np
R = "benchmarks/results/ppo"
OUT = f"{R}/atari-clip-vloss-probe"
marks = [250_000, 500_000, 750_000, 900_000, 950_000]
probe = []
for seed in sorted(int(d.rsplit("-s", 1)[1]) for d in os.listdir(R) if d.startswith("atari-clip-vloss-probe-s")):
    folder = f"{R}/atari-clip-vloss-probe-s{seed}"
    if not os.path.exists(f"{folder}/compared/results.json"):  # from its TensorBoard log (runs/, not in git)
        subprocess.run([sys.executable, "benchmarks/compare_runs.py", "--env-id", "PongNoFrameskip-v4", "--seed", str(seed),
                        "--runs", f"ppo.py --clip-vloss={folder}", "--at", "250000", "--out", f"{folder}/compared"],
                       check=True, stdout=subprocess.DEVNULL)
    probe += json.load(open(f"{folder}/compared/results.json"))
if not os.path.exists(f"{R}/atari-pong-seeds-vs-cleanrl/results.json"):
    subprocess.run([sys.executable, f"{R}/atari-pong-seeds-vs-cleanrl/gather.py"], check=True, stdout=subprocess.DEVNULL)
runs = json.load(open(f"{R}/atari-pong-seeds-vs-cleanrl/results.json")) + probe  # ppo.py defaults and CleanRL
def mean100(curve, step):
    s, r = np.array(curve["steps"]), np.array(curve["returns"])
    return float(r[s <= step][-100:].mean()) if s.max() >= step else None
groups = {}
for r in runs:
    groups.setdefault(r["script"], []).append(r)
print("| run | seeds | " + " | ".join(f"at {m // 1000}k" for m in marks) + " |")
print("|---|---|" + "---|" * len(marks))
for script, rs in groups.items():
    for r in sorted(rs, key=lambda r: r["seed"]):
        print(f"| {script} | {r['seed']} | " + " | ".join("—" if v is None else f"{v:.1f}"
                                                       for v in (mean100(r["curve"], m) for m in marks)) + " |")
    cells = []
    for m in marks:
        vals = [mean100(r["curve"], m) for r in rs]
        cells.append("—" if None in vals else f"{np.mean(vals):.1f}")
    print(f"| {script} | **mean of {len(rs)}** | " + " | ".join(cells) + " |")
os.makedirs(OUT, exist_ok=True)
json.dump(runs, open(f"{OUT}/results.json", "w"))
