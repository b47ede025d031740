"""A run killed with SIGKILL part-way and resumed, beside the same run uninterrupted (issue 13):

    python benchmarks/resume_curve.py --env-id Hopper-v5 --kill-at 500000 --out benchmarks/results/ppo_continuous/resume-Hopper-v5

Both start together (one per core), same script, flags and seed. The interrupted one writes a
checkpoint every iteration (--checkpoint-every 0), is killed (no chance to save) once its status
line passes --kill-at, then is resumed with --resume until --total-timesteps. Writes one plot of
both learning curves (100-episode mean against env steps) and a results.json.
"""

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (its TensorBoard reading and plotting)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--script", default="ppo_continuous.py")
    p.add_argument("--env-id", default="Hopper-v5")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--total-timesteps", type=int, default=1_000_000)
    p.add_argument("--kill-at", type=int, default=500_000)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    out = os.path.abspath(a.out)
    base = [sys.executable, os.path.join(ROOT, a.script), "--env-id", a.env_id, "--seed", str(a.seed),
            "--total-timesteps", str(a.total_timesteps), "--save-model"]
    runs = {name: os.path.join(out, name) for name in ("uninterrupted", "killed-and-resumed")}
    for d in runs.values():
        os.makedirs(d, exist_ok=True)
    whole = subprocess.Popen(base, cwd=runs["uninterrupted"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = subprocess.Popen(base + ["--checkpoint-every", "0"], cwd=runs["killed-and-resumed"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in killed.stdout:  # the status line: "step N/TOTAL ..."
        if line.startswith("step") and int(line.split()[1].split("/")[0]) >= a.kill_at:
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait()
    (checkpoint,) = glob.glob(os.path.join(runs["killed-and-resumed"], "runs", "*", "model.pt"))
    import torch
    killed_at = torch.load(checkpoint, weights_only=True)["global_step"]
    print(f"killed; its last checkpoint is at step {killed_at}; resuming", flush=True)
    subprocess.run([sys.executable, os.path.join(ROOT, a.script), "--resume", os.path.dirname(checkpoint)],
                   cwd=runs["killed-and-resumed"], stdout=subprocess.DEVNULL, check=True)
    whole.wait()

    results = []
    for name, d in runs.items():
        (run_dir,) = [r for r in glob.glob(os.path.join(d, "runs", "*")) if "-eval" not in r]
        r = benchmark.analyse(run_dir, float(os.path.basename(run_dir).split("__")[-1]), a.env_id)
        r.pop("sps_window", None)
        r.update(script=f"{a.script}, {name}" + (f" (killed at {killed_at})" if name != "uninterrupted" else ""),
                 env_id=a.env_id, seed=a.seed, command=" ".join(base[1:]).replace(ROOT + "/", ""))
        results.append(r)
        print(f"{name}: final 100-episode mean {r['final100']:.1f}, {r['episodes']} episodes", flush=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in results:
        steps, mean100 = np.array(r["curve"]["steps"]), np.array(r["curve"]["mean100"])
        ax.plot(steps[np.isfinite(mean100)], mean100[np.isfinite(mean100)], label=r["script"])
    ax.axvline(killed_at, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("env steps")
    ax.set_ylabel("return (mean of last 100 episodes)")
    ax.set_title(f"{a.env_id}, seed {a.seed}: killed (SIGKILL) and resumed, and uninterrupted")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=90)


if __name__ == "__main__":
    main()
