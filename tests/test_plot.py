"""benchmarks/plot.py, the plotting command for runs a user already has (README, "Plot your runs")."""

import importlib.util
import json
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import plot  # noqa: E402


def fake_run(folder, name, returns, steps):
    """A run directory as the scripts write it: its episodes' returns at env steps, and an SPS line."""
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(folder / "runs" / name)
    for r, step in zip(returns, steps):
        writer.add_scalar("charts/episodic_return", r, step)
        writer.add_scalar("charts/SPS", 1000, step)
    writer.close()


def test_runs_are_grouped_by_experiment_and_env_and_read_as_logged(tmp_path):
    fake_run(tmp_path, "CartPole-v1__ppo__1__100", [10.0, 20.0, 30.0], [100, 200, 300])
    fake_run(tmp_path, "CartPole-v1__ppo__2__100", [40.0, 50.0], [150, 250])
    fake_run(tmp_path, "CartPole-v1__fast__1__100", [5.0], [100])  # --exp-name fast: its own group
    fake_run(tmp_path, "mypkg-MyEnv-v0__ppo__1__100", [1.0], [100])  # mypkg:MyEnv-v0's folder: no threshold known
    runs = sorted(plot.read(str(tmp_path)), key=lambda r: (r["script"], r["env_id"], r["seed"]))
    assert [(r["script"], r["env_id"], r["seed"]) for r in runs] == [
        ("fast", "CartPole-v1", 1), ("ppo", "CartPole-v1", 1), ("ppo", "CartPole-v1", 2), ("ppo", "mypkg-MyEnv-v0", 1)]
    assert runs[1]["threshold"] == 475.0 and runs[3]["threshold"] is None
    assert runs[1]["curve"]["returns"] == [10.0, 20.0, 30.0] and runs[1]["curve"]["steps"] == [100, 200, 300]
    assert runs[2]["curve"]["returns"] == [40.0, 50.0]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="needs matplotlib (pip install -r benchmarks/requirements.txt)")
def test_plot_writes_a_png(tmp_path, capsys):
    for seed in (1, 2):
        fake_run(tmp_path, f"CartPole-v1__ppo__{seed}__100", np.arange(50.0) * seed, np.arange(50) * 100)
    plot.main([str(tmp_path / "runs"), "--out", str(tmp_path / "curves")])  # the name matplotlib gives it, said
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"2 runs in 1 groups -> {tmp_path / 'curves.png'}" in capsys.readouterr().out


def test_a_path_with_no_runs_is_one_line(tmp_path, capsys):
    fake_run(tmp_path / "ran", "CartPole-v1__ppo__1__100", [1.0], [100])
    (tmp_path / "empty").mkdir()
    for argv in ([str(tmp_path / "nowhere")], [str(tmp_path / "empty")],
                 [str(tmp_path / "ran"), "--out", str(tmp_path / "no" / "x.png")]):  # the folder --out writes into
        with pytest.raises(SystemExit) as e:
            plot.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("plot.py: "), err


def test_a_folder_of_benchmark_folders_and_runs_is_read_whole(tmp_path):
    fake_run(tmp_path / "loose", "CartPole-v1__ppo__1__100", [1.0], [100])
    bench = tmp_path / "results" / "ppo"  # a benchmark folder as committed: results.json, no runs/
    bench.mkdir(parents=True)
    (bench / "results.json").write_text(json.dumps([{"script": "ppo.py", "env_id": "CartPole-v1", "seed": 2,
                                                     "command": "ppo.py --env-id CartPole-v1 --seed 2"}]))
    assert sorted((r["script"], r["seed"]) for r in plot.read(str(tmp_path))) == [("ppo", 1), ("ppo", 2)]
    fake_run(bench, "CartPole-v1__ppo__2__100", [2.0], [100])  # its runs/ too: counted once, by results.json
    assert sorted((r["script"], r["seed"]) for r in plot.read(str(tmp_path))) == [("ppo", 1), ("ppo", 2)]


def test_a_benchmark_folder_s_ratio_reruns_are_not_counted_as_seeds(tmp_path):
    # A benchmark that crashed before its results.json: its runs/ are read, its ratio/runs/ (seed 1 again) are not.
    fake_run(tmp_path, "CartPole-v1__ppo__1__100", [1.0], [100])
    fake_run(tmp_path / "ratio", "CartPole-v1__ppo__1__200", [2.0], [100])
    assert [(r["seed"], r["curve"]["returns"]) for r in plot.read(str(tmp_path))] == [(1, [1.0])]
