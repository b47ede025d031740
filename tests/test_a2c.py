"""Tests of a2c.py: n-step returns and each loss term against numbers worked out by hand, the
signs of the combined loss, the rollout's episode boundaries, and the script end to end."""

from dataclasses import asdict
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
import tyro
from gymnasium.vector import AutoresetMode

import a2c
from conftest import (ROOT, watch_saves, slow_rank_0_save_as_rank, run_twice, Counter, interrupt_script, fail_together_as_rank, start_alike_as_rank,
                      join_gloo, make_runs_unwritable, one_hot, one_line_error, ranks_played_alike, read_steps,
                      read_tags, run_main, run_ranks, run_script, ScriptedAtari, ShortGames, stop_one_rank,
                      collectives_then_training, free_port, toy_env_module, wandb_records, WANDB_OFFLINE, TRACKING,
                      USER_ERROR_UNDER_TORCHRUN, user_error_as_rank, after_this_second, steps_of_the_last_writer)


def cols(rows, dtype=np.float32):
    """Hand-written per-env rows -> an (n, N) array."""
    return np.array(rows, dtype=dtype).T


# ---------------------------------------------------------------------------------------------
# n-step returns
# ---------------------------------------------------------------------------------------------

def test_next_state_values_reuse_the_next_steps_value_and_run_the_critic_on_the_rest():
    class Critic:  # V(s) = 10 s, and a record of the states it was asked about
        asked = []

        def get_value(self, x):
            self.asked += x.flatten().tolist()
            return 10.0 * x.float().flatten()

    # (n=3 steps, N=2 envs), one number per state. Env 0 ends an episode at t=1 in SAME_STEP mode: its
    # next state (the final observation 9) is not where step 2 starts (3). Env 1 ends one at t=0 in
    # NEXT_STEP mode: step 1 is its reset step (not valid; it starts from the final observation 5), and
    # step 2 starts from the new episode's first observation 6.
    obs = np.array([[1, 4], [2, 5], [3, 6]], np.uint8)[..., None]
    next_obs = np.array([[2, 5], [9, 6], [7, 8]], np.uint8)[..., None]
    valid = np.array([[True, True], [True, False], [True, True]])
    rollout = a2c.Rollout(obs, None, None, None, None, next_obs, valid)
    values = np.array([10.5, 40.5, 20.5, 30.5, 60.5], np.float32)  # the loss's pass, valid steps in order
    critic = Critic()
    next_values = a2c.next_state_values(critic, rollout, values, torch.device("cpu"))
    # Reused: env 0 at t=0, env 1 at t=1. Asked: the reset step's state 5, env 0's final state 9, the last step.
    np.testing.assert_allclose(next_values, [[20.5, 50.0], [90.0, 60.5], [70.0, 80.0]])
    assert sorted(critic.asked) == [5, 7, 8, 9]

    # n = 1 (--num-steps 1): no next step to reuse, so the critic is asked about every next state.
    one_step = a2c.Rollout(obs[:1], None, None, None, None, next_obs[:1], valid[:1])
    next_values = a2c.next_state_values(Critic(), one_step, values[:2], torch.device("cpu"))
    np.testing.assert_allclose(next_values, [[20.0, 50.0]])


def test_n_step_returns_with_termination_and_truncation():
    # n = 4, N = 2, γ = 0.9. Env 0 terminates at t=1 (the final state's value 9.0 is unused);
    # env 1 is truncated at t=2 and bootstraps from V(final obs) = 5.0. After the rollout
    # the returns bootstrap from V(s_4): 0.8 for env 0, 2.0 for env 1.
    rewards = cols([[1, 1, 1, 1], [0, 2, 0, 1]])
    next_values = cols([[0.5, 9.0, 0.4, 0.8], [1.0, 3.0, 5.0, 2.0]])
    terminations = cols([[0, 1, 0, 0], [0, 0, 0, 0]], bool)
    truncations = cols([[0, 0, 0, 0], [0, 0, 1, 0]], bool)
    returns = a2c.n_step_returns(rewards, next_values, terminations, truncations, 0.9)
    # Env 0: R3 = 1 + 0.9·0.8 = 1.72; R2 = 1 + 0.9·1.72 = 2.548; R1 = 1 (terminal);
    #        R0 = 1 + 0.9·1 = 1.9 (V(s_1) = 0.5 is not used: the rollout continues)
    # Env 1: R3 = 1 + 0.9·2 = 2.8; R2 = 0 + 0.9·5 = 4.5 (truncated: bootstrapped, and R3 is
    #        the next episode's, not chained); R1 = 2 + 0.9·4.5 = 6.05; R0 = 0.9·6.05 = 5.445
    np.testing.assert_allclose(returns, cols([[1.9, 1, 2.548, 1.72], [5.445, 6.05, 4.5, 2.8]]), rtol=1e-6)


def test_n_step_return_of_one_step_is_the_td_target():
    # n = 1: R_0 = r_0 + γ V(s_1) = 1 + 0.5·4 = 3, the seed's r + γV(s').
    r = a2c.n_step_returns(np.array([[1.0]], np.float32), np.array([[4.0]], np.float32),
                           np.array([[False]]), np.array([[False]]), 0.5)
    assert r[0, 0] == pytest.approx(3.0)


# ---------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------

def test_advantages_are_constants():
    values = torch.tensor([1.0, 2.0], requires_grad=True)
    adv = a2c.advantages(torch.tensor([3.0, 1.0]), values)
    torch.testing.assert_close(adv, torch.tensor([2.0, -1.0]))
    assert not adv.requires_grad


def test_normalize_advantages():
    # mean 2, sample std 1 → (-1, 0, 1); and 10·A + 5 = (15, 25, 35): mean 25, std 10 → (-1, 0, 1) again,
    # so with --norm-adv the actor's step does not depend on the scale of the returns.
    for a in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([15.0, 25.0, 35.0])):
        torch.testing.assert_close(a2c.normalize_advantages(a, a.mean(), a.std()), torch.tensor([-1.0, 0.0, 1.0]))
    # One advantage (a batch of one valid step) has no std, NaN for torch: it is left as it is, not made NaN.
    one = torch.tensor([3.0])
    assert a2c.normalize_advantages(one, *a2c.union_mean_std(one, a2c.Ranks())).item() == pytest.approx(3.0)


def test_merge_and_unmerge_moments_by_hand():
    # A = {1, 3}: mean 2, variance 1. B = {5, 7, 9}: mean 7, variance 8/3. Together {1, 3, 5, 7, 9}:
    # mean 5, variance (16 + 4 + 0 + 4 + 16) / 5 = 8. Merge: δ = 5, μ = 2 + 5·3/5 = 5,
    # σ² = (2·1 + 3·8/3 + 25·2·3/5) / 5 = (2 + 8 + 30) / 5 = 8.
    a, b = (np.array([2.0]), np.array([1.0]), 2.0), (np.array([7.0]), np.array([8 / 3]), 3.0)
    mean, var, n = a2c.merge_moments(a, b)
    assert (mean[0], var[0], n) == pytest.approx((5.0, 8.0, 5.0))
    # And back: what the five hold beyond A is B.
    mean, var, n = a2c.unmerge_moments((np.array([5.0]), np.array([8.0]), 5.0), a)
    assert (mean[0], var[0], n) == pytest.approx((7.0, 8 / 3, 3.0))
    assert a2c.unmerge_moments((np.array([5.0]), np.array([8.0]), 5.0), (np.array([5.0]), np.array([8.0]), 5.0))[2] == 0


def test_actor_loss():
    # -mean(log π · A) = -mean((-1)(2), (-2)(1)) = -(-2) = 2
    assert a2c.actor_loss(torch.tensor([-1.0, -2.0]), torch.tensor([2.0, 1.0])).item() == pytest.approx(2.0)


def test_critic_loss_huber_and_mse():
    values = torch.zeros(3)
    returns = torch.tensor([0.5, 2.0, -3.0])
    # Huber (δ = 1): ½·0.25 = 0.125; 2 - ½ = 1.5; 3 - ½ = 2.5 → mean 4.125/3 = 1.375
    assert a2c.critic_loss(values, returns, "huber").item() == pytest.approx(1.375)
    # squared error: (0.25 + 4 + 9)/3 = 4.416667
    assert a2c.critic_loss(values, returns, "mse").item() == pytest.approx(13.25 / 3)


def test_a2c_loss_combines_with_the_right_signs():
    # 2 + 0.5·1.375 - 0.01·0.6 = 2.6815
    loss = a2c.a2c_loss(torch.tensor(2.0), torch.tensor(1.375), torch.tensor(0.6), vf_coef=0.5, ent_coef=0.01)
    assert loss.item() == pytest.approx(2.6815)


def step_on_combined_loss(vf_coef, ent_coef):
    """One SGD step on L with zero advantages; returns (critic error, entropy) before and after."""
    torch.manual_seed(0)
    agent = a2c.ActorCritic((3,), gym.spaces.Discrete(2))
    with torch.no_grad():
        agent.actor.bias.copy_(torch.tensor([2.0, -2.0]))  # a confident policy, far from uniform
    obs = torch.randn(8, 3)
    actions = torch.zeros(8, dtype=torch.long)
    returns = torch.full((8,), 3.0)
    opt = torch.optim.SGD(agent.parameters(), lr=0.05)

    def measure():
        logp, ent, values = agent.evaluate_actions(obs, actions)
        return logp, ent, values

    logp, ent, values = measure()
    error_before, entropy_before = ((returns - values) ** 2).mean().item(), ent.mean().item()
    loss = a2c.a2c_loss(a2c.actor_loss(logp, torch.zeros(8)), a2c.critic_loss(values, returns), ent.mean(),
                        vf_coef, ent_coef)
    opt.zero_grad()
    loss.backward()
    opt.step()
    _, ent, values = measure()
    return error_before, ((returns - values) ** 2).mean().item(), entropy_before, ent.mean().item()


def test_a_step_on_the_combined_loss_lowers_the_critic_error_and_raises_the_entropy():
    e0, e1, _, _ = step_on_combined_loss(vf_coef=0.5, ent_coef=0.0)
    assert e1 < e0
    _, _, h0, h1 = step_on_combined_loss(vf_coef=0.0, ent_coef=1.0)
    assert h1 > h0
    e0, e1, h0, h1 = step_on_combined_loss(vf_coef=0.5, ent_coef=0.5)
    assert e1 < e0 and h1 > h0


def test_gaussian_log_prob_and_entropy():
    # dim 1: a = 1, μ = 0, σ = 1 → -0.5 - 0.9189385; dim 2: a = μ, σ = 2 → -ln 2 - 0.9189385
    log_std = torch.tensor([0.0, float(np.log(2.0))])
    lp = a2c.gaussian_log_prob(torch.tensor([[1.0, 0.5]]), torch.tensor([[0.0, 0.5]]), log_std)
    assert lp.item() == pytest.approx(-3.0310242)
    assert a2c.gaussian_entropy(log_std).item() == pytest.approx(3.5310242)  # 2·1.4189385 + ln 2


def test_numpy_policy_matches_the_network():
    agent = a2c.ActorCritic((4,), gym.spaces.Discrete(3))
    obs = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    logits = a2c.NumpyPolicy(agent, np.random.default_rng(0)).forward(obs)
    np.testing.assert_allclose(logits, agent.actor(agent.body(torch.from_numpy(obs))).detach().numpy(), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The rollout: what a real Gymnasium vector env hands back at episode boundaries
# ---------------------------------------------------------------------------------------------

def counter_envs(mode):
    return gym.vector.SyncVectorEnv(
        [lambda: Counter(terminate_at=3), lambda: gym.wrappers.TimeLimit(Counter(), max_episode_steps=2)],
        autoreset_mode=mode)


@pytest.mark.parametrize("mode", [AutoresetMode.SAME_STEP, AutoresetMode.NEXT_STEP])
def test_rollout_returns_stop_at_episode_ends(mode):
    # V(s) = the observation (steps taken), so every bootstrap value can be read off.
    envs = counter_envs(mode)
    rollout = a2c.Rollout.empty(4, 2, (1,), envs.single_action_space)
    obs, _ = envs.reset(seed=0)
    a2c.collect_rollout(envs, lambda o: np.zeros(len(o), np.int64), rollout, obs, np.zeros(2, bool))
    returns = a2c.n_step_returns(rollout.rewards, rollout.next_obs[..., 0], rollout.terminations,
                                 rollout.truncations, 0.5)
    if mode == AutoresetMode.SAME_STEP:
        # env 0: 0→1 (r 1), 1→2 (r 2), 2→3 (r 3, terminated), 0→1 (r 1, then V = 1)
        #   R3 = 1 + 0.5·1 = 1.5; R2 = 3; R1 = 2 + 1.5 = 3.5; R0 = 1 + 1.75 = 2.75
        # env 1: 0→1 (r 1), 1→2 (r 2, truncated: V(final) = 2), 0→1, 1→2 (truncated, V = 2)
        #   R3 = 2 + 1 = 3; R2 = 1 + 1.5 = 2.5; R1 = 2 + 0.5·2 = 3; R0 = 1 + 1.5 = 2.5
        np.testing.assert_allclose(returns, cols([[2.75, 3.5, 3, 1.5], [2.5, 3, 2.5, 3]]))
        assert rollout.valid.all()
    else:
        # env 0: as above, but t=3 is the reset step (obs 3 → 0, r 0): invalid
        #   R2 = 3; R1 = 3.5; R0 = 2.75
        # env 1: 0→1, 1→2 (truncated; final obs 2 → V = 2), reset step, 0→1 (then V = 1)
        #   R1 = 2 + 0.5·2 = 3; R0 = 2.5; R3 = 1 + 0.5·1 = 1.5
        assert rollout.valid.T.tolist() == [[True, True, True, False], [True, True, False, True]]
        np.testing.assert_allclose(returns[:3, 0], [2.75, 3.5, 3])
        np.testing.assert_allclose(returns[[0, 1, 3], 1], [2.5, 3, 1.5])


def test_evaluation_normalises_observations_with_the_saved_statistics_frozen():
    envs = gym.vector.SyncVectorEnv([Counter, Counter], autoreset_mode=AutoresetMode.NEXT_STEP)
    stats = {"mean": torch.tensor([1.0]), "var": torch.tensor([4.0]), "count": 50.0}
    envs = a2c.frozen_obs_normalization(envs, stats)
    obs, _ = envs.reset(seed=0)
    # (0 - 1) / √4 = -0.5, then (1 - 1) / 2 = 0, (2 - 1) / 2 = 0.5: the statistics do not move.
    np.testing.assert_allclose(obs[:, 0], [-0.5, -0.5], atol=1e-6)
    np.testing.assert_allclose(envs.step(np.zeros(2, np.int64))[0][:, 0], [0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(envs.step(np.zeros(2, np.int64))[0][:, 0], [0.5, 0.5], atol=1e-6)


def test_normalised_rollout_bootstraps_a_truncation_from_the_normalised_final_observation():
    # NEXT_STEP: the final observation is the next step's observation, so it passes through
    # the same normalisation as every other one.
    envs = gym.vector.SyncVectorEnv([lambda: gym.wrappers.TimeLimit(Counter(), max_episode_steps=2)],
                                    autoreset_mode=AutoresetMode.NEXT_STEP)
    envs = a2c.frozen_obs_normalization(envs, {"mean": torch.tensor([1.0]), "var": torch.tensor([4.0]),
                                               "count": 50.0})
    rollout = a2c.Rollout.empty(3, 1, (1,), envs.single_action_space)
    obs, _ = envs.reset(seed=0)
    a2c.collect_rollout(envs, lambda o: np.zeros(len(o), np.int64), rollout, obs, np.zeros(1, bool))
    # raw 0→1, 1→2 (truncated), reset step 2→0; normalised (x - 1)/2
    np.testing.assert_allclose(rollout.next_obs[:, 0, 0], [0.0, 0.5, -0.5], atol=1e-6)
    assert rollout.truncations[:, 0].tolist() == [False, True, False]
    assert rollout.valid[:, 0].tolist() == [True, True, False]


# ---------------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------------

SMALL = ["--total-timesteps", "4096", "--num-envs", "4"]  # 64 updates of 4 envs x 16 steps
TAGS = {"charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS",
        "losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/explained_variance"}


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])  # Discrete (NEXT_STEP), Box (SAME_STEP)
def test_smoke_train_save_and_evaluate(tmp_path, capsys, env_id):
    out = run_main(a2c, tmp_path, capsys, "--env-id", env_id, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert f"a2c.py: logs in runs/{run.name}/\n" in out.stdout  # where to point TensorBoard
    assert run.name.startswith(f"{env_id}__a2c__1__")
    tags, texts = read_tags(run)
    assert TAGS <= set(tags)
    assert "|vf_loss|huber|" in texts["hyperparameters/text_summary"]
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["script"] == "a2c.py" and ckpt["global_step"] == 4096
    obs_dim = 4 if env_id == "CartPole-v1" else 3
    assert ckpt["obs_rms"]["mean"].shape == (obs_dim,) and ckpt["obs_rms"]["count"] > 4000
    assert ckpt["return_rms"]["var"].item() > 0

    # By the run's folder, with no --env-id: the checkpoint's env.
    # Training's batch flags are no evaluation's business: no "less than one update's steps".
    out = run_main(a2c, tmp_path, capsys, "--eval-checkpoint", str(run), "--eval-episodes", "2", "--total-timesteps", "10")
    assert out.returncode == 0, out.stderr
    assert f"eval: 2 episodes of {env_id}" in out.stdout


@pytest.mark.parametrize("every", ["0", "600"])  # a save each iteration and the final one; the final one alone
def test_the_logs_are_on_disk_before_each_checkpoint(tmp_path, capsys, monkeypatch, every):
    # Killed just after a save (the final one included: torchrun stops rank 0 when a peer dies), the run resumes
    # from the checkpoint and purges what came after it: what came before must be on disk already.
    saves = watch_saves(a2c, monkeypatch)
    assert run_main(a2c, tmp_path, capsys, *SMALL, "--save-model", "--checkpoint-every", every).returncode == 0
    (run,) = (tmp_path / "runs").iterdir()
    logged = read_steps(run, "losses/policy_loss")
    assert len(saves) > 2 if every == "0" else len(saves) == 1
    for step, on_disk in saves:
        assert on_disk == [s for s in logged if s <= step]


@pytest.mark.filterwarnings("error::UserWarning")  # torch's "degrees of freedom <= 0" for one value's std or var
def test_one_step_actor_critic_runs(tmp_path, capsys):
    # n = 1, the textbook one-step actor-critic: every V(s') from the critic, and batches of one valid step.
    out = run_main(a2c, tmp_path, capsys, "--num-envs", "1", "--num-steps", "1", "--total-timesteps", "300")
    assert out.returncode == 0, out.stderr


def test_adam_and_mse_run(tmp_path, capsys):
    out = run_main(a2c, tmp_path, capsys, *SMALL, "--optimizer", "adam", "--vf-loss", "mse")
    assert out.returncode == 0, out.stderr


def test_same_seed_same_returns_tracked_or_not(tmp_path, capsys):
    # Tracked by Weights & Biases (offline) in the fresh process where wandb is installed, untracked in this one.
    returns = run_twice(a2c, "a2c.py", tmp_path, capsys, *SMALL, "--seed", "5",
                        fresh=["--track"] if TRACKING else [], env=WANDB_OFFLINE)
    assert len(returns[0]) > 10
    assert returns[0] == returns[1]
    if TRACKING:  # the W&B run is the run (a resumed one goes on in it), with the scalars and the flags
        ((name, record),) = wandb_records(tmp_path / "0").items()
        (run,) = (tmp_path / "0" / "runs").iterdir()
        assert name.endswith(run.name)
        for tag in (b"wandb_project_name",  # a flag only the config holds
                    b"charts/episodic_return", b"losses/value_loss", b"charts/learning_rate", b"CartPole-v1"):
            assert tag in record, tag


@pytest.mark.parametrize("argv, fragments", [
    (["--env-id", "NoSuchEnv-v0"], ["unknown env id", "NoSuchEnv-v0"]),
    (["--num-steps", "0"], ["--num-steps must be positive"]),
    (["--num-envs", "-1"], ["--num-envs must be positive"]),
    (["--total-timesteps", "10"], ["less than one update"]),
    (["--eval-checkpoint", "missing.pt"], ["no checkpoint at missing.pt"]),
    (["--seed", "-1"], ["--seed must lie in [0, 2^32)", "-1"]),
    (["--seed", "99999999999"], ["--seed must lie in [0, 2^32)"]),
    (["--seed", "99999999999", "--eval-checkpoint", "model.pt"], ["--seed must lie in [0, 2^32)"]),
    (["--learning-rate", "nan"], ["--learning-rate must be a finite number, got nan"]),
    (["--atari-noop-max", "-1"], ["--atari-noop-max must be 0 or more"]),
    (["--atari-sticky-actions", "2"], ["--atari-sticky-actions must lie in [0, 1]"]),
    (["--atari-frame-stack", "0"], ["--atari-frame-stack must be positive"]),
    (["--env-id", "ALE/Breakout-v5", "--seed", str(2**31 - 5)], ["--seed must be less than 2^31 - 16"]),
    (["--env-id", "CarRacing-v3"], ["CarRacing-v3 has observation space", "(96, 96, 3)"]),
    (["--checkpoint-every", "-1"], ["--checkpoint-every must be 0 or more seconds"]),
    (["--max-grad-norm", "0"], ["--max-grad-norm must be positive, got 0.0"]),
    (["--resume", ""], ["--resume was given an empty path"]),  # "$RUN" unset: not a new run
    (["--eval-checkpoint", ""], ["--eval-checkpoint was given an empty path"]),
    # A flag for frames or Atari, given where it would do nothing (ImageBandit-v0: frames, but no Atari game).
    (["--atari-frame-skip", "2"], ["--atari-frame-skip 2: for Atari ids only, and CartPole-v1 is not one"]),
    (["--env-id", "ImageBandit-v0", "--no-atari-fire-reset", "--atari-sticky-actions", "0"],
     ["--no-atari-fire-reset, --atari-sticky-actions 0.0: for Atari ids only, and ImageBandit-v0 is not one"]),
    (["--cnn-precision", "float32"], ["--cnn-precision float32: for frames only", "CartPole-v1 does not give them"]),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, fragments):
    one_line_error(run_main(a2c, tmp_path, capsys, *argv), "a2c.py", *fragments)


def test_a_user_error_from_the_command_line_has_no_traceback(tmp_path):
    one_line_error(run_script("a2c.py", tmp_path, "--env-id", "NoSuchEnv-v0"), "a2c.py", "unknown env id")


@pytest.mark.parametrize("rank, launcher, says, waits", USER_ERROR_UNDER_TORCHRUN)
def test_under_torchrun_only_rank_0_says_a_user_error_and_the_others_wait_to_be_stopped(
        tmp_path, capsys, monkeypatch, rank, launcher, says, waits):
    user_error_as_rank(a2c, tmp_path, capsys, monkeypatch, rank, launcher, says, waits)


SEE_TORCH_LOAD = """
import os, sys
class SeeTorchLoad:  # an import hook that looks, then stops: what torch's OpenMP runtime would read as it loads
    def find_spec(self, name, path, target=None):
        if name == "torch":
            print("GOMP_SPINCOUNT when torch loads:", os.environ.get("GOMP_SPINCOUNT"), flush=True)
            os._exit(0)  # all there is to see: loading torch would take seconds
sys.meta_path.insert(0, SeeTorchLoad())
import a2c
"""


@pytest.mark.parametrize("preset, seen", [({}, "30000"), ({"OMP_WAIT_POLICY": "PASSIVE"}, "None"),
                                          ({"GOMP_SPINCOUNT": "7"}, "7")])
def test_torch_threads_spin_briefly_unless_the_user_chose_how_they_wait(preset, seen):
    """libgomp reads its spin count once, when torch loads it: a2c.py sets it before, and not over the user's own."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}  # a2c, imported
    result = subprocess.run([sys.executable, "-c", SEE_TORCH_LOAD], cwd=ROOT, env={**env, **preset},  # here, set it
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"GOMP_SPINCOUNT when torch loads: {seen}"


def test_checkpoint_errors(tmp_path, capsys):
    foreign = tmp_path / "reinforce.pt"
    torch.save({"script": "reinforce.py", "model": {}, "args": {"env_id": "NoSuchEnv-v0"}}, foreign)
    one_line_error(run_main(a2c, tmp_path, capsys, "--eval-checkpoint", str(foreign)), "a2c.py", "written by reinforce.py")
    out = run_main(a2c, tmp_path, capsys, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    one_line_error(run_main(a2c, tmp_path, capsys, "--env-id", "Acrobot-v1", "--eval-checkpoint",
                            str(run / "model.pt")), "a2c.py", "trained on CartPole-v1", "--env-id CartPole-v1")
    one_line_error(run_main(a2c, tmp_path, capsys, "--eval-checkpoint", str(run), "--atari-noop-max", "3"), "a2c.py",
                   "--atari-noop-max 3: for Atari ids only, and CartPole-v1 is not one")  # evaluating too
    # --env-id given, even as its default, wins over the checkpoint's env (relabelled here as Acrobot-v1's).
    ckpt = torch.load(run / "model.pt", weights_only=True)
    relabelled = tmp_path / "relabelled.pt"
    torch.save({**ckpt, "args": {**ckpt["args"], "env_id": "Acrobot-v1"}}, relabelled)
    out = run_main(a2c, tmp_path, capsys, "--env-id", "CartPole-v1", "--eval-checkpoint", str(relabelled),
                   "--eval-episodes", "1")
    assert out.returncode == 0 and "eval: 1 episode of CartPole-v1" in out.stdout, out.stderr


def test_first_ctrl_c_is_a_request_and_the_second_interrupts(python_sigint):
    before = signal.getsignal(signal.SIGINT)
    stop = a2c.StopRequest()
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
        stop = a2c.StopRequest()
        os.kill(os.getpid(), signal.SIGINT)
        assert not stop.requested and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        stop.restore()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_ctrl_c_and_sigterm_save_model_and_logs(tmp_path, capsys):
    stopped = interrupt_script(a2c, "a2c.py", tmp_path, capsys, "--total-timesteps", "100000000", "--save-model")
    for signum, out, folder in stopped:
        assert out.returncode == 128 + signum, out.stderr  # 130 after Ctrl-C, 143 after SIGTERM
        assert "Traceback" not in out.stderr
        assert f"stopped by {'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'} at step" in out.stdout
        (run,) = (folder / "runs").iterdir()
        assert 0 < torch.load(run / "model.pt", weights_only=True)["global_step"] < 100_000_000  # stopped early
        assert TAGS <= set(read_tags(run)[0])


def test_a_crash_saves_what_was_learned(tmp_path, capsys, monkeypatch):
    def crash(*a, **k):
        raise OSError("the env's simulator died")
    real_returns = a2c.n_step_returns

    def returns_then_crash(*a, **k):  # the second update's rollout crashes, after one update
        monkeypatch.setattr(a2c, "collect_rollout", crash)
        return real_returns(*a, **k)
    monkeypatch.setattr(a2c, "n_step_returns", returns_then_crash)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError):
        a2c.main([*SMALL, "--save-model"])
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run / "model.pt", weights_only=True)
    # One update's 64 steps; the observation statistics saw them and the 4 first observations.
    assert ckpt["global_step"] == 64 and ckpt["obs_rms"]["count"] == pytest.approx(68, abs=1e-3)  # + the 1e-4 prior
    assert "(crashed)" in capsys.readouterr().out


def test_non_finite_loss_stops_and_saves(tmp_path, capsys, monkeypatch):
    # The third update's loss is NaN (a softmax policy saturates rather than overflow, so no
    # learning rate reliably produces one).
    calls, real_loss = [], a2c.a2c_loss

    def loss_nan_on_third_call(*args, **kwargs):
        calls.append(1)
        return real_loss(*args, **kwargs) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(a2c, "a2c_loss", loss_nan_on_third_call)
    out = run_main(a2c, tmp_path, capsys, *SMALL, "--save-model")
    assert out.returncode == 1, out.stderr
    assert len(calls) == 3 and "NaN or infinite at step 192" in out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    model = torch.load(run / "model.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in model.values())


def test_capture_video_without_a_renderer(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pygame", None)  # as if pygame (which renders CartPole) were not installed
    real_find_spec = a2c.importlib.util.find_spec
    monkeypatch.setattr(a2c.importlib.util, "find_spec",  # as if moviepy were installed
                        lambda name, *a: object() if name == "moviepy" else real_find_spec(name, *a))
    one_line_error(run_main(a2c, tmp_path, capsys, *SMALL, "--capture-video"), "a2c.py",
                   "--capture-video cannot render CartPole-v1", "pygame")


def test_incomplete_or_misshapen_checkpoints_are_one_line(tmp_path, capsys):
    incomplete = tmp_path / "incomplete.pt"
    torch.save({"script": "a2c.py"}, incomplete)
    one_line_error(run_main(a2c, tmp_path, capsys, "--eval-checkpoint", str(incomplete)), "a2c.py",
                   "incomplete a2c.py checkpoint", "model")
    out = run_main(a2c, tmp_path, capsys, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run / "model.pt", weights_only=True)
    ckpt["model"] = {"some.layer": torch.zeros(3)}
    torch.save(ckpt, tmp_path / "misshapen.pt")
    one_line_error(run_main(a2c, tmp_path, capsys, "--eval-checkpoint", str(tmp_path / "misshapen.pt")),
                   "a2c.py", "weights do not fit")


def test_sigterm_is_a_request_too():
    def previous(signum, frame):  # stands in for the default handler, which would end the test run
        pass
    before = signal.signal(signal.SIGTERM, previous)
    try:
        stop = a2c.StopRequest()
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
    out = run_main(a2c, tmp_path / "train", capsys, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "train" / "runs").iterdir()
    make_runs_unwritable(tmp_path / "ro")
    one_line_error(run_main(a2c, tmp_path / "ro", capsys, *SMALL), "a2c.py", "cannot write runs/CartPole-v1__a2c__1__")
    out = run_main(a2c, tmp_path / "ro", capsys, "--eval-checkpoint", str(run / "model.pt"), "--eval-episodes", "2")
    assert "eval: 2 episodes of CartPole-v1: return" in out.stdout
    one_line_error(out, "a2c.py", "cannot write runs/CartPole-v1__a2c-eval__1__")


# ---------------------------------------------------------------------------------------------
# The acting copy's samplers against torch's distributions
# ---------------------------------------------------------------------------------------------

def test_numpy_policy_samples_follow_the_torch_distributions():
    torch.manual_seed(0)
    agent = a2c.ActorCritic((3,), gym.spaces.Discrete(3))
    with torch.no_grad():
        agent.actor.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    obs = np.zeros((40_000, 3), np.float32)
    probs = torch.distributions.Categorical(logits=agent.actor(agent.body(torch.zeros(1, 3)))).probs[0].detach().numpy()
    actions = a2c.NumpyPolicy(agent, np.random.default_rng(0))(obs)
    np.testing.assert_allclose(np.bincount(actions, minlength=3) / len(actions), probs, atol=0.01)

    agent = a2c.ActorCritic((3,), gym.spaces.Box(-1, 1, (2,)))
    with torch.no_grad():
        agent.log_std.copy_(torch.tensor([-1.0, 0.5]))
    mean = agent.actor(agent.body(torch.zeros(1, 3)))[0].detach().numpy()
    normal = torch.distributions.Normal(torch.from_numpy(mean), agent.log_std.exp().detach())
    actions = a2c.NumpyPolicy(agent, np.random.default_rng(0))(obs)
    np.testing.assert_allclose(actions.mean(0), normal.mean.numpy(), atol=0.02)
    np.testing.assert_allclose(actions.std(0), normal.stddev.numpy(), rtol=0.02)


def test_categorical_sampler_with_an_exponential_draw_of_zero_is_finite():
    class ZeroAt1:  # a generator whose exponential draw for action 1 is exactly 0 (-log 0 = inf)
        def standard_exponential(self, shape, dtype):
            e = np.ones(shape, dtype)
            e[..., 1] = 0.0
            return e
    policy = a2c.NumpyPolicy(a2c.ActorCritic((2,), gym.spaces.Discrete(4)), ZeroAt1())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "divide by zero encountered in log" fails the test
        actions = policy(np.zeros((3, 2), np.float32))
    np.testing.assert_array_equal(actions, [1, 1, 1])


# ---------------------------------------------------------------------------------------------
# Reward scaling: the discounted return restarts with every episode
# ---------------------------------------------------------------------------------------------

EPISODES_OF_TWO_STEPS = {"truncated": lambda: gym.wrappers.TimeLimit(Counter(), max_episode_steps=2),
                         "terminated": lambda: Counter(terminate_at=2)}


@pytest.mark.parametrize("mode", [AutoresetMode.SAME_STEP, AutoresetMode.NEXT_STEP])
@pytest.mark.parametrize("end", ["truncated", "terminated"])
def test_reward_scale_restarts_the_return_after_every_episode_end(mode, end):
    # Counter pays 1, 2, ... and its episodes end after 2 steps. γ = 0.5: each episode's
    # G_t = r_t + γ G_{t-1} is 1, then 2 + 0.5 = 2.5, then 1 again (not 2.5·0.5 + 1 = 2.25).
    # Over 2 episodes: G = 1, 2.5, 1, 2.5: mean 1.75, variance 0.5625 (the 1e-4 prior aside).
    # (Gymnasium's own wrapper, NEXT_STEP: G = 1, 2.5, 2.25, 3.125 truncated; 1, 2, 2, 2 terminated.)
    envs = gym.vector.SyncVectorEnv([EPISODES_OF_TWO_STEPS[end]], autoreset_mode=mode)
    envs = a2c.NormalizeReward(envs, gamma=0.5)
    envs.reset(seed=0)
    # NEXT_STEP: the third step is a reset step (reward 0), which takes no part.
    scaled = [envs.step(np.array([0]))[1][0] for _ in range(4 if mode == AutoresetMode.SAME_STEP else 5)]
    np.testing.assert_allclose(envs.accumulated_reward, [0.0])  # the second episode ended too
    np.testing.assert_allclose(envs.return_rms.mean, 1.75, rtol=1e-3)
    np.testing.assert_allclose(envs.return_rms.var, 0.5625, rtol=1e-3)
    assert scaled[-1] == pytest.approx(2 / np.sqrt(envs.return_rms.var + envs.epsilon))


# ---------------------------------------------------------------------------------------------
# Tests that can fail: tiny envs with a known answer, learned end to end
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env_id", ["Bandit-v0", "NextStepBandit-v0"])
def test_learns_a_contextual_bandit(tmp_path, capsys, env_id):
    # π(a = s | s) → 1: the last 100 episodes score above 0.9 (uniform: 0.5; a sign-flipped learner: 0).
    # NextStepBandit's reset steps pay the wrong action: only a learner that leaves them out gets here.
    out = run_main(a2c, tmp_path, capsys, "--env-id", env_id, "--total-timesteps", "8192")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert np.mean(read_tags(run)[0]["charts/episodic_return"][-100:]) > 0.9


@pytest.mark.parametrize("env_id", ["Bandit-v0", "NextStepBandit-v0"])
def test_learns_the_bandits_value(tmp_path, capsys, env_id):
    # Without normalisation V is in the env's units: the critic learned V(s) = 1, the learned policy's
    # return (NextStepBandit's reset steps, which pay 2 for the wrong action, must not reach it either).
    out = run_main(a2c, tmp_path, capsys, "--env-id", env_id, "--total-timesteps", "8192", "--no-norm-obs",
                   "--no-norm-reward", "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert np.mean(read_tags(run)[0]["charts/episodic_return"][-100:]) > 0.9
    agent = a2c.ActorCritic((2,), gym.spaces.Discrete(2))
    agent.load_state_dict(torch.load(run / "model.pt", weights_only=True)["model"])
    np.testing.assert_allclose(agent.get_value(torch.eye(2)).detach().numpy(), [1.0, 1.0], atol=0.2)


def test_the_entropy_bonus_keeps_the_entropy_up(tmp_path, capsys):
    def final_entropy(name, *argv):
        out = run_main(a2c, tmp_path / name, capsys, "--env-id", "Bandit-v0", "--total-timesteps", "4096", *argv)
        assert out.returncode == 0, out.stderr
        (run,) = (tmp_path / name / "runs").iterdir()
        return read_tags(run)[0]["losses/entropy"][-1]
    # A bonus this large outweighs the normalised advantages: the policy stays near uniform (H ≤ ln 2 = 0.69).
    assert final_entropy("bonus", "--ent-coef", "5.0") > 0.5 > final_entropy("none", "--ent-coef", "0.0")


class ContinuousBandit(gym.Env):
    """A one-step target for the Gaussian head: s is 0 or 1 at random, seen one-hot; reward
    1 - (a - u_s)², u = (-0.5, 0.5). The answer is known: μ(s) = u_s; and the critic's, whatever σ
    is: V(s) = E[r] = 1 - (μ(s) - u_s)² - σ² (the 1 keeps V far from what a critic trained on the
    advantages instead would learn). The bounds are wide, so clipping the action changes nothing."""

    observation_space = gym.spaces.Box(0.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-5.0, 5.0, (1,), np.float32)
    targets = (-0.5, 0.5)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.s = int(self.np_random.integers(2))
        return one_hot(self.s), {}

    def step(self, action):
        return one_hot(self.s), 1.0 - float((action[0] - self.targets[self.s]) ** 2), True, False, {}


gym.register("A2CContinuousBandit-v0", entry_point=ContinuousBandit)


def test_learns_a_continuous_bandit_and_its_value(tmp_path, capsys):
    # 512 updates of 4 envs x 4 steps (half of them reset steps); unscaled, so V is in the env's units.
    out = run_main(a2c, tmp_path, capsys, "--env-id", "A2CContinuousBandit-v0", "--num-envs", "4", "--num-steps", "4",
                   "--total-timesteps", "8192", "--no-norm-obs", "--no-norm-reward", "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    agent = a2c.ActorCritic((2,), ContinuousBandit.action_space)
    agent.load_state_dict(torch.load(run / "model.pt", weights_only=True)["model"])
    states = torch.eye(2)
    with torch.no_grad():
        mean, sigma = agent.act_deterministic(states)[:, 0].numpy(), agent.log_std.exp().item()
        values = agent.get_value(states).numpy()
    # The mean found both targets (the first policy's mean is near 0, off by 0.5), and σ shrank from 1.
    np.testing.assert_allclose(mean, ContinuousBandit.targets, atol=0.1)
    assert sigma < 0.6
    # The critic knows what that policy earns: V(s) = 1 - (μ(s) - u_s)² - σ².
    np.testing.assert_allclose(values, 1.0 - (mean - ContinuousBandit.targets) ** 2 - sigma ** 2, atol=0.05)


def logged(tmp_path, capsys, name, *argv):
    out = run_main(a2c, tmp_path / name, capsys, "--env-id", "Bandit-v0", *argv)
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / name / "runs").iterdir()
    return read_tags(run)[0]


def test_anneal_lr_falls_linearly_to_zero(tmp_path, capsys):
    # 400 updates of 2 envs x 2 steps, logged every 100th: lr_u = (1 - (u - 1)/400)·3e-3 for u = 100, 200,
    # 300, 400, i.e. 3e-3 x (0.7525, 0.5025, 0.2525, 0.0025); without annealing, 3e-3 throughout.
    small = ["--num-envs", "2", "--num-steps", "2", "--total-timesteps", "1600"]
    np.testing.assert_allclose(logged(tmp_path, capsys, "annealed", *small)["charts/learning_rate"],
                               [3e-3 * f for f in (0.7525, 0.5025, 0.2525, 0.0025)], rtol=1e-6)
    np.testing.assert_allclose(logged(tmp_path, capsys, "constant", *small, "--no-anneal-lr")["charts/learning_rate"],
                               [3e-3] * 4, rtol=1e-6)


@pytest.mark.parametrize("norm_adv", [True, False])
def test_norm_adv_decides_what_the_actor_is_given(tmp_path, capsys, monkeypatch, norm_adv):
    # The actor's advantages are R - V(s) for this batch's returns and values, standardised over the
    # batch with --norm-adv, as they are without. (The critic's loss sees the same R and V.)
    given_actor, given_critic = [], []
    real_actor_loss, real_critic_loss = a2c.actor_loss, a2c.critic_loss

    def actor_loss(log_probs, advantages):
        given_actor.append(advantages.detach().clone())
        return real_actor_loss(log_probs, advantages)

    def critic_loss(values, returns, *a):
        given_critic.append((values.detach().clone(), returns.clone()))
        return real_critic_loss(values, returns, *a)
    monkeypatch.setattr(a2c, "actor_loss", actor_loss)
    monkeypatch.setattr(a2c, "critic_loss", critic_loss)
    logged(tmp_path, capsys, "run", "--total-timesteps", "1024", "--no-norm-reward",
           *([] if norm_adv else ["--no-norm-adv"]))
    assert len(given_actor) == len(given_critic) == 1024 // 128
    for advantages, (values, returns) in zip(given_actor, given_critic):
        raw = returns - values
        standardised = (raw - raw.mean()) / (raw.std() + 1e-8)
        assert (raw - standardised).abs().max() > 0.1  # so the two cases differ
        torch.testing.assert_close(advantages, standardised if norm_adv else raw)


def test_reward_scale_counts_the_first_step_after_a_reset():
    # NEXT_STEP: an episode ends on the 2nd step, so the 3rd would be a reset step and is skipped.
    # A reset() between them starts a new episode itself: its first step (Counter pays 1) is real,
    # and G = 1 after it, not 0.
    envs = gym.vector.SyncVectorEnv([EPISODES_OF_TWO_STEPS["terminated"]], autoreset_mode=AutoresetMode.NEXT_STEP)
    envs = a2c.NormalizeReward(envs, gamma=0.5)
    envs.reset(seed=0)
    for _ in range(2):
        envs.step(np.array([0]))
    envs.reset(seed=1)
    envs.step(np.array([0]))
    np.testing.assert_allclose(envs.accumulated_reward, [1.0])


# ---------------------------------------------------------------------------------------------
# Frames: the CNN body, the Atari learner's view, the logged score
# ---------------------------------------------------------------------------------------------

def test_nature_cnn_body_shapes():
    agent = a2c.ActorCritic((4, 84, 84), gym.spaces.Discrete(6))
    frames = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    assert agent.body[:-2](frames).shape == (5, 3136)  # 64 maps of 7x7 before the 512-unit layer
    assert agent.body(frames).shape == (5, 512)
    logp, entropy, value = agent.evaluate_actions(frames, torch.zeros(5, dtype=torch.int64))
    assert logp.shape == entropy.shape == value.shape == (5,)
    assert agent.logits(frames).shape == (5, 6)
    assert torch.equal(agent.body[0](torch.full((1, 1), 255, dtype=torch.uint8)), torch.ones(1, 1))


def test_frames_pick_their_defaults_and_a_given_flag_wins():
    frames, vectors = a2c.with_defaults(a2c.Args(), frames=True), a2c.with_defaults(a2c.Args(), frames=False)
    assert (frames.learning_rate, frames.num_envs, frames.num_steps, frames.gamma) == (7e-4, 16, 5, 0.99)
    assert (vectors.learning_rate, vectors.num_envs, vectors.num_steps, vectors.gamma) == (3e-3, 8, 16, 0.999)
    assert a2c.with_defaults(a2c.Args(num_steps=7), frames=True).num_steps == 7
    assert (vectors.total_timesteps, frames.total_timesteps) == (1_000_000, 10_000_000)
    assert a2c.with_defaults(a2c.Args(total_timesteps=2000), frames=True).total_timesteps == 2000
    assert (vectors.norm_adv, frames.norm_adv) == (True, False)  # a bool: given either way, it wins
    assert a2c.with_defaults(tyro.cli(a2c.Args, args=["--norm-adv"]), frames=True).norm_adv is True
    assert a2c.with_defaults(tyro.cli(a2c.Args, args=["--no-norm-adv"]), frames=False).norm_adv is False


def test_learner_signal_clips_rewards_and_ends_episodes_at_lost_lives():
    rewards, terminations = np.array([4.0, -2.0, 0.0, 1.0]), np.array([False, False, False, True])
    lives, previous = np.array([3, 2, 5, 0]), np.array([3, 3, 0, 1])  # env 1 lost a life; env 2 began a game
    r, term, new_lives = a2c.learner_signal(rewards, terminations, lives, previous, True, True)
    np.testing.assert_array_equal(r, [1.0, -1.0, 0.0, 1.0])
    np.testing.assert_array_equal(term, [False, True, False, True])
    np.testing.assert_array_equal(new_lives, lives)


def test_the_logged_return_is_the_whole_game_and_the_learner_sees_lives_and_signs():
    # ScriptedAtari: rewards 0, 4, 0, 1, 0, -1, 7 with lives 3, 3, 2, 2, 1, 1, 0 after each step; game
    # over at step 7; step 8 is the reset step; step 9 pays 2 in the new game.
    envs = a2c.AtariLearnerView(gym.wrappers.vector.RecordEpisodeStatistics(ScriptedAtari()), True, True)
    rollout = a2c.Rollout.empty(9, 1, (1, 36, 36), envs.single_action_space, np.uint8)
    episodes = []
    obs, _ = envs.reset(seed=0)
    a2c.collect_rollout(envs, lambda o: np.zeros(len(o), np.int64), rollout, obs, np.zeros(1, bool),
                        lambda r, l: episodes.extend(zip(r, l)))
    assert episodes == [(11.0, 7)]  # 0 + 4 + 0 + 1 + 0 - 1 + 7, all lives, unclipped
    np.testing.assert_array_equal(rollout.rewards[:, 0], [0, 1, 0, 1, 0, -1, 1, 0, 1])
    np.testing.assert_array_equal(rollout.terminations[:, 0], [0, 0, 1, 0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(rollout.valid[:, 0], [1, 1, 1, 1, 1, 1, 1, 0, 1])


def frames_run(tmp_path, capsys, *argv):
    out = run_main(a2c, tmp_path, capsys, *argv)
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    return read_tags(run)[0], run


@pytest.mark.skipif(a2c.ale_py is None, reason="needs ale-py")
def test_a_training_run_logs_the_game_score(tmp_path, capsys, monkeypatch):
    # The Atari path of make_envs, with ScriptedAtari in place of ale-py's env: what it is built
    # with (its own clipping and life-loss options) decides what reaches charts/episodic_return.
    monkeypatch.setattr(a2c.ale_py.vector_env, "AtariVectorEnv", ScriptedAtari)
    film = ["--capture-video"] if importlib.util.find_spec("moviepy") else []  # and env 0's game on film
    out = run_main(a2c, tmp_path, capsys, "--env-id", "ALE/Breakout-v5", "--num-envs", "1", "--num-steps", "9",
                   "--total-timesteps", "9", *film)
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    tags = read_tags(run)[0]
    assert tags["charts/episodic_return"] == [11.0] and tags["charts/episodic_length"] == [7]
    assert len(list(tmp_path.glob("videos/ALE-Breakout-v5__a2c__1__*/rl-video-episode-0.mp4"))) == len(film)
    if film:  # the line says where they are
        assert f"a2c.py: logs in runs/{run.name}/, videos in videos/{run.name}/\n" in out.stdout


def test_cnn_precision(monkeypatch):
    cpu = torch.device("cpu")
    for native in (False, True):  # auto: bfloat16 only where the CPU has it
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        assert a2c.use_bf16("auto", True, cpu) == native
    assert not a2c.use_bf16("bfloat16", False, cpu)  # vectors: never
    assert a2c.use_bf16("bfloat16", True, cpu) and not a2c.use_bf16("float32", True, cpu)


@pytest.mark.skipif(a2c.ale_py is None, reason="needs ale-py")
def test_the_logged_flags_are_the_ones_used(monkeypatch):
    # What a flag leaves to the env or the machine is logged as what the run used, not as unset or "auto".
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    used = a2c.as_used(a2c.Args(env_id="ALE/Breakout-v5"), True, cpu)
    assert used["atari_sticky_actions"] == 0.25 and used["cnn_precision"] == "bfloat16"  # v5's; this CPU's
    assert not used["norm_obs"] and not used["norm_reward"]  # frames never are: the network scales them
    used = a2c.as_used(a2c.Args(env_id="BreakoutNoFrameskip-v4"), True, cpu)
    assert used["atari_sticky_actions"] == 0.0
    given = a2c.Args(env_id="ALE/Breakout-v5", atari_sticky_actions=0.1, cnn_precision="float32")
    used = a2c.as_used(given, True, cpu)
    assert used["atari_sticky_actions"] == 0.1 and used["cnn_precision"] == "float32"
    assert a2c.as_used(a2c.Args(), False, cpu) == asdict(a2c.Args())  # vectors: every flag as given


def test_weights_and_biases_gets_the_flags_as_used(tmp_path, capsys, monkeypatch):
    # W&B's config is the logged table: what --cnn-precision auto became on this machine, not "auto".
    configs = []
    monkeypatch.setattr(a2c, "start_tracking", lambda args, run_dir, config: configs.append(config))
    out = run_main(a2c, tmp_path, capsys, "--env-id", "ImageBandit-v0", "--num-steps", "2", "--total-timesteps", "64",
                   "--track")
    assert out.returncode == 0, out.stderr
    (config,) = configs
    assert config["cnn_precision"] in ("bfloat16", "float32")


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_learns_a_bandit_from_frames(tmp_path, capsys, precision):
    # The frame defaults but the bandit's horizon of one step.
    tags, run = frames_run(tmp_path, capsys, "--env-id", "ImageBandit-v0", "--num-steps", "2",
                           "--total-timesteps", "4096", "--save-model", "--cnn-precision", precision)
    # π(a = s | s) → 1 from pixels alone: the last 100 episodes score above 0.9 (uniform: 0.5).
    assert np.mean(tags["charts/episodic_return"][-100:]) > 0.9
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["spaces"]["obs_shape"] == [1, 36, 36] and ckpt["obs_rms"] is None


@pytest.mark.skipif(a2c.ale_py is None, reason="needs ale-py")
def test_atari_smoke_train_save_evaluate_and_resume(tmp_path, capsys):
    # Pong, because every game ends (an untrained agent loses 21-0 in about 800 steps).
    tags, run = frames_run(tmp_path, capsys, "--env-id", "PongNoFrameskip-v4", "--num-envs", "2",
                           "--total-timesteps", "200", "--save-model")
    assert {"losses/policy_loss", "charts/SPS"} <= set(tags)
    assert run.name.startswith("PongNoFrameskip-v4__a2c__1__")
    logged = read_tags(run)[1]["hyperparameters/text_summary"]  # the flags as used: the id's sticky actions
    assert "|atari_sticky_actions|0.0|" in logged and "|cnn_precision|auto|" not in logged
    assert "|norm_obs|False|" in logged
    film = ["--capture-video"] if importlib.util.find_spec("moviepy") else []  # the game on film, as the agent saw it
    out = run_main(a2c, tmp_path, capsys, "--env-id", "PongNoFrameskip-v4", "--eval-checkpoint",
                   str(run / "model.pt"), "--eval-episodes", "1", *film)
    assert out.returncode == 0, out.stderr
    score = float(out.stdout.split("eval: 1 episode of PongNoFrameskip-v4: return ")[1].split()[0])
    assert -21 <= score <= -15  # an untrained agent loses nearly every point
    if film:
        (video,) = (tmp_path / "videos").glob("PongNoFrameskip-v4__a2c-eval__1__*/eval-0.mp4")
        assert video.stat().st_size > 10_000
    out = run_main(a2c, tmp_path, capsys, "--resume", str(run), "--total-timesteps", "400")  # and it goes on
    assert out.returncode == 0, out.stderr
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["global_step"] == 400
    assert float(ckpt["optimizer"]["state"][0]["step"]) == 40  # every update's, the first run's too
    assert read_steps(run, "charts/SPS") == [200, 400]  # each step logged once
    assert steps_of_the_last_writer(run, "charts/SPS") == [400]  # the resumed run's own: it went on, not over
    # Evaluated, a model plays the game as trained: an --atari-* flag that differs is one line, not ignored.
    one_line_error(run_main(a2c, tmp_path, capsys, "--eval-checkpoint", str(run), "--atari-frame-skip", "2",
                            "--atari-noop-max", "10"), "a2c.py", "--atari-noop-max 10, --atari-frame-skip 2: the model "
                   "was trained with --atari-noop-max 30, --atari-frame-skip 4")


def test_training_films_games_on_record_video_s_schedule():
    assert [n for n in range(3001) if a2c.filmed_game(n)] == [0, 1, 8, 27, 64, 125, 216, 343, 512, 729, 1000, 2000, 3000]


@pytest.mark.skipif(importlib.util.find_spec("moviepy") is None, reason="needs moviepy (pip install moviepy)")
def test_training_on_atari_films_env_0_s_scheduled_games(tmp_path):
    from imageio_ffmpeg import count_frames_and_secs  # moviepy's own reader can miss a last frame
    from moviepy import VideoFileClip
    envs = a2c.RecordGames(ShortGames(), str(tmp_path), every_env=False, fps=15)
    envs.reset(seed=0)
    for _ in range(25):  # env 0 plays games of 2 steps and a reset step (game 8 starts at step 24); env 1, of 3
        envs.step(np.zeros(2, np.int64))
    envs.close()  # game 8, unfinished, as far as it got: its first frame and its first step's
    videos = sorted(tmp_path.glob("*.mp4"), key=lambda p: int(p.stem.split("-")[-1]))
    assert [p.name for p in videos] == ["rl-video-episode-0.mp4", "rl-video-episode-1.mp4", "rl-video-episode-8.mp4"]
    for game, frames, path in zip((0, 1, 8), (3, 3, 2), videos):  # each its own game, whole
        greys = [frame.mean() for frame in VideoFileClip(str(path)).iter_frames()]
        assert count_frames_and_secs(str(path))[0] == frames, path.name
        assert all(abs(grey - 10 * game) < 3 for grey in greys), (path.name, greys)
    envs.games[0] = [np.full((84, 84), 10 * (k % 2), np.uint8) for k in range(123)]  # 123 / 15 s: moviepy's rounding
    envs.write(0)                                                                      # would drop the last
    assert count_frames_and_secs(str(tmp_path / "rl-video-episode-8.mp4"))[0] == 123  # game 8's name, rewritten


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None or importlib.util.find_spec("moviepy") is None,
                    reason="needs wandb and moviepy (pip install wandb moviepy)")
def test_track_with_weights_and_biases_offline_and_film_the_evaluation(tmp_path, capsys):
    out = run_main(a2c, tmp_path, capsys, "--total-timesteps", "1024", "--num-envs", "4", "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    out = run_script("a2c.py", tmp_path, "--eval-checkpoint", str(run / "model.pt"), "--eval-episodes", "2",
                     "--capture-video", "--track", env=WANDB_OFFLINE)
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stderr.splitlines() if not line.startswith("wandb:")] == []  # no SDL noise, no warning
    videos = sorted(p.name for p in (tmp_path / "videos").glob("CartPole-v1__a2c-eval__1__*/*.mp4"))
    assert videos == ["eval-0-episode-0.mp4", "eval-1-episode-0.mp4"]  # each evaluated episode, once
    unfilmed = run_main(a2c, tmp_path, capsys, "--eval-checkpoint", str(run / "model.pt"), "--eval-episodes", "2")
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
    one_line_error(run_main(a2c, tmp_path, capsys, *SMALL, "--track"), "a2c.py",
                   "--track: Weights & Biases could not start a run (No API key configured.", "WANDB_MODE=offline")


def test_track_without_wandb(tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(a2c.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    one_line_error(run_main(a2c, tmp_path, capsys, *SMALL, "--track"), "a2c.py", "--track", "pip install wandb")


def test_an_env_from_the_users_own_module(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    env_id = toy_env_module(tmp_path, "toy_a2c")  # imported by the script, not here
    out = run_main(a2c, tmp_path, capsys, "--env-id", env_id, *SMALL)
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert np.mean(read_tags(run)[0]["charts/episodic_return"][-100:]) > 0.9  # it learned to take the action that pays
    assert run.name.startswith("toy_a2c-ToyA2C-v0__a2c__1__")
    monkeypatch.setattr(a2c, "render_offscreen", lambda capture_video: None)  # it would set this process's env vars
    out = run_main(a2c, tmp_path, capsys, "--env-id", env_id, "--capture-video")  # its entry point is a class
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "a2c.py: error: --capture-video cannot render toy_a2c:ToyA2C-v0" in out.stderr
    one_line_error(run_main(a2c, tmp_path, capsys, "--env-id", "no_such_module:Pays-v0"), "a2c.py",
                   "cannot import 'no_such_module' for --env-id no_such_module:Pays-v0")


def test_float64_observations_train(tmp_path, capsys):
    # MuJoCo's observations are float64: the rollout stores them as float32, as the network takes them.
    out = run_main(a2c, tmp_path, capsys, "--env-id", "Float64Bandit-v0", "--total-timesteps", "4096", "--no-norm-obs")
    assert out.returncode == 0, out.stderr


def test_a_checkpoint_from_before_frames_evaluates(tmp_path, capsys):
    out = run_main(a2c, tmp_path, capsys, "--env-id", "CartPole-v1", "--total-timesteps", "4096", "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run / "model.pt", weights_only=True)
    ckpt["spaces"]["obs_dim"] = ckpt["spaces"].pop("obs_shape")[0]  # how checkpoints were written before issue 12
    torch.save(ckpt, tmp_path / "old.pt")
    out = run_main(a2c, tmp_path, capsys, "--env-id", "CartPole-v1", "--eval-checkpoint", str(tmp_path / "old.pt"),
                   "--eval-episodes", "2")
    assert out.returncode == 0, out.stderr
    assert "eval: 2 episodes" in out.stdout


def test_evaluation_plays_the_game_as_the_model_was_trained(tmp_path):
    def evaluated(trained, **given):
        path = tmp_path / "model.pt"
        torch.save({"script": "a2c.py", "args": {"env_id": "PongNoFrameskip-v4", "seed": 9, **trained}}, path)
        return a2c.as_trained(a2c.Args(env_id="ALE/Pong-v5", eval_checkpoint=str(path), **given))
    args = evaluated({"atari_frame_stack": 2, "atari_sticky_actions": 0.5})
    assert (args.atari_frame_stack, args.atari_sticky_actions, args.seed) == (2, 0.5, 1)  # only the Atari flags
    assert evaluated({"atari_frame_stack": 2}, atari_frame_stack=2).atari_frame_stack == 2  # as trained: accepted
    # Sticky actions are the evaluation's to choose: given, they win; left to the id, the evaluated id's (v5: 0.25).
    assert evaluated({"atari_sticky_actions": 0.5}, atari_sticky_actions=0.0).atari_sticky_actions == 0.0
    assert evaluated({"atari_sticky_actions": None}).atari_sticky_actions is None
    with pytest.raises(a2c.UserError, match="the model was trained with --atari-frame-stack 2"):
        evaluated({"atari_frame_stack": 2}, atari_frame_stack=3)
    cartpole = tmp_path / "cartpole.pt"  # no Atari model: load_checkpoint says what it is
    torch.save({"script": "a2c.py", "args": {"env_id": "CartPole-v1", "atari_frame_skip": 4}}, cartpole)
    given = a2c.Args(env_id="ALE/Pong-v5", eval_checkpoint=str(cartpole), atari_frame_skip=2)
    assert a2c.as_trained(given) == given
    assert a2c.as_trained(a2c.Args(eval_checkpoint=str(tmp_path / "missing.pt"))) == a2c.Args(
        eval_checkpoint=str(tmp_path / "missing.pt"))


# ---------------------------------------------------------------------------------------------
# Periodic, atomic checkpoints and --resume
# ---------------------------------------------------------------------------------------------

def test_a_crash_while_writing_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "model.pt")
    a2c.write_atomically({"script": "a2c.py", "global_step": 1}, path)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        a2c.write_atomically({"script": "a2c.py", "global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_a_killed_run_resumes_where_its_checkpoint_left_it(tmp_path, capsys):
    # Killed with SIGKILL after its first periodic checkpoint, then resumed: it ends at
    # --total-timesteps, and TensorBoard has each logged step once, in order.
    argv = ["--num-envs", "4", "--total-timesteps", "10240", "--save-model", "--checkpoint-every", "0"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "a2c.py"), *argv], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(tmp_path.glob("runs/*/model.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    (checkpoint,) = tmp_path.glob("runs/*/model.pt")
    killed_at = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 0 < killed_at < 10240

    after_this_second()  # its logs are read after the killed run's
    out = run_main(a2c, tmp_path, capsys, "--resume", str(checkpoint.parent))
    assert out.returncode == 0, out.stderr
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt["global_step"] == 10240
    assert min(steps_of_the_last_writer(checkpoint.parent, "charts/episodic_return")) > killed_at  # went on, not over
    steps = read_steps(checkpoint.parent, "losses/policy_loss")  # every 100th update (of 64 steps) and the last
    assert steps == sorted(set(steps)) and steps[-1] == 10240
    episode_steps = read_steps(checkpoint.parent, "charts/episodic_return")
    assert episode_steps == sorted(episode_steps)


def test_a_resumed_run_starts_from_the_checkpoint_exactly(tmp_path, capsys):
    # Resumed with nothing left to train, it saves what it restored: weights, the optimizer's state,
    # the normalisation statistics and the step count come back bit for bit.
    out = run_main(a2c, tmp_path, capsys, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    before = torch.load(run / "model.pt", weights_only=True)
    out = run_main(a2c, tmp_path, capsys, "--resume", str(run / "model.pt"))
    assert out.returncode == 0, out.stderr
    after = torch.load(run / "model.pt", weights_only=True)
    assert after["global_step"] == before["global_step"] == 4096
    for name, tensor in before["model"].items():
        assert torch.equal(tensor, after["model"][name])
    for i, state in before["optimizer"]["state"].items():
        assert torch.equal(state["square_avg"], after["optimizer"]["state"][i]["square_avg"])
    assert torch.equal(before["return_rms"]["var"], after["return_rms"]["var"])
    # The restored observation statistics took in the 4 new episodes' first observations, nothing else.
    assert after["obs_rms"]["count"] == before["obs_rms"]["count"] + 4
    np.testing.assert_allclose(after["obs_rms"]["mean"], before["obs_rms"]["mean"], atol=1e-2)
    assert after["rng"]["acting"] == before["rng"]["acting"]


def test_a_checkpoint_saved_before_the_flag_check_still_resumes(tmp_path, capsys):
    # --atari-noop-max 3 and --cnn-precision float32 on CartPole were once saved (and did nothing): such a
    # run resumes, with the flags it was started with.
    out = run_main(a2c, tmp_path, capsys, *SMALL, "--save-model")
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run / "model.pt", weights_only=True)
    torch.save({**ckpt, "args": {**ckpt["args"], "atari_noop_max": 3, "cnn_precision": "float32"}}, run / "model.pt")
    out = run_main(a2c, tmp_path, capsys, "--resume", str(run), "--total-timesteps", "8192")
    assert out.returncode == 0, out.stderr
    assert torch.load(run / "model.pt", weights_only=True)["global_step"] == 8192


def test_resuming_with_a_flag_that_cannot_change_is_one_line(tmp_path, capsys):
    out = run_main(a2c, tmp_path, capsys, *SMALL, "--save-model")
    (run,) = (tmp_path / "runs").iterdir()
    one_line_error(run_main(a2c, tmp_path, capsys, "--resume", str(run), "--gamma", "0.9"), "a2c.py",
                   "--gamma cannot change when resuming", "0.999", "0.9")
    one_line_error(run_main(a2c, tmp_path, capsys, "--resume", str(run), "--atari-frame-skip", "2"), "a2c.py",
                   "--atari-frame-skip 2: for Atari ids only, and CartPole-v1 is not one")  # not "the run has 4"
    one_line_error(run_main(a2c, tmp_path, capsys, "--resume", str(run), "--cnn-precision", "float32"), "a2c.py",
                   "--cnn-precision float32: for frames only")
    steps = torch.load(run / "model.pt", weights_only=True)["global_step"]
    one_line_error(run_main(a2c, tmp_path, capsys, "--resume", str(run), "--total-timesteps", str(steps - 1)),
                   "a2c.py", f"--total-timesteps {steps - 1} is less than the {steps} steps the run has taken")
    out = run_main(a2c, tmp_path, capsys, "--resume", str(run), "--total-timesteps", "None")  # unset: the run's own
    assert out.returncode == 0, out.stderr
    assert "a2c.py: the run has done all 64 updates of its --total-timesteps 4096" in out.stdout  # finished: says so
    out = run_main(a2c, tmp_path, capsys, "--resume", str(run), "--total-timesteps", str(steps + 63))  # < 1 batch more
    assert out.returncode == 0 and "the run has done all 64 updates of its --total-timesteps 4159" in out.stdout
    one_line_error(run_main(a2c, tmp_path, capsys, "--resume", str(tmp_path / "nothing")), "a2c.py",
                   "no checkpoint at")
    out = run_main(a2c, tmp_path, capsys, "--resume", str(run), "--total-timesteps", "8192")  # train longer: allowed
    assert out.returncode == 0, out.stderr
    assert torch.load(run / "model.pt", weights_only=True)["global_step"] == 8192


def test_a_second_ctrl_c_stops_at_once_and_saves_as_interrupted_not_crashed(tmp_path, capsys, monkeypatch):
    # The second Ctrl-C raises KeyboardInterrupt wherever it lands: here, at the first status line.
    def lands_here(self, step, recent_returns, force=False):
        if not force:
            raise KeyboardInterrupt
    monkeypatch.setattr(a2c.StatusLine, "update", lands_here)
    out = run_main(a2c, tmp_path, capsys, *SMALL, "--save-model")
    assert out.returncode == 130 and out.stderr.strip() == "a2c.py: interrupted"
    (run,) = (tmp_path / "runs").iterdir()
    assert f"model saved to runs/{run.name}/model.pt (a second Ctrl-C)" in out.stdout
    assert torch.load(run / "model.pt", weights_only=True)["global_step"] > 0


def test_the_status_line_shows_the_last_step_once(capsys):
    status = a2c.StatusLine(total=100, every=0.0)
    status.update(50, [1.0])
    status.update(100, [1.0])
    status.update(100, [1.0], force=True)  # as training's end does, whether or not the last iteration showed it
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["50/100", "100/100"]
    held = a2c.StatusLine(total=100, every=1e9)
    held.update(100, [1.0])  # too soon after the start: not shown
    held.update(100, [1.0], force=True)
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["100/100"]


def test_what_was_logged_after_the_checkpoint_is_dropped_on_resume(tmp_path, capsys, monkeypatch):
    # A run trains to the end, but its last checkpoint is from step 1024 (as when it dies before the
    # next): resumed, the rest is trained and logged again, and the final step appears once.
    kept = []
    save = a2c.save_checkpoint
    def keep_step_1024(path, args, step, *rest):
        save(path, args, step, *rest)
        if step == 1024:
            kept.append(open(path, "rb").read())
    monkeypatch.setattr(a2c, "save_checkpoint", keep_step_1024)
    out = run_main(a2c, tmp_path, capsys, *SMALL, "--save-model", "--checkpoint-every", "0")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    (run / "model.pt").write_bytes(kept[0])
    out = run_main(a2c, tmp_path, capsys, "--resume", str(run))
    assert out.returncode == 0, out.stderr
    assert read_steps(run, "losses/policy_loss") == [4096]  # the last update's, once
    episodes = read_steps(run, "charts/episodic_return")
    # Sorted: nothing the first run logged after step 1024 is left. (Whether an episode ends in the last
    # 64-step rollout depends on the float arithmetic of the CPU, so the last one is not asserted at 4096.)
    assert episodes == sorted(episodes) and episodes[-1] > 1024


def test_a_checkpoint_from_before_resume_evaluates_and_cannot_be_resumed(tmp_path, capsys):
    out = run_main(a2c, tmp_path, capsys, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    old = torch.load(run / "model.pt", weights_only=True)
    del old["rng"]  # as written before --resume existed
    torch.save(old, tmp_path / "old.pt")
    env = old["args"]["env_id"]
    out = run_main(a2c, tmp_path, capsys, "--env-id", env, "--eval-checkpoint", str(tmp_path / "old.pt"),
                   "--eval-episodes", "2")
    assert out.returncode == 0, out.stderr
    one_line_error(run_main(a2c, tmp_path, capsys, "--resume", str(tmp_path / "old.pt")), "a2c.py",
                   "written before --resume existed")


# ---------------------------------------------------------------------------------------------
# Many processes (torchrun): the ranks are one learner
# ---------------------------------------------------------------------------------------------

def test_two_ranks_learn_as_one_and_keep_identical_parameters(two_ranks):
    _, ((code0, rank0), (code1, rank1)), tmp_path, _ = two_ranks
    assert code0 == code1 == 0
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)  # bitwise: every step the same on both
    (run,) = (tmp_path / "runs").iterdir()  # rank 0 alone writes logs and checkpoints
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["global_step"] == 8192 and all(torch.equal(ckpt["model"][name], rank0[name]) for name in rank0)
    # Every observation of both ranks reached the merged statistics: the 2 x 4 first ones and one a step.
    assert ckpt["obs_rms"]["count"] == pytest.approx(8200, abs=1e-3)
    returns = read_tags(run)[0]["charts/episodic_return"]
    assert len(returns) == 4096  # both ranks' episodes: 8192 steps, every other one a reset step
    assert np.mean(returns[-100:]) > 0.9  # learned, from 4096 steps of each rank
    assert not ranks_played_alike(run)  # each rank its own envs and draws (seeded from seed and rank)


def half_batch_update(ranks, transitions):
    """The parameters of a fixed agent after one a2c_update on `transitions` of a fixed batch of 16: plain SGD,
    unclipped, so the gradient's scale shows; advantages normalised, so their union's moments must be used."""
    torch.manual_seed(0)
    agent = a2c.ActorCritic((4,), gym.spaces.Discrete(3))
    obs, actions, returns = torch.randn(16, 4), torch.randint(0, 3, (16,)), torch.randn(16) * 3
    args = a2c.Args(norm_adv=True, max_grad_norm=1e9, ent_coef=0.01, vf_coef=0.5)
    log_probs, entropy, values = agent.evaluate_actions(obs[transitions], actions[transitions])
    a2c.a2c_update(agent, torch.optim.SGD(agent.parameters(), lr=0.1), log_probs, entropy, values,
                   returns[transitions], args, ranks)
    return torch.cat([p.detach().flatten() for p in agent.parameters()])


def collectives_as_rank(rank):
    """(b) one update of this rank's half of a batch; (c) its running statistics, fed data of its own for two
    rollouts and merged after each, and its share of the advantages' mean and std; a UserError on one rank;
    the start from rank 0's weights."""
    join_gloo()
    ranks = a2c.Ranks(rank, 2)
    update = half_batch_update(ranks, slice(8 * rank, 8 * (rank + 1)))
    rms = gym.wrappers.utils.RunningMeanStd(shape=(2,))
    statistics = a2c.RankStatistics([rms, None], ranks)
    data = np.arange(12.0).reshape(6, 2) * (rank + 1) + 10 * rank  # rank 1's: shifted and wider
    for rollout in (data[:3], data[3:]):
        rms.update(rollout)
        statistics.merge()
    none, one = torch.zeros(0), torch.tensor([3.0] if rank == 0 else [])  # every step a reset step; one valid in all
    moments = [a2c.union_mean_std(x, ranks) for x in (torch.from_numpy(data[:, 0]).float(), none, one)]
    return (update, (rms.mean, rms.var, rms.count, *moments),
            fail_together_as_rank(a2c, ranks),
            start_alike_as_rank(a2c, a2c.ActorCritic((2,), gym.spaces.Discrete(2)), ranks))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """2 ranks: the collectives of tests (b) and (c), then a short training run, in one spawn.
    Returns (each rank's collectives, each rank's (exit code, final parameters), the run's folder, each
    rank's exit code where runs/ could not be written)."""
    cwd = tmp_path_factory.mktemp("train")
    # NextStepBandit's reset steps pay the wrong action: both ranks must leave theirs out.
    argv = ["--env-id", "NextStepBandit-v0", "--num-envs", "4", "--num-steps", "16", "--learning-rate", "3e-3",
            "--total-timesteps", "8192", "--save-model"]
    ranks = run_ranks(collectives_then_training, 2, collectives_as_rank, (free_port(), free_port()), "a2c",
                      "ActorCritic", str(cwd), argv, tmp_path=tmp_path_factory.mktemp("ranks"))
    return ([tested for tested, _, _ in ranks], [trained for *_, trained in ranks], cwd,
            [refused for _, refused, _ in ranks])


def test_an_update_by_two_ranks_on_half_a_batch_each_is_the_update_on_the_whole_batch(two_ranks):
    alone = half_batch_update(a2c.Ranks(), slice(None))
    for update, *_ in two_ranks[0]:
        torch.testing.assert_close(update, alone, rtol=0, atol=1e-6)
    assert torch.equal(two_ranks[0][0][0], two_ranks[0][1][0])


def test_merged_running_statistics_are_those_of_the_union(two_ranks):
    union = np.concatenate([np.arange(12.0).reshape(6, 2), np.arange(12.0).reshape(6, 2) * 2 + 10])
    ranks = [statistics for _, statistics, *_ in two_ranks[0]]
    for mean, var, count, (m, s), of_none, of_one in ranks:  # the prior (count 1e-4: mean 0, variance 1) barely moves them
        np.testing.assert_allclose(mean, union.mean(0), rtol=1e-4)
        np.testing.assert_allclose(var, union.var(0), rtol=1e-4)
        assert count == pytest.approx(12, abs=1e-3)
        # The advantages' normalisation takes the union's mean and (n-1) std too.
        assert (m.item(), s.item()) == pytest.approx((union[:, 0].mean(), union[:, 0].std(ddof=1)), rel=1e-6)
        # As torch's alone: no values, NaN and NaN (not a ZeroDivisionError); one value, itself and NaN.
        assert all(math.isnan(x.item()) for x in of_none) and of_one[0].item() == 3.0 and math.isnan(of_one[1].item())
    assert all(np.array_equal(a, b) for a, b in zip(ranks[0][:3], ranks[1][:3]))


def test_a_user_error_on_one_rank_is_every_rank_s(two_ranks):
    # On every rank, so each exits 2; rank 0 prints it, saying which rank found it when not rank 0.
    expected = ["a mistake only this rank finds", "rank 1: a mistake only this rank finds", None]
    assert [raised for _, _, raised, _ in two_ranks[0]] == [expected, expected]


def test_ranks_start_from_rank_0_s_weights_and_refuse_different_steps_together(two_ranks):
    (rank_0_before, after0, error0), (_, after1, error1) = (started for *_, started in two_ranks[0])
    assert torch.equal(after0, rank_0_before) and torch.equal(after1, rank_0_before)
    assert error0 == error1 == ("the ranks start from different steps (1000 to 2000): "
                                "every rank must resume from the same checkpoint")


def test_a_mistake_only_rank_0_finds_ends_every_rank_with_exit_code_2(two_ranks):
    assert two_ranks[3] == [2, 2]  # runs/ unwritable: rank 1 no longer crashes in its next collective


def test_at_the_end_no_rank_leaves_before_rank_0_has_saved(tmp_path):
    # torchrun stops the whole job once one worker exits with an error code (here 143 would be one): a rank that
    # left first could stop rank 0 mid-checkpoint.
    argv = ["--env-id", "CartPole-v1", "--total-timesteps", "512", "--save-model", "--checkpoint-every", "1e9"]
    rank0, rank1 = run_ranks(slow_rank_0_save_as_rank, 2, "a2c", str(tmp_path), argv, tmp_path=tmp_path)
    assert rank1["left"] >= rank0["saved"]


def test_a_stop_request_to_one_rank_stops_every_rank_at_the_same_iteration(tmp_path):
    argv = ["--env-id", "CartPole-v1", "--total-timesteps", "100000000", "--save-model"]
    ((code0, rank0), (code1, rank1)), ckpt = stop_one_rank("a2c", "ActorCritic", argv, tmp_path)
    assert code0 == code1 == 143  # both took rank 1's SIGTERM as their own
    update = 2 * ckpt["args"]["num_envs"] * ckpt["args"]["num_steps"]
    assert 0 < ckpt["global_step"] < 100_000_000 and ckpt["global_step"] % update == 0
    assert all(torch.equal(ckpt["model"][name], rank0[name]) and torch.equal(rank1[name], rank0[name]) for name in rank0)
