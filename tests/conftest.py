"""Helpers to run a script as a user would: a subprocess in a temporary working directory."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the scripts live at the repo root, importable without training


def run_script(script, cwd, *argv, timeout=240):
    os.makedirs(cwd, exist_ok=True)
    return subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def interrupt_script(script, cwd, *argv, timeout=120):
    """Start a run, wait until it has logged a training iteration, then send it Ctrl-C (SIGINT)."""
    os.makedirs(cwd, exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        events = list(Path(cwd).glob("runs/*/events.*"))
        if events and events[0].stat().st_size > 500:  # more than the header and hyperparameters
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
