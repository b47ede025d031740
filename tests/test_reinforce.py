"""Tests of reinforce.py: rewards-to-go, normalisation, loss and log-probabilities against
numbers worked out by hand; the episode batching in both autoreset modes; the script end to end."""

import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

import reinforce
from conftest import (ROOT, watch_saves, run_twice, Bandit, Counter, interrupt_script, make_runs_unwritable, one_hot, one_line_error, read_steps, read_tags,
                      run_main, run_script, toy_env_module, wandb_records, WANDB_OFFLINE, TRACKING, after_this_second,
                      steps_of_the_last_writer)


def cols(rows, dtype=np.float32):
    """Hand-written per-env rows -> a (T, N) array."""
    return np.array(rows, dtype=dtype).T


# ---------------------------------------------------------------------------------------------
# Rewards-to-go, normalisation, loss
# ---------------------------------------------------------------------------------------------

def test_discounted_returns_of_two_episodes_of_unequal_length():
    # γ = 0.5. Env 0 plays episode A, rewards 1, 2, 4 (3 steps); env 1 plays episode B,
    # rewards 3, 1 (2 steps) and then a step that belongs to no episode (reward 7, masked).
    rewards = cols([[1, 2, 4], [3, 1, 7]])
    dones = cols([[0, 0, 1], [0, 1, 1]], bool)
    returns = reinforce.discounted_returns(rewards, dones, 0.5)
    # A: G2 = 4, G1 = 2 + 0.5·4 = 4, G0 = 1 + 0.5·4 = 3
    #    (the seed's list [r_T, r_T + γ r_{T-1}, ...] would give 4, 5, 5.25)
    # B: G1 = 1, G0 = 3 + 0.5·1 = 3.5 (the masked step's 7 must not leak in)
    np.testing.assert_allclose(returns[:, 0], [3, 4, 4])
    np.testing.assert_allclose(returns[:2, 1], [3.5, 1])


def test_discounted_returns_stop_at_each_episode_end_in_a_column():
    # One env, an episode of 2 steps truncated by a time limit, then one of 1 step: rewards
    # 1, 2 | 4. Truncation ends the sum like a termination (finite-horizon return): G = 2, 2 | 4.
    rewards = np.array([[1.0], [2.0], [4.0]], np.float32)
    dones = np.array([[False], [True], [True]])
    np.testing.assert_allclose(reinforce.discounted_returns(rewards, dones, 0.5)[:, 0], [2, 2, 4])


def test_normalize_returns():
    # The batch's G of the first test: 3, 4, 4, 3.5, 1. Mean 15.5/5 = 3.1; deviations -0.1,
    # 0.9, 0.9, 0.4, -2.1; squares sum 6.2; sample variance 6.2/4 = 1.55, std 1.2449900.
    g = torch.tensor([3.0, 4.0, 4.0, 3.5, 1.0])
    expected = torch.tensor([-0.1, 0.9, 0.9, 0.4, -2.1]) / 1.2449900
    torch.testing.assert_close(reinforce.normalize_returns(g), expected)


def test_reinforce_loss():
    # -1/N Σ log π · Ĝ with N = 2 episodes: Σ = (-0.5)(1) + (-1)(-1) + (-2)(0.5) = -0.5 → 0.25
    log_probs = torch.tensor([-0.5, -1.0, -2.0])
    returns = torch.tensor([1.0, -1.0, 0.5])
    assert reinforce.reinforce_loss(log_probs, returns, 2).item() == pytest.approx(0.25)


def test_one_gradient_step_follows_the_sign_of_the_normalised_return():
    torch.manual_seed(0)
    policy = reinforce.Policy(2, gym.spaces.Discrete(2))
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    obs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    actions = torch.tensor([0, 1])
    returns = torch.tensor([1.0, -1.0])  # action 0 in s1 did well, action 1 in s2 badly
    log_probs, _ = policy.log_prob_and_entropy(obs, actions)
    before = log_probs.detach().clone()
    opt.zero_grad()
    reinforce.reinforce_loss(log_probs, returns, 1).backward()
    opt.step()
    after, _ = policy.log_prob_and_entropy(obs, actions)
    assert after[0] > before[0]  # log π(a=0|s1) raised
    assert after[1] < before[1]  # log π(a=1|s2) lowered


def test_gaussian_log_prob_and_entropy():
    # log N(a; μ, σ²) = -(a-μ)²/(2σ²) - log σ - ½ log 2π, with ½ log 2π = 0.9189385:
    # dim 1: a = 1, μ = 0, σ = 1 → -0.5 - 0 - 0.9189385 = -1.4189385
    # dim 2: a = 0.5, μ = 0.5, σ = 2 → 0 - 0.6931472 - 0.9189385 = -1.6120857; sum -3.0310242
    log_std = torch.tensor([0.0, math.log(2.0)])
    lp = reinforce.gaussian_log_prob(torch.tensor([[1.0, 0.5]]), torch.tensor([[0.0, 0.5]]), log_std)
    assert lp.item() == pytest.approx(-3.0310242)
    # H = Σ ½ log(2πe) + log σ = 2·1.4189385 + 0.6931472 = 3.5310242
    assert reinforce.gaussian_entropy(log_std).item() == pytest.approx(3.5310242)


def test_categorical_log_prob_and_entropy():
    policy = reinforce.Policy(3, gym.spaces.Discrete(2))
    with torch.no_grad():
        policy.net[-1].weight.zero_()
        policy.net[-1].bias.copy_(torch.log(torch.tensor([0.25, 0.75])))
    lp, ent = policy.log_prob_and_entropy(torch.zeros(2, 3), torch.tensor([0, 1]))
    torch.testing.assert_close(lp, torch.log(torch.tensor([0.25, 0.75])))
    # H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351
    torch.testing.assert_close(ent, torch.full((2,), 0.5623351))


def test_numpy_policy_matches_the_network_and_samples_the_torch_normal():
    policy = reinforce.Policy(3, gym.spaces.Box(-1, 1, (2,)))
    with torch.no_grad():
        policy.log_std.copy_(torch.log(torch.tensor([0.5, 2.0])))
    obs = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    acting = reinforce.NumpyPolicy(policy, np.random.default_rng(0))
    np.testing.assert_allclose(acting.forward(obs), policy.net(torch.from_numpy(obs)).detach().numpy(), atol=1e-6)
    normal = torch.distributions.Normal(policy.net(torch.from_numpy(obs[:1]))[0], policy.log_std.exp())
    samples = acting(np.repeat(obs[:1], 20_000, axis=0))
    np.testing.assert_allclose(samples.mean(0), normal.mean.detach().numpy(), atol=0.05)  # σ/√n ≈ 0.004, 0.014
    np.testing.assert_allclose(samples.std(0), normal.stddev.detach().numpy(), rtol=0.03)


# ---------------------------------------------------------------------------------------------
# Batches of complete episodes from a real Gymnasium vector env
# ---------------------------------------------------------------------------------------------

def counter_envs(mode):
    # Env 0 terminates after 3 steps; env 1 is cut by a time limit after 2.
    return gym.vector.SyncVectorEnv(
        [lambda: Counter(terminate_at=3), lambda: gym.wrappers.TimeLimit(Counter(), max_episode_steps=2)],
        autoreset_mode=mode)


def zeros_policy(obs):
    return np.zeros(len(obs), np.int64)


def test_collect_episodes_same_step():
    batch = reinforce.collect_episodes(counter_envs(AutoresetMode.SAME_STEP), zeros_policy, 2, seed=0)
    # env 0 plays 3 + 3 steps; env 1 plays 2 + 2 steps, then waits (masked) for env 0.
    assert batch.num_episodes == 4
    assert batch.obs[:, :, 0].T.tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 0, 1]]
    assert batch.rewards.T.tolist() == [[1, 2, 3, 1, 2, 3], [1, 2, 1, 2, 1, 2]]
    assert batch.dones.T.tolist() == [[False, False, True] * 2, [False, True] * 3]
    assert batch.mask.T.tolist() == [[True] * 6, [True] * 4 + [False] * 2]
    # γ = 0.5: episode 1, 2, 3 → G = 2.75, 3.5, 3; episode 1, 2 → G = 2, 2
    returns = reinforce.discounted_returns(batch.rewards, batch.dones, 0.5)
    assert returns[batch.mask].tolist() == [2.75, 2, 3.5, 2, 3, 2, 2.75, 2, 3.5, 3]


def test_only_the_batch_episodes_are_reported():
    # As above: env 1's third episode (steps 4-5, masked while it waits for env 0) is no part of
    # the batch, so it is not logged: the batch's four episodes score 1+2+3 = 6 and 1+2 = 3.
    logged = []
    envs = gym.wrappers.vector.RecordEpisodeStatistics(counter_envs(AutoresetMode.SAME_STEP))
    batch = reinforce.collect_episodes(envs, zeros_policy, 2, seed=0,
                                       on_episode=lambda r, l: logged.extend(zip(r.tolist(), l.tolist())))
    assert batch.complete
    assert logged == [(3, 2), (6, 3), (3, 2), (6, 3)]


def test_a_step_budget_ends_the_batch_incomplete():
    # Env 0 needs 6 steps for its two episodes, env 1 4: 6 steps of both envs, 12 ≤ 12, fit.
    assert reinforce.collect_episodes(counter_envs(AutoresetMode.SAME_STEP), zeros_policy, 2, seed=0,
                                      max_steps=12).complete
    # 11 steps leave room for 5 steps of both envs: env 0's second episode does not end. Env 1's
    # two episodes and env 0's first did, but the batch is not trained on, so none is reported:
    # reported, they would be the short ones (the long ones are cut), a biased sample.
    logged = []
    envs = gym.wrappers.vector.RecordEpisodeStatistics(counter_envs(AutoresetMode.SAME_STEP))
    short = reinforce.collect_episodes(envs, zeros_policy, 2, seed=0, max_steps=11,
                                       on_episode=lambda r, l: logged.extend(zip(r.tolist(), l.tolist())))
    assert not short.complete and short.mask.size == 10
    assert logged == []


def test_total_timesteps_is_never_exceeded(tmp_path, capsys):
    out = run_main(reinforce, tmp_path, capsys, "--env-id", "Bandit-v0", "--total-timesteps", "100", "--num-envs", "4",
                   "--episodes-per-update", "8", "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    # One-step episodes: a batch of 8 takes 8 steps (2 per env): 12 batches, 96 steps. The 13th gets
    # the 4 steps left, one per env, ends incomplete and is not trained on: 100 steps played, no more.
    assert torch.load(run / "model.pt", weights_only=True)["global_step"] == 100
    tags = read_tags(run)[0]
    assert len(tags["losses/policy_loss"]) == 12
    returns = tags["charts/episodic_return"]
    assert len(returns) == 96  # the 12 batches' episodes, not the 4 that end within the 13th
    status = [line for line in out.stdout.splitlines() if line.startswith("step ")][-1]
    assert "step 100/100" in status and f"return (last  96) {np.mean(returns):9.2f}" in status  # the same


def test_collect_episodes_next_step_masks_reset_steps():
    batch = reinforce.collect_episodes(counter_envs(AutoresetMode.NEXT_STEP), zeros_policy, 2, seed=0)
    # env 0: 0→1, 1→2, 2→3 (end), reset step, 0→1, 1→2, 2→3 (end)
    # env 1: 0→1, 1→2 (end), reset step, 0→1, 1→2 (end), then masked steps: reset, 0→1
    assert batch.obs[:, :, 0].T.tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 0, 1, 2, 0]]
    assert batch.rewards.T.tolist() == [[1, 2, 3, 0, 1, 2, 3], [1, 2, 0, 1, 2, 0, 1]]
    assert batch.mask.T.tolist() == [[True, True, True, False, True, True, True],
                                     [True, True, False, True, True, False, False]]
    returns = reinforce.discounted_returns(batch.rewards, batch.dones, 0.5)
    assert returns[:, 0][batch.mask[:, 0]].tolist() == [2.75, 3.5, 3, 2.75, 3.5, 3]
    assert returns[:, 1][batch.mask[:, 1]].tolist() == [2, 2, 2, 2]


class Echo(gym.Env):
    """Box action in [-1, 1]; the reward is the action the env received; 2 steps an episode."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.n = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        assert self.action_space.contains(action), action
        self.n += 1
        return np.zeros(1, np.float32), float(action[0]), self.n == 2, False, {}


def test_collect_episodes_clips_box_actions_only_for_the_env():
    envs = gym.vector.SyncVectorEnv([Echo, Echo], autoreset_mode=AutoresetMode.SAME_STEP)
    policy = lambda obs: np.array([[5.0], [-3.0]], np.float32)  # outside [-1, 1]
    batch = reinforce.collect_episodes(envs, policy, 1, seed=0)
    assert batch.actions[:, :, 0].T.tolist() == [[5.0, 5.0], [-3.0, -3.0]]  # stored as sampled
    assert batch.rewards.T.tolist() == [[1.0, 1.0], [-1.0, -1.0]]  # the env got them clipped


class Echo64(Echo):
    """Echo observing in float64, as MuJoCo does."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float64)

    def reset(self, seed=None, options=None):
        obs, info = super().reset(seed=seed)
        return obs.astype(np.float64), info

    def step(self, action):
        obs, *rest = super().step(action)
        return obs.astype(np.float64), *rest


def test_a_float64_observation_env_is_acted_on_and_stored_in_float32():
    envs = gym.vector.SyncVectorEnv([Echo64, Echo64], autoreset_mode=AutoresetMode.SAME_STEP)
    assert envs.reset(seed=0)[0].dtype == np.float64
    policy = reinforce.NumpyPolicy(reinforce.Policy(1, Echo64.action_space), np.random.default_rng(0))
    batch = reinforce.collect_episodes(envs, policy, 1, seed=0)
    assert batch.obs.dtype == np.float32 and batch.actions.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------------

SMALL = ["--total-timesteps", "1500", "--num-envs", "4", "--episodes-per-update", "4"]
TAGS = {"charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS",
        "losses/policy_loss", "losses/entropy"}


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])  # Discrete (NEXT_STEP), Box (SAME_STEP)
def test_smoke_train_save_and_evaluate(tmp_path, capsys, env_id):
    out = run_main(reinforce, tmp_path, capsys, "--env-id", env_id, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert f"reinforce.py: logs in runs/{run.name}/\n" in out.stdout  # where to point TensorBoard
    assert run.name.startswith(f"{env_id}__reinforce__1__")
    tags, texts = read_tags(run)
    assert TAGS <= set(tags)
    assert "|episodes_per_update|4|" in texts["hyperparameters/text_summary"]
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["script"] == "reinforce.py" and ckpt["global_step"] >= 1500

    # By the run's folder, with no --env-id: the checkpoint's env.
    # Training's batch flags are no evaluation's business: no "less than one batch", no "not a multiple".
    out = run_main(reinforce, tmp_path, capsys, "--eval-checkpoint", str(run), "--eval-episodes", "2",
                   "--total-timesteps", "1", "--episodes-per-update", "3")
    assert out.returncode == 0, out.stderr
    assert f"eval: 2 episodes of {env_id}" in out.stdout


@pytest.mark.parametrize("every", ["0", "600"])  # a save each iteration and the final one; the final one alone
def test_the_logs_are_on_disk_before_each_checkpoint(tmp_path, capsys, monkeypatch, every):
    # Killed just after a save (the final one included: torchrun stops rank 0 when a peer dies), the run resumes
    # from the checkpoint and purges what came after it: what came before must be on disk already.
    saves = watch_saves(reinforce, monkeypatch)
    assert run_main(reinforce, tmp_path, capsys, *SMALL, "--save-model", "--checkpoint-every", every).returncode == 0
    (run,) = (tmp_path / "runs").iterdir()
    logged = read_steps(run, "losses/policy_loss")
    assert len(saves) > 2 if every == "0" else len(saves) == 1
    for step, on_disk in saves:
        assert on_disk == [s for s in logged if s <= step]


def test_a_run_too_short_for_one_batch_says_nothing_was_learned(tmp_path, capsys):
    # Pendulum's episodes take 200 steps; 400 steps over 4 envs end none of them.
    out = run_main(reinforce, tmp_path, capsys, "--env-id", "Pendulum-v1", "--num-envs", "4", "--episodes-per-update", "4",
                   "--total-timesteps", "400")
    assert out.returncode == 0, out.stderr
    assert "reinforce.py: --total-timesteps ran out before 4 episodes ended: nothing was learned" in out.stdout


def test_same_seed_same_returns_tracked_or_not(tmp_path, capsys):
    # Tracked by Weights & Biases (offline) in the fresh process where wandb is installed, untracked in this one.
    returns = run_twice(reinforce, "reinforce.py", tmp_path, capsys, *SMALL, "--seed", "3",
                        fresh=["--track"] if TRACKING else [], env=WANDB_OFFLINE)
    assert len(returns[0]) > 10
    assert returns[0] == returns[1]
    if TRACKING:  # the W&B run is the run (a resumed one goes on in it), with the scalars and the flags
        ((name, record),) = wandb_records(tmp_path / "0").items()
        (run,) = (tmp_path / "0" / "runs").iterdir()
        assert name.endswith(run.name)
        for tag in (b"wandb_project_name",  # a flag only the config holds
                    b"charts/episodic_return", b"losses/policy_loss", b"learning_rate", b"CartPole-v1"):
            assert tag in record, tag


@pytest.mark.parametrize("argv, fragments", [
    (["--env-id", "NoSuchEnv-v0"], ["unknown env id", "NoSuchEnv-v0"]),
    (["--env-id", "ALE/Breakout-v5"],
     ["ALE/Breakout-v5 is an Atari game", "ppo.py and a2c.py", "reinforce.py takes vector observations"]),
    (["--env-id", "ale_py:PongNoFrameskip-v4"], ["ale_py:PongNoFrameskip-v4 is an Atari game"]),
    (["--env-id", "Breakout-v4"], ["Breakout-v4 is an Atari game"]),  # registered by ale-py, which is not loaded
    (["--num-envs", "4", "--episodes-per-update", "6"], ["not a multiple of --num-envs 4"]),
    (["--num-envs", "0"], ["--num-envs must be positive"]),
    (["--episodes-per-update", "-2"], ["--episodes-per-update must be positive"]),
    (["--eval-checkpoint", "missing.pt"], ["no checkpoint at missing.pt"]),
    (["--total-timesteps", "10"], ["less than one batch"]),
    (["--seed", "-1"], ["--seed must lie in [0, 2^32)", "-1"]),
    (["--seed", "99999999999"], ["--seed must lie in [0, 2^32)"]),
    (["--seed", "99999999999", "--eval-checkpoint", "model.pt"], ["--seed must lie in [0, 2^32)"]),
    (["--learning-rate", "nan"], ["--learning-rate must be a finite number, got nan"]),
    (["--checkpoint-every", "-1"], ["--checkpoint-every must be 0 or more seconds"]),
    (["--resume", ""], ["--resume was given an empty path"]),  # "$RUN" unset: not a new run
    (["--eval-checkpoint", ""], ["--eval-checkpoint was given an empty path"]),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, fragments):
    one_line_error(run_main(reinforce, tmp_path, capsys, *argv), "reinforce.py", *fragments)


def test_a_user_error_from_the_command_line_has_no_traceback(tmp_path):
    one_line_error(run_script("reinforce.py", tmp_path, "--env-id", "NoSuchEnv-v0"), "reinforce.py", "unknown env id")


def test_checkpoint_errors(tmp_path, capsys):
    foreign = tmp_path / "ppo.pt"
    torch.save({"script": "ppo.py", "model": {}, "args": {"env_id": "NoSuchEnv-v0"}}, foreign)
    one_line_error(run_main(reinforce, tmp_path, capsys, "--eval-checkpoint", str(foreign)), "reinforce.py", "written by ppo.py")
    out = run_main(reinforce, tmp_path, capsys, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    one_line_error(run_main(reinforce, tmp_path, capsys, "--env-id", "Pendulum-v1", "--eval-checkpoint",
                            str(run / "model.pt")), "reinforce.py", "trained on CartPole-v1", "--env-id CartPole-v1")
    # --env-id given, even as its default, wins over the checkpoint's env (relabelled here as Acrobot-v1's).
    ckpt = torch.load(run / "model.pt", weights_only=True)
    relabelled = tmp_path / "relabelled.pt"
    torch.save({**ckpt, "args": {**ckpt["args"], "env_id": "Acrobot-v1"}}, relabelled)
    out = run_main(reinforce, tmp_path, capsys, "--env-id", "CartPole-v1", "--eval-checkpoint", str(relabelled),
                   "--eval-episodes", "1")
    assert out.returncode == 0 and "eval: 1 episode of CartPole-v1" in out.stdout, out.stderr


def test_first_ctrl_c_is_a_request_and_the_second_interrupts(python_sigint):
    before = signal.getsignal(signal.SIGINT)
    stop = reinforce.StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: training goes on to a safe point
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):  # the second: at once
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_an_ignored_ctrl_c_stays_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job of a shell script
    try:
        stop = reinforce.StopRequest()
        os.kill(os.getpid(), signal.SIGINT)
        assert not stop.requested and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        stop.restore()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_ctrl_c_and_sigterm_save_model_and_logs(tmp_path, capsys):
    stopped = interrupt_script(reinforce, "reinforce.py", tmp_path, capsys, "--total-timesteps", "10000000",
                               "--save-model")
    for signum, out, folder in stopped:
        assert out.returncode == 128 + signum, out.stderr  # 130 after Ctrl-C, 143 after SIGTERM
        assert "Traceback" not in out.stderr
        assert f"stopped by {'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'} at step" in out.stdout
        (run,) = (folder / "runs").iterdir()
        assert 0 < torch.load(run / "model.pt", weights_only=True)["global_step"] < 10_000_000  # stopped early
        assert read_tags(run)[0]["charts/SPS"]


def test_non_finite_loss_stops_and_saves(tmp_path, capsys, monkeypatch):
    # The third update's loss is NaN (a softmax policy saturates rather than overflow, so no
    # learning rate reliably produces one).
    calls, real_loss = [], reinforce.reinforce_loss

    def loss_nan_on_third_call(log_probs, returns, num_episodes):
        calls.append(1)
        return real_loss(log_probs, returns, num_episodes) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(reinforce, "reinforce_loss", loss_nan_on_third_call)
    out = run_main(reinforce, tmp_path, capsys, *SMALL, "--total-timesteps", "20000", "--save-model")
    assert out.returncode == 1, out.stderr
    assert len(calls) == 3 and "NaN or infinite at step" in out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    model = torch.load(run / "model.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in model.values())


def test_a_crash_saves_what_was_learned(tmp_path, capsys, monkeypatch):
    real_collect = reinforce.collect_episodes
    calls = []

    def collect_then_crash(*a, **k):  # the second batch's env crashes, after one update
        calls.append(1)
        if len(calls) == 2:
            raise OSError("the env's simulator died")
        return real_collect(*a, **k)
    monkeypatch.setattr(reinforce, "collect_episodes", collect_then_crash)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError):
        reinforce.main(["--env-id", "Bandit-v0", "--total-timesteps", "64", "--num-envs", "4",
                        "--episodes-per-update", "8", "--save-model"])
    (run,) = (tmp_path / "runs").iterdir()
    assert torch.load(run / "model.pt", weights_only=True)["global_step"] == 8 and len(calls) == 2
    assert "(crashed)" in capsys.readouterr().out


def test_capture_video_without_a_renderer(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pygame", None)  # as if pygame (which renders CartPole) were not installed
    real_find_spec = reinforce.importlib.util.find_spec
    monkeypatch.setattr(reinforce.importlib.util, "find_spec",  # as if moviepy were installed
                        lambda name, *a: object() if name == "moviepy" else real_find_spec(name, *a))
    one_line_error(run_main(reinforce, tmp_path, capsys, *SMALL, "--capture-video"), "reinforce.py",
                   "--capture-video cannot render CartPole-v1", "pygame")


def test_incomplete_or_misshapen_checkpoints_are_one_line(tmp_path, capsys):
    incomplete = tmp_path / "incomplete.pt"
    torch.save({"script": "reinforce.py"}, incomplete)
    one_line_error(run_main(reinforce, tmp_path, capsys, "--eval-checkpoint", str(incomplete)), "reinforce.py",
                   "incomplete reinforce.py checkpoint", "model")
    out = run_main(reinforce, tmp_path, capsys, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run / "model.pt", weights_only=True)
    ckpt["model"] = {"some.layer": torch.zeros(3)}
    torch.save(ckpt, tmp_path / "misshapen.pt")
    one_line_error(run_main(reinforce, tmp_path, capsys, "--eval-checkpoint", str(tmp_path / "misshapen.pt")),
                   "reinforce.py", "weights do not fit")


def test_sigterm_is_a_request_too():
    def previous(signum, frame):  # stands in for the default handler, which would end the test run
        pass
    before = signal.signal(signal.SIGTERM, previous)
    try:
        stop = reinforce.StopRequest()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested and stop.exit_code == 143
            assert signal.getsignal(signal.SIGTERM) is previous  # a second SIGTERM acts as it would have
        finally:
            stop.restore()
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_unwritable_working_directory_is_one_line(tmp_path, capsys):
    out = run_main(reinforce, tmp_path / "train", capsys, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "train" / "runs").iterdir()
    make_runs_unwritable(tmp_path / "ro")
    one_line_error(run_main(reinforce, tmp_path / "ro", capsys, *SMALL), "reinforce.py",
                   "cannot write runs/CartPole-v1__reinforce__1__")
    out = run_main(reinforce, tmp_path / "ro", capsys, "--eval-checkpoint", str(run / "model.pt"), "--eval-episodes", "2")
    assert "eval: 2 episodes of CartPole-v1: return" in out.stdout
    one_line_error(out, "reinforce.py", "cannot write runs/CartPole-v1__reinforce-eval__1__")


def test_numpy_policy_samples_follow_the_torch_categorical_and_act_in_float32():
    torch.manual_seed(0)
    policy = reinforce.Policy(3, gym.spaces.Discrete(3))
    with torch.no_grad():
        policy.net[-1].bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    probs = torch.distributions.Categorical(logits=policy.net(torch.zeros(1, 3))).probs[0].detach().numpy()
    acting = reinforce.NumpyPolicy(policy, np.random.default_rng(0))
    actions = acting(np.zeros((40_000, 3)))  # float64 observations, as MuJoCo gives
    np.testing.assert_allclose(np.bincount(actions, minlength=3) / len(actions), probs, atol=0.01)
    assert acting.forward(np.zeros((2, 3))).dtype == np.float32


def test_categorical_sampler_with_an_exponential_draw_of_zero_is_finite():
    class ZeroAt1:  # a generator whose exponential draw for action 1 is exactly 0 (-log 0 = inf)
        def standard_exponential(self, shape, dtype):
            e = np.ones(shape, dtype)
            e[..., 1] = 0.0
            return e
    policy = reinforce.NumpyPolicy(reinforce.Policy(2, gym.spaces.Discrete(4)), ZeroAt1())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "divide by zero encountered in log" fails the test
        actions = policy(np.zeros((3, 2), np.float32))
    np.testing.assert_array_equal(actions, [1, 1, 1])


@pytest.mark.parametrize("env_id", ["Bandit-v0", "NextStepBandit-v0"])
def test_learns_a_contextual_bandit(tmp_path, capsys, env_id):
    # π(a = s | s) → 1: the last 100 episodes score above 0.9 (uniform: 0.5; a sign-flipped learner: 0).
    # NextStepBandit's reset steps pay the wrong action: only a learner that leaves them out gets here.
    out = run_main(reinforce, tmp_path, capsys, "--env-id", env_id, "--total-timesteps", "4096")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert np.mean(read_tags(run)[0]["charts/episodic_return"][-100:]) > 0.9


class ContinuousBandit(gym.Env):
    """A one-step target: s is 0 or 1 at random, seen one-hot; reward -(a - u_s)², u = (-0.5, 0.5).
    It observes in float64, as MuJoCo does: the script must train in float32 all the same."""

    observation_space = gym.spaces.Box(0.0, 1.0, (2,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.s = int(self.np_random.integers(2))
        return one_hot(self.s).astype(np.float64), {}

    def step(self, action):
        return one_hot(self.s).astype(np.float64), -float((action[0] - (self.s - 0.5)) ** 2), True, False, {}


gym.register("ReinforceContinuousBandit-v0", entry_point=ContinuousBandit)


def test_learns_a_continuous_bandit(tmp_path, capsys):
    out = run_main(reinforce, tmp_path, capsys, "--env-id", "ReinforceContinuousBandit-v0", "--total-timesteps", "8192",
                   "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    policy = reinforce.Policy(2, ContinuousBandit.action_space)
    policy.load_state_dict(torch.load(run / "model.pt", weights_only=True)["model"])
    # The Gaussian's mean found both targets (a random or sign-flipped policy is off by 0.5 or more).
    np.testing.assert_allclose(policy.act_deterministic(torch.eye(2))[:, 0].detach().numpy(), [-0.5, 0.5], atol=0.15)


def test_the_update_averages_the_batch_steps_over_its_episodes(tmp_path, capsys, monkeypatch):
    # L = -1/N Σ_i Σ_t: the loss sees exactly the batch's steps (no reset step of the NEXT_STEP
    # CartPole, no step an env plays while it waits) and divides by N = 4 episodes, not by the
    # number of steps. The batch's steps are its episodes' lengths, as logged.
    seen, real_loss = [], reinforce.reinforce_loss

    def spy(log_probs, returns, num_episodes):
        seen.append((len(log_probs), len(returns), num_episodes))
        return real_loss(log_probs, returns, num_episodes)

    monkeypatch.setattr(reinforce, "reinforce_loss", spy)
    out = run_main(reinforce, tmp_path, capsys, "--num-envs", "2", "--episodes-per-update", "4",
                   "--total-timesteps", "400")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    lengths = read_tags(run)[0]["charts/episodic_length"]
    assert len(seen) >= 3 and len(lengths) == 4 * len(seen)
    for k, (num_log_probs, num_returns, num_episodes) in enumerate(seen):
        assert num_episodes == 4
        assert num_log_probs == num_returns == sum(lengths[4 * k: 4 * k + 4])


class ShiftedBandit(Bandit):
    """Bandit-v0 paying 5 more for every action: its rewards-to-go are Bandit-v0's plus 5."""

    def step(self, action):
        obs, reward, *rest = super().step(action)
        return obs, reward + 5.0, *rest


gym.register("ReinforceShiftedBandit-v0", entry_point=ShiftedBandit)


@pytest.mark.parametrize("normalize", [True, False])
def test_normalized_returns_make_the_update_blind_to_a_reward_shift(tmp_path, capsys, normalize):
    # One-step episodes, so G = r. Normalised, Ĝ = (G - μ)/σ is the same for r and r + 5: the same
    # seed learns the same weights on both bandits. Not normalised, +5 adds 5·Σ∇log π to every
    # gradient (Adam's step is blind to a gradient's scale, not to a shift), so the weights part.
    flag = "--normalize-returns" if normalize else "--no-normalize-returns"
    weights = []
    for env_id in ["Bandit-v0", "ReinforceShiftedBandit-v0"]:
        out = run_main(reinforce, tmp_path / env_id, capsys, "--env-id", env_id, "--total-timesteps", "256",
                       "--num-envs", "4", "--episodes-per-update", "8", flag, "--save-model")
        assert out.returncode == 0, out.stderr
        (run,) = (tmp_path / env_id / "runs").iterdir()
        model = torch.load(run / "model.pt", weights_only=True)["model"]
        weights.append(torch.cat([v.flatten() for v in model.values()]))
    gap = (weights[0] - weights[1]).abs().max().item()
    assert gap < 1e-5 if normalize else gap > 1e-2, gap


# ---------------------------------------------------------------------------------------------
# Periodic, atomic checkpoints and --resume
# ---------------------------------------------------------------------------------------------

def test_a_crash_while_writing_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "model.pt")
    reinforce.write_atomically({"script": "reinforce.py", "global_step": 1}, path)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        reinforce.write_atomically({"script": "reinforce.py", "global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_a_killed_run_resumes_where_its_checkpoint_left_it(tmp_path, capsys):
    # Killed with SIGKILL after its first periodic checkpoint, then resumed: it ends at (about)
    # --total-timesteps, and TensorBoard has each update's step once, in order.
    argv = ["--num-envs", "4", "--episodes-per-update", "4", "--total-timesteps", "15000", "--save-model",
            "--checkpoint-every", "0"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "reinforce.py"), *argv], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(tmp_path.glob("runs/*/model.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    (checkpoint,) = tmp_path.glob("runs/*/model.pt")
    killed_at = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 0 < killed_at < 12000

    after_this_second()  # its logs are read after the killed run's
    out = run_main(reinforce, tmp_path, capsys, "--resume", str(checkpoint.parent))
    assert out.returncode == 0, out.stderr
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt["global_step"] > 12000  # the last batch may not fit
    steps = read_steps(checkpoint.parent, "losses/policy_loss")
    assert steps == sorted(set(steps)) and steps[0] <= killed_at < steps[-1]
    assert min(steps_of_the_last_writer(checkpoint.parent, "charts/episodic_return")) > killed_at  # went on, not over
    episode_steps = read_steps(checkpoint.parent, "charts/episodic_return")
    assert episode_steps == sorted(episode_steps)


def test_a_resumed_run_starts_from_the_checkpoint_exactly(tmp_path, capsys):
    out = run_main(reinforce, tmp_path, capsys, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    before = torch.load(run / "model.pt", weights_only=True)
    out = run_main(reinforce, tmp_path, capsys, "--resume", str(run / "model.pt"), "--total-timesteps",
                   str(before["global_step"]))
    assert out.returncode == 0, out.stderr
    after = torch.load(run / "model.pt", weights_only=True)
    assert after["global_step"] == before["global_step"]
    for name, tensor in before["model"].items():
        assert torch.equal(tensor, after["model"][name])
    for i, state in before["optimizer"]["state"].items():
        assert all(torch.equal(state[k], after["optimizer"]["state"][i][k]) for k in ("exp_avg", "exp_avg_sq"))
    assert after["rng"]["acting"] == before["rng"]["acting"]


def test_resuming_with_a_flag_that_cannot_change_is_one_line(tmp_path, capsys):
    out = run_main(reinforce, tmp_path, capsys, *SMALL, "--save-model")
    (run,) = (tmp_path / "runs").iterdir()
    one_line_error(run_main(reinforce, tmp_path, capsys, "--resume", str(run), "--episodes-per-update", "8"),
                   "reinforce.py", "--episodes-per-update cannot change when resuming", "4", "8")
    steps = torch.load(run / "model.pt", weights_only=True)["global_step"]
    one_line_error(run_main(reinforce, tmp_path, capsys, "--resume", str(run), "--total-timesteps", str(steps - 1)),
                   "reinforce.py", f"--total-timesteps {steps - 1} is less than the {steps} steps the run has taken")
    out = run_main(reinforce, tmp_path, capsys, "--resume", str(run))  # a finished run: says so
    assert out.returncode == 0, out.stderr
    assert f"reinforce.py: the run has taken all {steps} of its --total-timesteps" in out.stdout


def test_a_second_ctrl_c_stops_at_once_and_saves_as_interrupted_not_crashed(tmp_path, capsys, monkeypatch):
    # The second Ctrl-C raises KeyboardInterrupt wherever it lands: here, at the first status line.
    def lands_here(self, step, recent_returns, force=False):
        if not force:
            raise KeyboardInterrupt
    monkeypatch.setattr(reinforce.StatusLine, "update", lands_here)
    out = run_main(reinforce, tmp_path, capsys, *SMALL, "--save-model")
    assert out.returncode == 130 and out.stderr.strip() == "reinforce.py: interrupted"
    (run,) = (tmp_path / "runs").iterdir()
    assert f"model saved to runs/{run.name}/model.pt (a second Ctrl-C)" in out.stdout
    assert torch.load(run / "model.pt", weights_only=True)["global_step"] > 0


def test_the_status_line_shows_the_last_step_once(capsys):
    status = reinforce.StatusLine(total=100, every=0.0)
    status.update(50, [1.0])
    status.update(100, [1.0])
    status.update(100, [1.0], force=True)  # as training's end does, whether or not the last iteration showed it
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["50/100", "100/100"]
    held = reinforce.StatusLine(total=100, every=1e9)
    held.update(100, [1.0])  # too soon after the start: not shown
    held.update(100, [1.0], force=True)
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["100/100"]


def test_what_was_logged_after_the_checkpoint_is_dropped_on_resume(tmp_path, capsys, monkeypatch):
    # A run logs its batches, but its last checkpoint is from its second (as when it dies before the
    # next): resumed, the rest is trained and logged again, and the steps stay strictly increasing.
    kept = []
    save = reinforce.save_checkpoint
    def keep_the_second(path, *rest):
        save(path, *rest)
        kept.append(open(path, "rb").read())
    monkeypatch.setattr(reinforce, "save_checkpoint", keep_the_second)
    out = run_main(reinforce, tmp_path, capsys, *SMALL, "--save-model", "--checkpoint-every", "0")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert len(read_steps(run, "losses/policy_loss")) > 3
    (run / "model.pt").write_bytes(kept[1])
    out = run_main(reinforce, tmp_path, capsys, "--resume", str(run))
    assert out.returncode == 0, out.stderr
    steps = read_steps(run, "losses/policy_loss")
    assert steps == sorted(set(steps))
    episodes = read_steps(run, "charts/episodic_return")
    assert episodes == sorted(episodes)


def test_a_checkpoint_from_before_resume_evaluates_and_cannot_be_resumed(tmp_path, capsys):
    out = run_main(reinforce, tmp_path, capsys, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    old = torch.load(run / "model.pt", weights_only=True)
    del old["rng"]  # as written before --resume existed
    torch.save(old, tmp_path / "old.pt")
    env = old["args"]["env_id"]
    out = run_main(reinforce, tmp_path, capsys, "--env-id", env, "--eval-checkpoint", str(tmp_path / "old.pt"),
                   "--eval-episodes", "2")
    assert out.returncode == 0, out.stderr
    one_line_error(run_main(reinforce, tmp_path, capsys, "--resume", str(tmp_path / "old.pt")), "reinforce.py",
                   "written before --resume existed")


def test_under_torchrun_it_says_it_runs_in_one_process(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    one_line_error(run_main(reinforce, tmp_path, capsys, "--env-id", "CartPole-v1"), "reinforce.py",
                   "runs in one process", "torchrun")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None or importlib.util.find_spec("moviepy") is None,
                    reason="needs wandb and moviepy (pip install wandb moviepy)")
def test_track_with_weights_and_biases_offline_and_film_the_evaluation(tmp_path, capsys):
    out = run_main(reinforce, tmp_path, capsys, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    out = run_script("reinforce.py", tmp_path, "--eval-checkpoint", str(run / "model.pt"), "--eval-episodes", "2",
                     "--capture-video", "--track", env=WANDB_OFFLINE)
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stderr.splitlines() if not line.startswith("wandb:")] == []  # no SDL noise, no warning
    videos = sorted(p.name for p in (tmp_path / "videos").glob("CartPole-v1__reinforce-eval__1__*/*.mp4"))
    assert videos == ["eval-0-episode-0.mp4", "eval-1-episode-0.mp4"]  # each evaluated episode, once
    unfilmed = run_main(reinforce, tmp_path, capsys, "--eval-checkpoint", str(run / "model.pt"), "--eval-episodes", "2")
    assert unfilmed.stdout.splitlines()[0] == out.stdout.splitlines()[0]  # filmed or not, the same episodes
    ((_, evaluated),) = wandb_records(tmp_path).items()  # the training run was not tracked
    assert b"eval/episodic_return" in evaluated and b"eval-1-episode-0" in evaluated  # and the videos
    assert len(list((tmp_path / "wandb").glob("offline-run-*eval*/files/media/videos/**/*.mp4"))) == 2


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="needs wandb (pip install wandb)")
def test_track_without_a_wandb_login_is_one_line(tmp_path, capsys, monkeypatch):
    import wandb

    def no_login(**kwargs):  # what wandb.init raises with no API key and no terminal to ask for one
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")
    monkeypatch.setattr(wandb.tensorboard, "patch", lambda **kwargs: None)  # no SummaryWriter patched in this process
    monkeypatch.setattr(wandb, "init", no_login)
    one_line_error(run_main(reinforce, tmp_path, capsys, *SMALL, "--track"), "reinforce.py",
                   "--track: Weights & Biases could not start a run (No API key configured.", "WANDB_MODE=offline")


def test_track_without_wandb(tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(reinforce.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    one_line_error(run_main(reinforce, tmp_path, capsys, *SMALL, "--track"), "reinforce.py", "--track",
                   "pip install wandb")


def test_an_env_from_the_users_own_module(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    env_id = toy_env_module(tmp_path, "toy_reinforce")  # imported by the script, not here
    out = run_main(reinforce, tmp_path, capsys, "--env-id", env_id, "--total-timesteps", "2048")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("toy_reinforce-ToyReinforce-v0__reinforce__1__")
    assert np.mean(read_tags(run)[0]["charts/episodic_return"][-100:]) > 0.9  # it learned to take the action that pays
    one_line_error(run_main(reinforce, tmp_path, capsys, "--env-id", "no_such_module:Pays-v0"), "reinforce.py",
                   "cannot import 'no_such_module' for --env-id no_such_module:Pays-v0")
