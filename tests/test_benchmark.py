"""benchmarks/benchmark.py's summary table."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import benchmark  # noqa: E402


def test_the_table_says_how_many_seeds_were_stopped_short():
    run = dict(script="a2c.py", env_id="PongNoFrameskip-v4", solve_s=None, ema_solve_s=None, final100=-20.0,
               threshold=21, sps=500, beside=[])
    full = benchmark.table([run, run]).splitlines()[-1]
    short = benchmark.table([run, dict(run, final100=-8.0, stopped=True)]).splitlines()[-1]
    assert full.split(" | ")[2] == "2"
    assert short.split(" | ")[2] == "2 (1 stopped short)"
    assert "-14.0 ± 6.0" in short
