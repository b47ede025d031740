"""Two or more runs of one env, from their TensorBoard logs, at equal env steps (a run may have
been stopped early): the 100-episode mean at each of --at steps that every run reached, the
overall SPS of each, a results.json and a plot.

    python benchmarks/compare_runs.py --env-id BreakoutNoFrameskip-v4 \\
        --runs "ppo.py=OURS_BENCHMARK_FOLDER" "CleanRL ppo_atari.py=CLEANRL_BENCHMARK_FOLDER" --out OUT

Each folder is a benchmark.py --out folder holding runs/ENV__*__SEED__TIME.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402


def label_and_folder(text: str) -> tuple[str, str]:
    """LABEL=FOLDER, as --runs takes it."""
    label, sep, folder = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not LABEL=FOLDER (e.g. a2c.py=benchmarks/results/a2c/x)")
    return label, folder


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env-id", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--runs", nargs="+", required=True, type=label_and_folder, help="LABEL=FOLDER")
    p.add_argument("--at", nargs="+", type=int, default=[250_000, 500_000, 750_000, 1_000_000, 1_500_000, 2_000_000])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    results = []
    for label, folder in a.runs:
        try:
            run = benchmark.run_dir_of(folder, a.env_id, a.seed)
        except IndexError:
            p.error(f"no run of {a.env_id} seed {a.seed} in {folder}/runs")
        start = float(os.path.basename(run).split("__")[-1])  # the run name's unix time, taken at its start
        r = benchmark.analyse(run, start, a.env_id)
        r.pop("sps_window", None)
        sps = benchmark.read_scalars(run, "charts/SPS")
        r.update(script=label, env_id=a.env_id, seed=a.seed, command=run, steps_done=int(sps[-1, 1]),
                 sps_overall=float(sps[-1, 1] / (sps[-1, 0] - start)))
        results.append(r)
    common = min(r["steps_done"] for r in results)
    print(f"| run | env steps | SPS (whole run) | " + " | ".join(f"100-ep mean at {k // 1000}k" for k in a.at if k <= common) + " |")
    print("|---|---|---|" + "---|" * len([k for k in a.at if k <= common]))
    for r in results:
        steps, returns = np.array(r["curve"]["steps"]), np.array(r["curve"]["returns"])
        cells = [f"{returns[steps <= k][-100:].mean():.1f}" for k in a.at if k <= common]
        print(f"| {r['script']} | {r['steps_done']:,} | {r['sps_overall']:.0f} | " + " | ".join(cells) + " |")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f)
    benchmark.plot(results, os.path.join(a.out, "curves.png"))


if __name__ == "__main__":
    main()
