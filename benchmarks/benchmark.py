"""Train a script on some envs for several seeds and measure time to solve, returns and speed.

    python benchmarks/benchmark.py --script ppo.py --env-ids CartPole-v1 Acrobot-v1 --seeds 1 2 3 4 5

For each run (a subprocess with the script's default flags but --env-id and --seed) it records:
  - solve_s / solve_steps: wall seconds from process start, and env steps, at which the mean
    of the last 100 episodic returns first reaches the env's threshold;
  - ema_solve_s / ema_episodes: the same for an exponential moving average of the returns
    (weight 0.05 on the newest, starting at 10), the criterion of PyTorch's reinforce example;
  - final100: the mean of the last 100 episodic returns at the end of training;
  - sps: steady-state training steps per second (over the second half of the run);
  - the SPS ratio: in --ratio-runs extra runs per env, the benchmark steps the same vector
    env with random actions on the other core while the run trains, and divides the run's
    steady-state SPS by the random-action SPS over the same window (this machine's speed
    drifts by tens of percent over minutes, so measurements at different times don't compare);
  - eval: the evaluation return of the saved model (with --eval).
It writes results.json, results.md (a table) and curves.png under --out.
Needs matplotlib (benchmarks/requirements.txt) for the plot.
"""

import argparse
import glob
import importlib.util
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The thresholds the targets name; otherwise the env's registered reward_threshold.
THRESHOLDS = {"CartPole-v1": 475.0, "Acrobot-v1": -100.0, "Pendulum-v1": -250.0,
              "InvertedPendulum-v5": 950.0}


def threshold(env_id):
    if env_id in THRESHOLDS:
        return THRESHOLDS[env_id]
    import gymnasium as gym
    try:  # the Atari ids (none has a threshold)
        import ale_py
        gym.register_envs(ale_py)
    except ImportError:
        pass
    try:
        return gym.spec(env_id).reward_threshold
    except gym.error.Error:  # a custom env's run folder (mypkg-MyEnv-v0 for mypkg:MyEnv-v0): no threshold known
        return None


def read_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    ea.Reload()
    if tag not in ea.Tags()["scalars"]:
        return np.zeros((0, 3))
    return np.array([(e.wall_time, e.step, e.value) for e in ea.Scalars(tag)])


def first_crossing(values, level, strict=False):
    hits = np.flatnonzero(values > level if strict else values >= level)
    return int(hits[0]) if len(hits) else None


def analyse(run_dir, start, env_id):
    episodes = read_scalars(run_dir, "charts/episodic_return")
    wall, steps, returns = episodes.T
    mean100 = np.array([returns[max(0, i - 99): i + 1].mean() for i in range(len(returns))])
    mean100[:99] = -np.inf  # a 100-episode mean needs 100 episodes
    ema = np.empty(len(returns))
    running = 10.0
    for i, r in enumerate(returns):
        running = 0.05 * r + 0.95 * running
        ema[i] = running
    level = threshold(env_id)
    out = {"episodes": len(returns), "final100": float(returns[-100:].mean()), "threshold": level}
    i = first_crossing(mean100, level) if level is not None else None
    out["solve_s"] = None if i is None else float(wall[i] - start)
    out["solve_steps"] = None if i is None else int(steps[i])
    # "exceeds", as PyTorch's example; meaningless where the EMA starts (10) above the threshold
    j = first_crossing(ema, level, strict=True) if level is not None and level > 10 else None
    out["ema_solve_s"] = None if j is None else float(wall[j] - start)
    out["ema_episodes"] = None if j is None else j + 1
    sps = read_scalars(run_dir, "charts/SPS")
    half = len(sps) // 2
    out["sps"] = out["sps_window"] = None  # too short a run to measure (a2c.py logs SPS every 100th update)
    if len(sps) > 2:
        out["sps"] = float((sps[-1, 1] - sps[half, 1]) / (sps[-1, 0] - sps[half, 0]))
        out["sps_window"] = (float(sps[half, 0]), float(sps[-1, 0]))
    out["wall_s"] = float(wall[-1] - start)
    out["curve"] = {"steps": steps.tolist(), "seconds": (wall - start).tolist(), "mean100": mean100.tolist(),
                    "returns": returns.tolist()}
    return out


def make_target_envs(script, env_id, extra):
    """The script's own vector env (its make_envs, with the run's --num-envs)."""
    spec = importlib.util.spec_from_file_location("bench_target", os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if "args" in inspect.signature(module.make_envs).parameters:  # ppo.py, a2c.py: defaults by observation kind
        args = module.with_defaults(module.Args(env_id=env_id, seed=0), module.observes_frames(env_id))
        num_envs = int(extra[extra.index("--num-envs") + 1]) if "--num-envs" in extra else args.num_envs
        envs = module.make_envs(args, num_envs)
    else:
        num_envs = int(extra[extra.index("--num-envs") + 1]) if "--num-envs" in extra else module.Args().num_envs
        envs = module.make_envs(env_id, num_envs, 0)
    envs.reset(seed=0)
    return envs, num_envs


def step_randomly_while(proc, envs, num_envs):
    """Step `envs` with random actions until `proc` ends; returns [(wall time, env steps)].

    Run beside the training process (one core each), so both see the machine at the same
    speed: here it drifts by tens of percent over minutes, which would swamp a comparison
    of measurements taken at different times.
    """
    marks, steps = [(time.time(), 0)], 0
    while proc.poll() is None:
        for _ in range(50):
            envs.step(envs.action_space.sample())
        steps += 50 * num_envs
        marks.append((time.time(), steps))
    return np.array(marks)


def launch(script, env_id, seed, workdir, extra, save, python=sys.executable, launcher=""):
    os.makedirs(workdir, exist_ok=True)
    cmd = (shlex.split(launcher) if launcher else [python]) + [os.path.join(ROOT, script), "--env-id", env_id,
                                                               "--seed", str(seed)] + extra
    if save:
        cmd.append("--save-model")
    start = time.time()
    log = open(log_of(workdir, env_id, seed), "w")
    return subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT), start, cmd


def log_of(workdir, env_id, seed):
    return os.path.join(workdir, f"{env_id.replace('/', '-')}__{seed}.log")


def run_dir_of(workdir, env_id, seed):
    dirs = sorted(d for d in glob.glob(os.path.join(workdir, "runs", f"{env_id.replace('/', '-')}__*__{seed}__*"))
                  if not d.endswith("-eval"))
    dirs = [d for d in dirs if "-eval__" not in d]
    return dirs[-1]


def evaluate(script, env_id, seed, workdir):
    model = os.path.join(run_dir_of(workdir, env_id, seed), "model.pt")
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--env-id", env_id, "--seed", str(seed + 1000),
                          "--eval-checkpoint", model], cwd=workdir, capture_output=True, text=True)
    m = re.search(r"return (-?[\d.]+) ± ([\d.]+)", out.stdout)
    return float(m.group(1)) if m else None


def fmt(x, digits=1):
    return "—" if x is None else f"{x:.{digits}f}"


def median(values):
    """The median of the values that were measured (None: too short a run), or None if none was."""
    measured = [v for v in values if v is not None]
    return float(np.median(measured)) if measured else None


def table(results):
    lines = ["| script | env | seeds | solved | solve s (median) | solve steps (median) | EMA solve s (median) "
             "| final 100-ep mean (mean ± std) | eval (mean) | SPS | SPS beside random stepping | random-action SPS "
             "| SPS ratio (min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in results:
        groups.setdefault((r["script"], r["env_id"]), []).append(r)
    for (script, env_id), runs in groups.items():
        solved = [r for r in runs if r["solve_s"] is not None]
        def med(key, solved=solved, runs=runs):  # a median over fewer than half the seeds would flatter
            return None if len(solved) < len(runs) / 2 else float(np.median([r[key] for r in solved]))
        ema = [r["ema_solve_s"] for r in runs if r["ema_solve_s"] is not None]
        finals = np.array([r["final100"] for r in runs])
        evals = [r["eval"] for r in runs if r.get("eval") is not None]
        lines.append(
            f"| {script} | {env_id} | {seeds_cell(runs)} | {len(solved)}/{len(runs)} (≥ {runs[0]['threshold']}) "
            f"| {fmt(med('solve_s'))} | {fmt(med('solve_steps'), 0)} "
            f"| {fmt(float(np.median(ema)) if len(ema) >= len(runs) / 2 else None)} "
            f"| {finals.mean():.1f} ± {finals.std():.1f} (min {finals.min():.1f}) "
            f"| {fmt(float(np.mean(evals)) if evals else None)} "
            f"| {fmt(median([r['sps'] for r in runs]), 0)} | {ratio_cells(runs)} |")
    return "\n".join(lines)


def seeds_cell(runs):
    """How many seeds, and how many of them were stopped short (their final mean is where they stopped)."""
    stopped = sum(bool(r.get("stopped")) for r in runs)
    return f"{len(runs)} ({stopped} stopped short)" if stopped else str(len(runs))


def ratio_cells(runs):
    beside = runs[0]["beside"]
    if not beside:
        return "— | — | —"
    sps, random_sps = np.array(beside).T
    return (f"{np.median(sps):.0f} | {np.median(random_sps):.0f} "
            f"| {np.median(sps / random_sps):.2f} ({(sps / random_sps).min():.2f})")


def plot(results, path):
    """One row per env, by env steps and by wall seconds: for each script (or experiment) the mean over
    its seeds of the 100-episode mean return, and the seeds' min-max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = {}
    for r in results:
        rows.setdefault(r["env_id"], {}).setdefault(r["script"], []).append(r)
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.2 * len(rows)), squeeze=False)
    for row, (env_id, groups) in enumerate(rows.items()):
        for col, xkey in enumerate(["steps", "seconds"]):
            ax = axes[row, col]
            for script, runs in groups.items():
                grid = np.linspace(0, min(max(r["curve"][xkey]) for r in runs), 200)  # where every seed has data
                curves = []
                for r in runs:
                    x, y = np.array(r["curve"][xkey]), np.array(r["curve"]["returns"])
                    smooth = np.array([y[max(0, i - 99): i + 1].mean() for i in range(len(y))])
                    curves.append(np.interp(grid, x, smooth, left=np.nan, right=np.nan))
                curves = np.array(curves)
                with warnings.catch_warnings():  # before a run's first episode a column may be all NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean, low, high = np.nanmean(curves, 0), np.nanmin(curves, 0), np.nanmax(curves, 0)
                line, = ax.plot(grid, mean, label=f"{script} (mean of {len(runs)} seeds; band: min–max)")
                ax.fill_between(grid, low, high, alpha=0.2, color=line.get_color())
            threshold = next(iter(groups.values()))[0]["threshold"]
            if threshold is not None:
                ax.axhline(threshold, color="gray", ls="--", lw=0.8)
            ax.set_xlabel("env steps" if xkey == "steps" else "wall seconds from process start")
            ax.set_ylabel("return (mean of last 100 episodes)")
            ax.set_title(f"{env_id}")
            ax.legend(loc="best", fontsize=7)  # where it hides the fewest points
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--script", default="ppo.py")
    p.add_argument("--env-ids", nargs="+", default=["CartPole-v1"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--parallel", type=int, default=1, help="timing runs at a time (cleanest with 1)")
    p.add_argument("--ratio-runs", type=int, default=3,
                   help="extra runs per env with random-action stepping beside them, for the SPS ratio")
    p.add_argument("--eval", action="store_true", help="save each model and report its evaluation return")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/SCRIPT)")
    p.add_argument("--extra", default="", help="more flags for the script, e.g. '--total-timesteps 100000'")
    p.add_argument("--python", default=sys.executable,
                   help="the Python to run the script with: another implementation's virtual environment")
    p.add_argument("--launcher", default="",
                   help="run the script under this instead of --python, e.g. "
                        "'python -m torch.distributed.run --standalone --nproc-per-node 2' (torchrun)")
    a = p.parse_args()
    out = os.path.abspath(a.out or os.path.join(ROOT, "benchmarks", "results", a.script[:-3]))
    os.makedirs(out, exist_ok=True)

    # Timing runs (alone, or --parallel at a time), then --ratio-runs per env with the random
    # stepper beside them: it slows a run a little, so those runs give only the SPS ratio.
    queue = [(env_id, seed, False) for env_id in a.env_ids for seed in a.seeds]
    queue += [(env_id, seed, True) for env_id in a.env_ids for seed in a.seeds[:a.ratio_runs]]
    running, results, ratios, failed = [], [], {}, 0
    while queue or running:
        while queue and len(running) < a.parallel and not (running and queue[0][2]):
            env_id, seed, beside = queue.pop(0)
            sub = os.path.join(out, "ratio") if beside else out
            proc, start, cmd = launch(a.script, env_id, seed, sub, a.extra.split(), a.eval and not beside, a.python, a.launcher)
            running.append((proc, start, env_id, seed, cmd, beside, sub))
        marks = None
        if running[0][5]:
            envs, num_envs = make_target_envs(a.script, running[0][2], a.extra.split())
            marks = step_randomly_while(running[0][0], envs, num_envs)
            envs.close()
        else:
            time.sleep(0.2)
        for item in list(running):
            proc, start, env_id, seed, cmd, beside, sub = item
            if proc.poll() is None:
                continue
            running.remove(item)
            stopped = proc.returncode in (143, -signal.SIGTERM)  # SIGTERM: ours saves and exits 143, a peer dies of it
            if proc.returncode != 0 and not (stopped and not beside):
                print(f"FAILED ({proc.returncode}): {' '.join(cmd)}; its output: {log_of(sub, env_id, seed)}",
                      file=sys.stderr)
                failed += 1
                continue
            try:
                r = analyse(run_dir_of(sub, env_id, seed), start, env_id)
            except (IndexError, ValueError):  # no run folder, or no episode in it
                if not stopped:
                    raise
                print(f"FAILED (stopped before its first episode ended): {' '.join(cmd)}", file=sys.stderr)
                continue
            if beside and r["sps_window"] is None:
                print(f"{env_id} seed {seed} beside random stepping: too short to measure SPS (3 SPS points needed)")
                continue
            if beside:
                lo, hi = r["sps_window"]
                inside = marks[(marks[:, 0] >= lo) & (marks[:, 0] <= hi)]
                random_sps = float((inside[-1, 1] - inside[0, 1]) / (inside[-1, 0] - inside[0, 0]))
                ratios.setdefault(env_id, []).append((r["sps"], random_sps))
                print(f"{env_id} seed {seed} beside random stepping: SPS {r['sps']:.0f}, "
                      f"random-action SPS {random_sps:.0f}, ratio {r['sps'] / random_sps:.2f}", flush=True)
                continue
            r.update({"script": a.script, "env_id": env_id, "seed": seed,
                      "command": " ".join(cmd[1:]).replace(ROOT + "/", "")})
            r.pop("sps_window", None)
            if stopped:  # stopped short of --total-timesteps (as atari.sh stops a peer): summarised as far as it got
                r["stopped"] = True
            if a.eval:
                r["eval"] = evaluate(a.script, env_id, seed, out)
            results.append(r)
            print(f"{env_id} seed {seed}{' (stopped)' if stopped else ''}: solve {fmt(r['solve_s'])} s at {r['solve_steps']} steps, "
                  f"EMA solve {fmt(r['ema_solve_s'])} s, final100 {r['final100']:.1f}, SPS {fmt(r['sps'], 0)}"
                  + (f", eval {fmt(r['eval'])}" if a.eval else ""), flush=True)
    for r in results:
        r["beside"] = ratios.get(r["env_id"], [])
    results.sort(key=lambda r: (a.env_ids.index(r["env_id"]), r["seed"]))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f)
    md = table(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    if failed and not results:  # a script that runs this (suite.sh, atari.sh) must not go on as if it had worked
        sys.exit(f"benchmark.py: every run failed; their output is in {out}")
    if results:  # else every run was stopped before its first episode ended: nothing to draw
        plot(results, os.path.join(out, "curves.png"))


if __name__ == "__main__":
    main()
