"""ppo.py's seed-3 runs on Breakout and Pong, continued from their 2M-step checkpoints toward 10M steps on the
2-core CPU machine (no GPU was lent for the issue's 10M runs): the README's table, and this folder's
results.json and curves.png (run from the repository root).

The 2M runs are `atari-s3-GAMENoFrameskip-v4` (`python benchmarks/benchmark.py --script ppo.py --env-ids
GAMENoFrameskip-v4 --seeds 3 --ratio-runs 0 --eval --extra "--total-timesteps 2000000"`). Each run's folder was
copied to `atari-10M-s3-GAMENoFrameskip-v4/runs/` and resumed there, the two games at once, one per core:

    OMP_NUM_THREADS=1 python ppo.py --resume RUN_FOLDER --total-timesteps 10000000

One session took both to 4.8M steps; the next found no checkpoints (a session starts from a fresh checkout and
run folders are not in git), so the runs stop there, and so does this table: it needs those run folders.
The resumed run keeps its flags, seed and the state of its draws, and the logs after the checkpoint are dropped,
so the curve is one run's. CleanRL's published 10M figures for its `ppo_atari.py` (the reference the issue
names): Breakout 415 ± 28, Pong 20.4 ± 0.2.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, "benchmarks")
import benchmark  # noqa: E402

R = "benchmarks/results/ppo"
OUT = f"{R}/atari-10M-s3"
GAMES = {"BreakoutNoFrameskip-v4": 415.0, "PongNoFrameskip-v4": 20.4}  # CleanRL's 10M figure
MARKS = [m * 1_000_000 for m in range(1, 10)] + [9_990_000]  # each million; 10M less the last update's games


def mean100(steps, returns, step):
    """The mean of the last 100 games that ended by `step`; None if the run has not reached it."""
    return float(returns[steps <= step][-100:].mean()) if steps.max() >= step else None


runs = []
for game in GAMES:
    (run_dir,) = [d for d in os.scandir(f"{R}/atari-10M-s3-{game}/runs") if "__ppo__3__" in d.name]
    _, steps, returns = benchmark.read_scalars(run_dir.path, "charts/episodic_return").T
    runs.append({"env_id": game, "seed": 3, "folder": os.path.relpath(run_dir.path, R), "steps": steps.tolist(),
                 "returns": returns.tolist(), "last_step": int(steps.max())})

print("| game | seed | " + " | ".join(f"at {m / 1e6:g}M" for m in MARKS) + " | CleanRL at 10M |")
print("|---|---|" + "---|" * len(MARKS) + "---|")
for r in runs:
    steps, returns = np.array(r["steps"]), np.array(r["returns"])
    cells = " | ".join("—" if v is None else f"{v:.1f}" for v in (mean100(steps, returns, m) for m in MARKS))
    print(f"| {r['env_id'][:-len('NoFrameskip-v4')]} | {r['seed']} | {cells} | {GAMES[r['env_id']]:g} |")
print("\nthe last 100 games: " + ", ".join(f"{r['env_id']} {np.mean(r['returns'][-100:]):.1f} (the last at step "
                                         f"{r['last_step']:,})" for r in runs))

os.makedirs(OUT, exist_ok=True)
json.dump(runs, open(f"{OUT}/results.json", "w"))
import matplotlib  # noqa: E402
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
fig, axes = plt.subplots(1, len(runs), figsize=(11, 3.4), squeeze=False)
for ax, r in zip(axes[0], runs):
    steps, returns = np.array(r["steps"]), np.array(r["returns"])
    smooth = np.array([returns[max(0, i - 99): i + 1].mean() for i in range(len(returns))])
    ax.plot(steps, smooth, label="ppo.py seed 3 (mean of the last 100 games)")
    ax.axhline(GAMES[r["env_id"]], color="grey", linestyle="--", label="CleanRL ppo_atari.py at 10M (published)")
    ax.axvline(2_000_000, color="grey", linestyle=":", label="resumed from the 2M checkpoint")
    ax.set_xlim(0, 10_000_000)
    ax.set_title(r["env_id"])
    ax.set_xlabel("env steps")
    ax.set_ylabel("episodic return (the game's score)")
    ax.legend(loc="best", fontsize=7)
fig.tight_layout()
fig.savefig(f"{OUT}/curves.png", dpi=100)
