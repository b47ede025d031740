"""Train one of our scripts (ppo_continuous.py unless --ours) and another implementation at the
same time, one per core, and compare their training speed (env steps per second).

    python benchmarks/side_by_side.py --other-python ../cleanrl-venv/bin/python \\
        --other-script ../cleanrl/cleanrl/ppo_continuous_action.py --env-id HalfCheetah-v4 --seconds 300
    python benchmarks/side_by_side.py --ours ppo.py --other-python ../cleanrl-venv/bin/python \\
        --other-script ../cleanrl/cleanrl/ppo_atari.py --env-id BreakoutNoFrameskip-v4 --seconds 600

This machine's speed drifts by tens of percent over minutes, so only runs that share the same
minutes compare. Both start together with their default flags (but --env-id, --seed and, for
the other, --no-cuda), run for --seconds, and are stopped; the figure kept for each is the last
SPS it printed itself (env steps since its start over seconds since its start: CleanRL's
"SPS: N" lines, our status line). The other implementation runs in its own virtual environment
(CleanRL pins gymnasium 0.29), which this script does not build.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_sps(text):
    found = re.findall(r"SPS:?\s+(\d+)", text)
    return int(found[-1]) if found else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ours", default="ppo_continuous.py", help="our script")
    p.add_argument("--other-python", required=True, help="the Python of the other implementation's venv")
    p.add_argument("--other-script", required=True, help="e.g. CleanRL's ppo_continuous_action.py")
    p.add_argument("--env-id", default="HalfCheetah-v4")
    p.add_argument("--ours-env-id", default=None, help="our env id if it differs (default: --env-id)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--other-flags", default="--no-cuda", help="flags for the other script beyond --env-id, --seed")
    a = p.parse_args()

    work = tempfile.mkdtemp(prefix="side_by_side_")
    commands = {
        a.ours: [sys.executable, os.path.join(ROOT, a.ours), "--env-id", a.ours_env_id or a.env_id,
                 "--seed", str(a.seed)],
        os.path.basename(a.other_script): [os.path.abspath(a.other_python) if os.sep in a.other_python
                                           else a.other_python, os.path.abspath(a.other_script),
                                           "--env-id", a.env_id, "--seed", str(a.seed), *a.other_flags.split()],
    }
    procs = {}
    try:
        for name, cmd in commands.items():
            cwd = os.path.join(work, name)
            os.makedirs(cwd)
            log = open(os.path.join(cwd, "stdout.log"), "w+")
            procs[name] = (subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT), log)
    except OSError:  # the second did not start: stop the first rather than leave it running alone
        for proc, _ in procs.values():
            proc.kill()
        raise
    time.sleep(a.seconds)
    for proc, _ in procs.values():
        proc.send_signal(signal.SIGINT)
    rows = []
    for name, (proc, log) in procs.items():
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.seek(0)
        text = log.read()
        steps = re.findall(r"(?:step|global_step=)\s*(\d+)", text)
        rows.append((name, " ".join(commands[name][1:]).replace(ROOT + "/", ""), last_sps(text),
                     int(steps[-1]) if steps else None))
    print(f"| script | command | SPS (its own last report) | env steps in {a.seconds:.0f} s |")
    print("|---|---|---|---|")
    for name, cmd, sps, steps in rows:
        print(f"| {name} | `{cmd}` | {sps} | {steps} |")
    ours, other = rows[0][2], rows[1][2]
    if ours and other:
        print(f"\nratio: {ours / other:.2f}x")
    print(f"(logs in {work})")


if __name__ == "__main__":
    main()
