"""Helpers to run a script as a user would: a subprocess in a temporary working directory."""

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

# Under pytest-xdist each worker keeps to one thread, in-process and in every script it starts (set
# before torch is imported). The CNN tests otherwise run torch's default of a thread per core, and
# two workers on the two cores of CI spin against each other: measured beside two benchmark runs,
# the Pong smoke test took 64 s in the suite against 5 s alone.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the scripts live at the repo root, importable without training


def run_script(script, cwd, *argv, timeout=240, env=None):
    """Run `script` with `argv` in `cwd`, as a user's shell would (`env`: variables to set or, as None, unset)."""
    os.makedirs(cwd, exist_ok=True)
    environ = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=environ)


# Weights & Biases with no account and no network: runs are written under ./wandb, and DISPLAY is unset so
# that videos are rendered off screen, as on a server.
WANDB_OFFLINE = {"WANDB_MODE": "offline", "WANDB_API_KEY": None, "DISPLAY": None}
TRACKING = importlib.util.find_spec("wandb") is not None


def wandb_records(cwd):
    """The bytes of each offline W&B run under `cwd`/wandb (its .wandb log), by run directory name."""
    return {run.name: next(run.glob("*.wandb")).read_bytes() for run in (Path(cwd) / "wandb").glob("offline-run-*")}


def toy_env_module(folder, name):
    """Write `folder/name.py`, a module that registers an env when imported, as a user's own package would
    (action 1 pays 1, action 0 nothing; one step an episode). Returns the --env-id that names it, `name:Id-v0`."""
    env_id = name.title().replace("_", "") + "-v0"
    Path(folder, f"{name}.py").write_text(
        "import gymnasium as gym\n"
        "import numpy as np\n\n\n"
        "class Pays(gym.Env):\n"
        "    observation_space = gym.spaces.Box(0.0, 1.0, (2,), np.float32)\n"
        "    action_space = gym.spaces.Discrete(2)\n\n"
        "    def reset(self, seed=None, options=None):\n"
        "        super().reset(seed=seed)\n"
        "        return np.ones(2, np.float32), {}\n\n"
        "    def step(self, action):\n"
        "        return np.ones(2, np.float32), float(action == 1), True, False, {}\n\n\n"
        f"gym.register({env_id!r}, entry_point=Pays)\n")
    return f"{name}:{env_id}"


def run_twice(module, script, cwd, capsys, *argv, fresh=(), env=None, timeout=240):
    """The same command line twice at once: in a fresh process (in cwd/0, with the flags `fresh` added and the
    variables `env` set or, as None, unset) and in this one (in cwd/1), one core each. Each run's episodic
    returns. The two differ where a fresh process can hide a missing seed: this one's global state (torch's and
    numpy's generators, what earlier tests left) is not a fresh process's, and its hash seed is another
    (unless PYTHONHASHSEED is set)."""
    os.makedirs(Path(cwd) / "0", exist_ok=True)
    environ = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *argv, *fresh], cwd=Path(cwd) / "0",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ)
    try:
        here = run_main(module, Path(cwd) / "1", capsys, *argv)
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        proc.kill()  # nothing once it has ended; if this one failed or it ran too long, no run is left behind
        proc.wait()
    assert proc.returncode == 0, stderr
    assert here.returncode == 0, here.stderr
    returns = []
    for i in range(2):
        (run,) = (Path(cwd) / str(i) / "runs").iterdir()
        returns.append(read_tags(run)[0]["charts/episodic_return"])
    return returns


def after_this_second():
    """Sleep into the next second. A SummaryWriter's file is named by the second it was made in, then by the
    process id: two runs' files in one folder within a second would be read in the order of their pids."""
    time.sleep(1 - time.time() % 1)


def interrupt_script(module, script, cwd, capsys, *argv, timeout=120, grace=60):
    """Two runs of `argv`, each in its own folder under `cwd`, stopped once it has logged charts/SPS (a training
    iteration): one in a fresh process by Ctrl-C (SIGINT), one in this process by SIGTERM (what `kill`, `timeout`
    and cluster schedulers send). Returns [(signum, the finished run, its folder)]. A run in this process that
    ignores SIGTERM ends this process: unhandled, at once; handled but not obeyed within `grace` seconds, by
    SIGKILL. Either way the test fails loudly rather than waiting for the run to end."""
    folders = {signum: Path(cwd) / signal.Signals(signum).name for signum in (signal.SIGINT, signal.SIGTERM)}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    # A shell's background job (`pytest &`) starts with SIGINT ignored, which the child would keep:
    # give it the default a terminal's Ctrl-C meets.
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *argv], cwd=folders[signal.SIGINT],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    here_done = threading.Event()

    def sigterm_here():
        if not here_done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
            if not here_done.wait(grace):
                os.kill(os.getpid(), signal.SIGKILL)
    sends = {signal.SIGINT: lambda: proc.poll() is None and proc.send_signal(signal.SIGINT),
             signal.SIGTERM: sigterm_here}

    def stop_each_once_it_trains():
        deadline, waiting = time.time() + timeout, dict(folders)
        try:
            while waiting and time.time() < deadline:
                if here_done.is_set():  # it ended on its own (a failure): nothing to stop here
                    waiting.pop(signal.SIGTERM, None)
                for signum, folder in list(waiting.items()):
                    events = list(folder.glob("runs/*/events.*"))
                    if events and b"charts/SPS" in events[0].read_bytes():  # tags are text
                        del waiting[signum]
                        sends[signum]()
                time.sleep(0.2)
        finally:  # at the deadline, or if this thread fails: no run is left to train forever
            for signum in waiting:
                sends[signum]()
    stopper = threading.Thread(target=stop_each_once_it_trains, daemon=True)
    stopper.start()
    try:
        here = run_main(module, folders[signal.SIGTERM], capsys, *argv)
    finally:
        here_done.set()
        stopper.join()
        try:
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()  # nothing once it has ended; else no run is left behind
    return [(signal.SIGINT, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
             folders[signal.SIGINT]), (signal.SIGTERM, here, folders[signal.SIGTERM])]


@pytest.fixture
def python_sigint():
    """SIGINT raising KeyboardInterrupt, as in a terminal, even where pytest runs in a shell's
    background job (which starts with SIGINT ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def make_runs_unwritable(cwd):
    """A file where the runs/ directory should go: no run directory can be made there. (A
    read-only directory would not do: the tests may run as root, who writes anywhere.)"""
    os.makedirs(cwd, exist_ok=True)
    (Path(cwd) / "runs").write_text("not a directory")


def read_tags(run_dir):
    """({scalar tag: [values]}, {text tag: its text}) from a run's TensorBoard event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = {tag: [e.value for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
    texts = {tag: " ".join(str(e.tensor_proto) for e in ea.Tensors(tag)) for tag in ea.Tags()["tensors"]}
    return scalars, texts


def read_steps(run_dir, tag):
    """The steps `tag` was logged at, in the order TensorBoard reads them (after any purge)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return [e.step for e in ea.Scalars(tag)]


def watch_saves(module, monkeypatch, tag="losses/policy_loss"):
    """[(the step each checkpoint of `module`'s run is saved at, the steps `tag` is on disk for at that moment)]:
    a run killed after a save resumes from it and purges the logs after it, so the ones before must be there.
    The run's SummaryWriter holds every scalar until flush() or close(), as a writer thread that has not yet
    run would: what is on disk at a save is what the run flushed before it."""
    from torch.utils import tensorboard

    class LateWriter(tensorboard.SummaryWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.held = []

        def add_scalar(self, *args, **kwargs):
            self.held.append((args, kwargs))

        def flush(self):
            for args, kwargs in self.held:
                super().add_scalar(*args, **kwargs)
            self.held.clear()
            super().flush()

        def close(self):
            self.flush()
            super().close()

    seen = []
    save = module.save_checkpoint

    def look_then_save(path, args, global_step, *rest):
        try:
            seen.append((global_step, read_steps(os.path.dirname(path), tag)))
        except KeyError:  # nothing of `tag` on disk yet
            seen.append((global_step, []))
        save(path, args, global_step, *rest)

    monkeypatch.setattr(tensorboard, "SummaryWriter", LateWriter)
    monkeypatch.setattr(module, "save_checkpoint", look_then_save)
    return seen


def steps_of_the_last_writer(run_dir, tag):
    """The steps `tag` was logged at in the run's newest event file (TensorBoard reads them in name order):
    what the last process to write there logged, a resumed run's own."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    newest = sorted(Path(run_dir).glob("events.out.tfevents.*"))[-1]
    return [e.step for e in EventFileLoader(str(newest)).Load() if any(v.tag == tag for v in e.summary.value)]


def ranks_played_alike(run_dir, ranks=2):
    """Whether each iteration's logged episodes (rank 0's, then rank 1's, ...: gather_episodes' order) are
    `ranks` copies of one list, every iteration: the ranks' envs and action draws were seeded alike, so
    N ranks learned from N copies of one rank's data."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    by_step = {}
    for e in ea.Scalars("charts/episodic_return"):
        by_step.setdefault(e.step, []).append(e.value)
    def copies(episodes):
        n = len(episodes) // ranks
        return len(episodes) % ranks == 0 and all(episodes[i * n:(i + 1) * n] == episodes[:n] for i in range(ranks))
    return all(copies(episodes) for episodes in by_step.values())


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


# (rank, TORCHELASTIC_RUN_ID, whether it prints the error, whether it waits for torchrun to stop it)
USER_ERROR_UNDER_TORCHRUN = [("0", "torchrun", True, False), ("1", "torchrun", False, True), ("1", None, False, False)]


def user_error_as_rank(module, tmp_path, capsys, monkeypatch, rank, launcher, says, waits):
    """A mistake every rank meets (--num-envs 0), made by `module`'s main as torchrun's rank `rank`: exit code 2;
    rank 0 alone prints it; another rank waits 30 s for torchrun to stop it, since torchrun stops every worker
    once one exits with an error and a rank leaving first could stop rank 0 before it printed the job's one line.
    Without torchrun (TORCHELASTIC_RUN_ID unset) no one would stop it: it leaves at once."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    if launcher:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", launcher)
    slept = []
    monkeypatch.setattr(module.time, "sleep", slept.append)
    out = run_main(module, tmp_path, capsys, "--num-envs", "0")
    assert out.returncode == 2, out.stderr
    assert ("--num-envs must be positive" in out.stderr) == says and out.stderr.count("\n") == says, out.stderr
    assert slept == ([30] if waits else [])


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


# ---------------------------------------------------------------------------------------------
# Tiny envs with a known answer: a learner that is broken does not learn them
# ---------------------------------------------------------------------------------------------

def one_hot(s):
    x = np.zeros(2, np.float32)
    x[s] = 1.0
    return x


class Bandit(gym.Env):
    """A one-step contextual bandit: the state s is 0 or 1 at random, seen one-hot; action a = s
    pays 1, the other action 0; every episode ends after its one step. The answer is known:
    π(a = s | s) = 1, a return of 1; a uniform policy scores 0.5, a sign-flipped learner 0."""

    observation_space = gym.spaces.Box(0.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.s = int(self.np_random.integers(2))
        return one_hot(self.s), {}

    def step(self, action):
        return one_hot(self.s), float(int(action) == self.s), True, False, {}


class NextStepBandit(gym.vector.VectorEnv):
    """N Bandits in one vector env that autoresets NEXT_STEP, as Gymnasium's native CartPole does:
    the step after an episode's end is a reset step, whose action the env ignores. Here the reset
    step pays 2 for the wrong action (a ≠ s of the episode that ended, whose one-hot it was given)
    and 0 for the right one. Learned from, reset steps make the wrong action look better (2·½
    against 1·½): only a learner that leaves them out, as it must, learns π(a = s | s) → 1.
    Episode statistics count real steps only (RecordEpisodeStatistics skips reset steps)."""

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs=1, **kwargs):
        self.num_envs = num_envs
        self.single_observation_space, self.single_action_space = Bandit.observation_space, Bandit.action_space
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)

    def reset(self, seed=None, options=None):
        self.rng = np.random.default_rng(seed)
        self.s = self.rng.integers(2, size=self.num_envs)
        self.reset_next = np.zeros(self.num_envs, bool)
        return np.stack([one_hot(s) for s in self.s]), {}

    def step(self, actions):
        actions = np.asarray(actions)
        rewards = np.where(self.reset_next, 2.0 * (actions != self.s), 1.0 * (actions == self.s))
        ended = ~self.reset_next  # every real step ends its episode; a reset step starts one
        self.s = np.where(self.reset_next, self.rng.integers(2, size=self.num_envs), self.s)
        obs = np.stack([one_hot(s) for s in self.s])
        self.reset_next = ended
        return obs, rewards, ended.copy(), np.zeros(self.num_envs, bool), {}


class ImageBandit(Bandit):
    """The Bandit seen as a frame: a 1x36x36 uint8 image whose left half is lit in state 0 and right
    half in state 1 (36 is the least the Nature CNN takes). Only a working pixel path (frames stored,
    scaled, convolved) learns π(a = s | s) → 1 from it."""

    observation_space = gym.spaces.Box(0, 255, (1, 36, 36), np.uint8)

    @staticmethod
    def frame(s):
        x = np.zeros((1, 36, 36), np.uint8)
        x[:, :, 18 * s:18 * (s + 1)] = 255
        return x

    def reset(self, seed=None, options=None):
        _, info = super().reset(seed=seed)
        return self.frame(self.s), info

    def step(self, action):
        return self.frame(self.s), float(int(action) == self.s), True, False, {}


class ScriptedAtari(gym.vector.VectorEnv):
    """One scripted Atari game as ale-py's vector env reports it (NEXT_STEP, `info["lives"]`), for
    checking by hand what is logged and what the learner sees. Frames (1x36x36) show the step count."""

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}
    # step:        1  2  3  4  5  6  7  (game over) 8 (reset step)  9
    REWARDS = [0, 4, 0, 1, 0, -1, 7, 0, 2]
    LIVES = [3, 3, 2, 2, 1, 1, 0, 3, 3]

    def __init__(self, game="scripted", num_envs=1, reward_clipping=False, episodic_life=False, **ale_options):
        # Stands in for ale_py's AtariVectorEnv too: its own clipping or episodic life (which ends the
        # game at a lost life), if asked for, would reach the log.
        self.reward_clipping, self.episodic_life = reward_clipping, episodic_life
        self.num_envs = 1
        self.single_observation_space = gym.spaces.Box(0, 255, (1, 36, 36), np.uint8)
        self.single_action_space = gym.spaces.Discrete(2)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, 1)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, 1)

    def reset(self, seed=None, options=None):
        self.t = 0
        return np.zeros((1, 1, 36, 36), np.uint8), {"lives": np.array([3])}

    def step(self, actions):
        reward, lives = self.REWARDS[self.t], self.LIVES[self.t]
        self.t += 1
        over = self.t == 7 or (self.episodic_life and self.t > 1 and lives < self.LIVES[self.t - 2])
        reward = np.sign(reward) if self.reward_clipping else reward
        return (np.full((1, 1, 36, 36), self.t, np.uint8), np.array([float(reward)]), np.array([over]),
                np.array([False]), {"lives": np.array([lives])})


class ShortGames(gym.vector.VectorEnv):
    """Two Atari-like envs (4x84x84 frame stacks, NEXT_STEP) whose games last 2 steps (env 0) and 3 (env 1):
    each frame of env 0's game n is grey level 10 n, so a video shows which game it filmed."""

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self):
        self.num_envs, self.lengths = 2, np.array([2, 3])
        self.single_observation_space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
        self.single_action_space = gym.spaces.Discrete(2)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, 2)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, 2)

    def frames(self):
        obs = np.zeros((2, 4, 84, 84), np.uint8)
        obs[:, -1] = (10 * self.game)[:, None, None]
        return obs

    def reset(self, seed=None, options=None):
        self.t, self.game, self.ended = np.zeros(2, int), np.zeros(2, int), np.zeros(2, bool)
        return self.frames(), {}

    def step(self, actions):
        self.game += self.ended  # the step after a game's end starts the next
        self.t = np.where(self.ended, 0, self.t + 1)
        over = ~self.ended & (self.t == self.lengths)
        self.ended = over
        return self.frames(), np.zeros(2), over, np.zeros(2, bool), {"_episode": over}


gym.register("Bandit-v0", entry_point=Bandit)
gym.register("ImageBandit-v0", entry_point=ImageBandit)


class Float64Bandit(Bandit):
    """The Bandit with float64 observations, as MuJoCo's are."""

    observation_space = gym.spaces.Box(0.0, 1.0, (2,), np.float64)

    def reset(self, seed=None, options=None):
        obs, info = super().reset(seed=seed)
        return obs.astype(np.float64), info

    def step(self, action):
        obs, *rest = super().step(action)
        return obs.astype(np.float64), *rest


gym.register("Float64Bandit-v0", entry_point=Float64Bandit)
gym.register("NextStepBandit-v0", entry_point=Bandit, vector_entry_point=NextStepBandit)


# ---------------------------------------------------------------------------------------------
# Many processes: what torchrun does, in-process, so a test can look at every rank's numbers
# ---------------------------------------------------------------------------------------------

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out_dir, environ, fn, args):
    os.environ.clear()  # the test's environment as it is now, not the forkserver's from when it started
    os.environ.update(environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import faulthandler
    import torch
    faulthandler.register(signal.SIGUSR1)  # finish_ranks asks a rank that hangs where it is
    torch.set_num_threads(1)
    result = fn(rank, *args)
    if torch.distributed.is_initialized():  # a group left alive can abort the process as it exits
        torch.distributed.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


# What every rank imports (torch._dynamo: what an optimizer's first call imports, ~1 s).
RANK_PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "torch.utils.tensorboard", "gymnasium", "tyro",
                "conftest", "reinforce", "a2c", "ppo", "ppo_continuous"]


def start_forkserver():
    """The server the ranks are forked from, started once per test process with RANK_PRELOAD imported: spawned
    instead, each rank took ~3 s of CPU to import them, two per test (~40 of the suite's ~330 CPU-seconds).
    A rank still sees the test's environment (`_rank_main` sets it), but what was read at import time (torch's
    OMP_NUM_THREADS) was the server's. Python 3.11's server ignores the caller's sys.path, so it starts with the
    scripts and the tests on PYTHONPATH."""
    import multiprocessing
    from multiprocessing import forkserver
    multiprocessing.set_forkserver_preload(RANK_PRELOAD)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")] + ([saved] if saved else []))
    try:
        forkserver.ensure_running()  # after the first call, nothing
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


def start_ranks(fn, world, *args, tmp_path):
    """fn(rank, *args) in `world` processes with torchrun's environment (RANK, WORLD_SIZE, MASTER_*),
    started; `finish_ranks` waits for them. fn joins the group itself (the script's own way, or
    `join_gloo`); a module-level function, so the rank processes can import it."""
    import torch.multiprocessing as mp
    out_dir = tmp_path / f"ranks-{time.monotonic_ns()}"
    out_dir.mkdir()
    start_forkserver()
    return mp.start_processes(_rank_main, args=(world, free_port(), str(out_dir), dict(os.environ), fn, args),
                              nprocs=world, join=False, start_method="forkserver"), out_dir


def finish_ranks(started, timeout=60):
    """What each rank returned; a rank left waiting (a collective another rank never joined) fails the test."""
    import torch
    context, out_dir = started
    deadline = time.time() + timeout
    while not context.join(timeout=1):
        if time.time() > deadline:
            for p in context.processes:  # each rank's Python stack to stderr, then an end
                if p.is_alive():
                    os.kill(p.pid, signal.SIGUSR1)
            time.sleep(1)
            for p in context.processes:
                p.kill()
            pytest.fail(f"the ranks did not finish within {timeout} s")
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(len(context.processes))]


def run_ranks(fn, world, *args, tmp_path, timeout=120):
    return finish_ranks(start_ranks(fn, world, *args, tmp_path=tmp_path), timeout)


def join_gloo(seconds=20):
    """The process group, with a short timeout: a rank left waiting in a collective fails the test quickly."""
    from datetime import timedelta
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=timedelta(seconds=seconds))


def train_as_rank(rank, script, network, cwd, argv, envs_from=None, rank_1_differs=False):
    """A rank of a torchrun job: `script`'s main (a module name), in `cwd`; returns its exit code and the
    final parameters of the `network` (a class name) it trained. `envs_from`: a module that registers the
    env (a test module), imported first. `rank_1_differs`: rank 1 builds other initial weights, as
    another machine's arithmetic might."""
    import importlib
    import torch
    if envs_from:
        importlib.import_module(envs_from)
    module = importlib.import_module(script)
    os.chdir(cwd)
    made = []

    class Recorded(getattr(module, network)):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if rank_1_differs and rank == 1:
                with torch.no_grad():
                    for p in self.parameters():
                        p.add_(0.01)
            made.append(self)

    setattr(module, network, Recorded)
    try:
        module.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, {name: p.detach().clone() for name, p in made[0].named_parameters()}


def fail_together_as_rank(script, ranks) -> list:
    """What `script.fail_together` raised on this rank, for a UserError on rank 0 alone, on rank 1 alone, on
    neither: rank 0 alone writes the run's folder and starts the W&B run, and had it alone exited 2,
    the other rank would have crashed in its next collective, a traceback on a user's mistake."""
    raised = []
    for failing in (0, 1, None):
        try:
            with script.fail_together(ranks):
                if ranks.rank == failing:
                    raise script.UserError("a mistake only this rank finds")
            raised.append(None)
        except script.UserError as e:
            raised.append(str(e))
    return raised


def start_alike_as_rank(script, agent, ranks) -> tuple:
    """What `script.start_alike` does on this rank: (rank 0's weights before it, this rank's after it, where
    rank 1's differed from rank 0's; what it raises where the ranks resume from different steps)."""
    import torch
    flat = lambda: torch.cat([p.detach().flatten() for p in agent.parameters()]).clone()
    if ranks.rank == 1:
        with torch.no_grad():
            for p in agent.parameters():
                p.add_(1.0)
    before = flat() if ranks.rank == 0 else None
    script.start_alike(agent, 0, ranks)
    after = flat()
    try:
        script.start_alike(agent, 1000 * (ranks.rank + 1), ranks)
        return before, after, None
    except script.UserError as e:
        return before, after, str(e)


def exit_code_where_runs_is_unwritable(rank, script, network, cwd, argv, envs_from=None, rank_1_differs=False):
    """The exit code of a torchrun rank of `script` (train_as_rank's arguments) in a folder where rank 0
    alone finds a mistake: it cannot make the run's folder."""
    import importlib
    if envs_from:
        importlib.import_module(envs_from)
    module = importlib.import_module(script)
    os.chdir(cwd)
    folder = f"unwritable-{os.environ['MASTER_PORT']}"
    make_runs_unwritable(folder)
    os.chdir(folder)
    try:
        module.main(argv)
        return 0
    except SystemExit as e:
        return e.code
    finally:
        os.chdir(cwd)


def slow_rank_0_save_as_rank(rank, script, cwd, argv):
    """A rank of a 2-rank run of `script` (a module name) whose rank 0 takes 1 s longer to write its checkpoint:
    when rank 0 had written it and when each rank had left the group."""
    import importlib
    module = importlib.import_module(script)
    os.chdir(cwd)
    times = {}
    save, leave = module.save_checkpoint, module.leave_ranks

    def slow_save(*args, **kwargs):
        time.sleep(1)  # without the end-of-run barrier rank 1 leaves at least this long before rank 0 has saved
        save(*args, **kwargs)
        times["saved"] = time.time()

    def timed_leave(*args, **kwargs):
        leave(*args, **kwargs)
        times["left"] = time.time()

    module.save_checkpoint, module.leave_ranks = slow_save, timed_leave
    module.main(argv)
    return times


def collectives_then_training(rank, collectives, ports, *train_args):
    """A rank that first runs `collectives(rank)` in a gloo group (join_gloo), leaves it, then starts as a
    torchrun rank where runs/ cannot be written (`exit_code_where_runs_is_unwritable`), then trains as one,
    `train_as_rank(rank, *train_args)`, each in a new group on one of `ports`: one spawn for all three,
    since each spawn spends seconds importing. Returns the three results."""
    import torch.distributed as dist
    tested = collectives(rank)
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(ports[0])
    refused = exit_code_where_runs_is_unwritable(rank, *train_args)
    os.environ["MASTER_PORT"] = str(ports[1])
    return tested, refused, train_as_rank(rank, *train_args)


def stop_one_rank(script, network, argv, tmp_path):
    """Two ranks training; once rank 0 has logged, SIGTERM to rank 1 alone, as a scheduler might.
    Returns what each rank returned (its exit code, its parameters) and the run's checkpoint."""
    import torch
    started = start_ranks(train_as_rank, 2, script, network, str(tmp_path), argv, tmp_path=tmp_path)
    deadline = time.time() + 60
    while time.time() < deadline and not any(b"charts/SPS" in e.read_bytes() for e in tmp_path.glob("runs/*/events.*")):
        time.sleep(0.2)
    os.kill(started[0].processes[1].pid, signal.SIGTERM)
    ranks = finish_ranks(started)
    (run,) = (tmp_path / "runs").iterdir()
    return ranks, torch.load(run / "model.pt", weights_only=True)
