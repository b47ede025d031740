"""benchmarks/benchmark.py's runs and summary table, and the pairs aggregate.py and compare_runs.py take."""

import argparse
import json
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import aggregate  # noqa: E402
import benchmark  # noqa: E402
import compare_runs  # noqa: E402


def test_the_table_says_how_many_seeds_were_stopped_short():
    run = dict(script="a2c.py", env_id="PongNoFrameskip-v4", solve_s=None, ema_solve_s=None, final100=-20.0,
               threshold=21, sps=500, beside=[])
    full = benchmark.table([run, run]).splitlines()[-1]
    short = benchmark.table([run, dict(run, final100=-8.0, stopped=True)]).splitlines()[-1]
    assert full.split(" | ")[2] == "2"
    assert short.split(" | ")[2] == "2 (1 stopped short)"
    assert "-14.0 ± 6.0" in short


def benchmark_of(tmp_path, code):
    """benchmark.py run on a one-seed CartPole benchmark of a script made of `code`, its output in tmp_path/out."""
    script = tmp_path / "script.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--script", str(script),
                           "--env-ids", "CartPole-v1", "--seeds", "1", "--ratio-runs", "0", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)


def test_a_run_stopped_before_its_first_episode_is_reported_not_summarised(tmp_path):
    # As atari.sh stops a slow peer: SIGTERM before any episode ended leaves no curve to summarise.
    out = benchmark_of(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n")
    assert out.returncode == 0, out.stderr
    assert "FAILED (stopped before its first episode ended)" in out.stderr
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == []


def test_a_run_too_short_to_measure_its_sps_is_summarised_without_it():
    # Fewer than 3 SPS points (a2c.py logs SPS every 100th update): no SPS, not a KeyError.
    run = dict(script="a2c.py", env_id="CartPole-v1", solve_s=None, ema_solve_s=None, final100=20.0,
               threshold=475.0, sps=None, beside=[])
    assert benchmark.table([run]).splitlines()[-1].split(" | ")[9] == "—"
    assert benchmark.table([run, dict(run, sps=900.0)]).splitlines()[-1].split(" | ")[9] == "900"


def test_every_run_failing_exits_nonzero_and_names_the_logs(tmp_path):
    # suite.sh and atari.sh run under set -e: a benchmark whose every run failed must not look like one that worked.
    out = benchmark_of(tmp_path, "import sys\nsys.exit(2)\n")
    assert out.returncode == 1, out.stderr
    assert f"its output: {tmp_path / 'out' / 'CartPole-v1__1.log'}" in out.stderr
    assert out.stderr.strip().endswith(f"benchmark.py: every run failed; their output is in {tmp_path / 'out'}")


def test_the_helpers_read_their_pairs_or_say_what_is_wrong():
    # argparse turns an ArgumentTypeError into one usage error, exit 2, not a traceback.
    assert aggregate.env_and_score("HalfCheetah-v5=3000") == ("HalfCheetah-v5", 3000.0)
    assert compare_runs.label_and_folder("a2c.py=results/a=b") == ("a2c.py", "results/a=b")
    for parse, bad in ((aggregate.env_and_score, "HalfCheetah-v5"), (aggregate.env_and_score, "Hopper-v5=abc"),
                       (compare_runs.label_and_folder, "results/a")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_a_missing_input_is_one_usage_error(tmp_path):
    for script, argv, says in (("aggregate.py", [str(tmp_path / "none.json")], "not a results.json file"),
                               ("compare_runs.py", ["--env-id", "CartPole-v1", "--runs", f"x={tmp_path}",
                                                    "--out", str(tmp_path / "t.md")], "no run of CartPole-v1 seed 1")):
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *argv], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and out.stderr.splitlines()[-1].startswith(f"{script}: error: {says}"), out.stderr
        assert "Traceback" not in out.stderr
