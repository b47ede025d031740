"""Draw runs you already have to a PNG: per env, the 100-episode mean return by env step and by wall
time, the mean over seeds with their min-max band (benchmark.py's plot).

    python benchmarks/plot.py runs/ --out curves.png                         # every run under runs/
    python benchmarks/plot.py runs/CartPole-v1__ppo__1__* runs/CartPole-v1__ppo__2__* --out cartpole.png
    python benchmarks/plot.py benchmarks/results/ppo/atari-s1 benchmarks/results/ppo/atari-s2 --out atari.png

Each path is a run directory (runs/ENV__EXP__SEED__TIME, as the scripts write it), a benchmark.py --out
folder (its results.json; its runs/ are read only when results.json is missing), or a folder holding
either at any depth. Runs are grouped by experiment name (--exp-name; the script's
stem by default) and env id; a group's seeds make its band. Wall time counts from each run's first
logged event (a resumed run's includes the time it lay stopped). Needs matplotlib (benchmarks/requirements.txt).
"""

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402


def run_dirs(path):
    """The run directories at or under `path`: those holding a TensorBoard event file."""
    events = glob.glob(os.path.join(path, "**", "events.out.tfevents.*"), recursive=True)
    return sorted({os.path.dirname(e) for e in events})


def read_run(run_dir):
    """A run's curve and identity, in the form benchmark.py's results.json holds, or None if it logged no episode."""
    env_id, exp_name, seed = os.path.basename(os.path.normpath(run_dir)).split("__")[:3]
    env_id = env_id.replace("ALE-", "ALE/", 1) if env_id.startswith("ALE-") else env_id  # the folder of ALE/Pong-v5
    logged = [benchmark.read_scalars(run_dir, tag) for tag in ("charts/episodic_return", "charts/SPS")]
    if not len(logged[0]):
        return None
    start = min(float(x[:, 0].min()) for x in logged if len(x))
    result = benchmark.analyse(run_dir, start, env_id)
    return {**result, "script": exp_name, "env_id": env_id, "seed": int(seed) if seed.isdigit() else seed}


def experiment_name(result):
    """A benchmark run's --exp-name, as its command gave it, else its script's stem (the scripts' default)."""
    words = result.get("command", "").split()
    if "--exp-name" in words[:-1]:
        return words[words.index("--exp-name") + 1]
    return os.path.splitext(os.path.basename(result["script"]))[0]


def read(path):
    """The runs a path names: each benchmark folder's results.json at or below it, and the run directories
    below it that are not inside a benchmark folder (whose results.json already holds them)."""
    saved = sorted(glob.glob(os.path.join(path, "**", "results.json"), recursive=True))
    benchmarks = [os.path.dirname(f) for f in saved]
    results = []
    for f in saved:
        with open(f) as file:
            results += [dict(r, script=experiment_name(r)) for r in json.load(file)]
    reruns = f"{os.sep}ratio{os.sep}runs{os.sep}"  # benchmark.py's SPS-ratio reruns: no seeds of their own
    runs = [read_run(d) for d in run_dirs(path)
            if reruns not in d and not any(d.startswith(b + os.sep) for b in benchmarks)]
    return results + [r for r in runs if r is not None]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="run directories, folders of them, or benchmark.py --out folders")
    p.add_argument("--out", default="curves.png", help="the PNG to write")
    a = p.parse_args(argv)
    a.out += "" if a.out.endswith(".png") else ".png"  # as matplotlib names it
    missing = [path for path in a.paths + [os.path.dirname(os.path.abspath(a.out))] if not os.path.exists(path)]
    if missing:  # a run's path, or the folder --out would write into
        p.exit(2, f"plot.py: no such path: {missing[0]}\n")
    results = [r for path in a.paths for r in read(path)]
    if not results:
        p.exit(2, "plot.py: no run with a logged episode (charts/episodic_return) under the paths given\n")
    benchmark.plot(results, a.out)
    groups = sorted({(r["script"], r["env_id"]) for r in results})
    print(f"plot.py: {len(results)} runs in {len(groups)} groups -> {a.out}")


if __name__ == "__main__":
    main()
