"""Helpers to run a script as a user would: a subprocess in a temporary working directory."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the scripts live at the repo root, importable without training


def run_script(script, cwd, *argv, timeout=240):
    os.makedirs(cwd, exist_ok=True)
    return subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def interrupt_script(script, cwd, *argv, timeout=120):
    """Start a run, wait until it has logged charts/SPS (a training iteration), then Ctrl-C it."""
    os.makedirs(cwd, exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        events = list(Path(cwd).glob("runs/*/events.*"))
        if events and b"charts/SPS" in events[0].read_bytes():  # tag names are stored as text
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def read_tags(run_dir):
    """({scalar tag: [values]}, {text tag: its text}) from a run's TensorBoard event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = {tag: [e.value for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
    texts = {tag: " ".join(str(e.tensor_proto) for e in ea.Tensors(tag)) for tag in ea.Tags()["tensors"]}
    return scalars, texts


def run_main(module, cwd, capsys, *argv):
    """Call `module.main(argv)` in `cwd`, as the command line would; returns (exit code, out, err)."""
    os.makedirs(cwd, exist_ok=True)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        module.main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(old)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def one_line_error(out, script, *fragments):
    """The run failed as a user error should: exit code 2, one line `SCRIPT: error: ...`, no traceback."""
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), out.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


class Counter(gym.Env):
    """A test env: obs = [steps taken this episode]; reward = that count after the step;
    terminates after `terminate_at` steps (wrap it in a TimeLimit to truncate instead)."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, terminate_at=100):
        self.terminate_at = terminate_at

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.n = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.n += 1
        return np.array([self.n], np.float32), float(self.n), self.n == self.terminate_at, False, {}
