"""Tests of ppo_continuous.py: the math against numbers worked out by hand (the Gaussian, the
running statistics, reward scaling, GAE, the losses), a truncation's bootstrap from its
normalised final observation, and the script end to end (smoke, evaluation with the saved
statistics, errors, seeds)."""

import copy
import ctypes.util
from dataclasses import replace
import importlib.util
import math
import os
import signal
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

import ppo_continuous as pc
from conftest import (ROOT, watch_saves, slow_rank_0_save_as_rank, ranks_played_alike, run_twice, free_port, interrupt_script, fail_together_as_rank,
                      start_alike_as_rank, join_gloo, make_runs_unwritable, one_hot, one_line_error, read_steps,
                      read_tags, run_main, run_ranks, run_script, stop_one_rank, collectives_then_training,
                      wandb_records, WANDB_OFFLINE, TRACKING,
                      USER_ERROR_UNDER_TORCHRUN, user_error_as_rank, after_this_second, steps_of_the_last_writer)

LOG_2PI = 1.8378770664093453  # ln 2π
LN2 = 0.6931471805599453


def t(rows):
    """Hand-written (N, T) rows -> a (T, N) array, so each env reads as a line below."""
    return np.array(rows, dtype=np.float32).T


# ---------------------------------------------------------------------------------------------
# The Gaussian policy
# ---------------------------------------------------------------------------------------------

def test_gaussian_log_prob_by_hand():
    # Two action dimensions, σ = (1, 2), so log σ = (0, ln 2).
    # a = (1, 0), μ = (0, 0): dim 1: -½·1² - 0 - ½ln2π; dim 2: -½·0² - ln 2 - ½ln2π
    #   sum = -0.5 - ln 2 - ln 2π = -0.5 - 0.693147 - 1.837877 = -3.031024
    # a = (2, -1), μ = (1, 1): dim 1: -½·1²; dim 2: -½·(-2/2)² - ln 2: sum = -1 - ln 2 - ln 2π = -3.531024
    log_std = torch.tensor([[0.0, LN2], [0.0, LN2]])
    actions = torch.tensor([[1.0, 0.0], [2.0, -1.0]])
    mean = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(pc.gaussian_log_prob(actions, mean, log_std), torch.tensor([-3.031024, -3.531024]))


def test_gaussian_entropy_by_hand():
    # Σ_i (½ + ½ln2π + log σ_i) with log σ = (0, ln 2): 1 + 1.837877 + 0.693147 = 3.531024;
    # a unit Gaussian in 1-d: ½ + ½ln2π = 1.418939
    torch.testing.assert_close(pc.gaussian_entropy(torch.tensor([[0.0, LN2], [0.0, 0.0]])),
                               torch.tensor([3.531024, 2.837877]))
    torch.testing.assert_close(pc.gaussian_entropy(torch.tensor([0.0])), torch.tensor(1.418939))


def test_agent_starts_with_unit_noise_around_a_near_zero_mean():
    agent = pc.Agent(3, 2)
    obs = torch.zeros(4, 3)
    logprob, entropy, value, _, _ = agent.evaluate_actions(obs, torch.zeros(4, 2))
    assert logprob.shape == entropy.shape == value.shape == (4,)
    # μ ≈ 0, σ = 1 in 2-d: log N(0; 0, 1)² = -ln 2π; entropy = 1 + ln 2π
    torch.testing.assert_close(logprob, torch.full((4,), -LOG_2PI), atol=1e-3, rtol=0)
    torch.testing.assert_close(entropy, torch.full((4,), 1 + LOG_2PI))


def test_log_std_init_sets_the_first_policy_spread():
    # log σ = -1 in 1-d: entropy ½ + ½ln2π - 1 = 0.418939; log N(μ; μ, σ²) = 1 - ½ln2π = 0.081061
    agent = pc.Agent(3, 1, log_std_init=-1.0)
    logprob, entropy, _, _, _ = agent.evaluate_actions(torch.zeros(1, 3), torch.zeros(1, 1))
    assert entropy.item() == pytest.approx(0.418939, abs=1e-6)
    assert logprob.item() == pytest.approx(0.081061, abs=1e-3)  # μ ≈ 0 (a small last layer)


def test_numpy_policy_matches_the_torch_actor_and_samples_its_gaussian():
    agent = pc.Agent(4, 2)
    with torch.no_grad():
        agent.actor_logstd.copy_(torch.tensor([[math.log(0.5), math.log(2.0)]]))
    rms = pc.RunningMeanStd((4,))
    rms.mean, rms.var = np.array([1.0, 0.0, -1.0, 2.0]), np.array([4.0, 1.0, 0.25, 9.0])
    obs = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    policy = pc.NumpyPolicy(agent, rms, 10.0, np.random.default_rng(0))
    normalised = torch.from_numpy(pc.normalize_observations(obs, rms.mean, rms.var, 10.0))
    np.testing.assert_allclose(policy.mean(obs), agent.actor_mean(normalised).detach().numpy(), atol=1e-6)
    # 20,000 draws for one observation: the spread is σ = (0.5, 2) to within 2%
    samples = policy(np.repeat(obs[:1], 20_000, axis=0)) - policy.mean(obs[:1])
    np.testing.assert_allclose(samples.std(0), [0.5, 2.0], rtol=0.02)


# ---------------------------------------------------------------------------------------------
# Running statistics and normalisation
# ---------------------------------------------------------------------------------------------

def test_running_mean_std_merge_of_two_batches_by_hand():
    # A = {1, 3}: μ 2, σ² 1, n 2.  B = {5, 7, 9}: μ 7, σ² (4 + 0 + 4)/3 = 8/3, n 3.
    # δ = 5, n = 5, μ = 2 + 5·3/5 = 5, M2 = 1·2 + (8/3)·3 + 25·2·3/5 = 2 + 8 + 30 = 40, σ² = 40/5 = 8,
    # the mean and variance of {1, 3, 5, 7, 9}: (16 + 4 + 0 + 4 + 16)/5 = 8.
    mean, var, count = pc.update_running_mean_std(np.array(2.0), np.array(1.0), 2, np.array(7.0), np.array(8 / 3), 3)
    assert (float(mean), float(var), count) == pytest.approx((5.0, 8.0, 5))
    # Per feature: a second feature with A = {0, 0}, B = {3, 3, 3}: μ 9/5 = 1.8, σ² = (2·1.8² + 3·1.2²)/5 = 2.16
    mean, var, _ = pc.update_running_mean_std(np.array([2.0, 0.0]), np.array([1.0, 0.0]), 2,
                                              np.array([7.0, 3.0]), np.array([8 / 3, 0.0]), 3)
    np.testing.assert_allclose(mean, [5.0, 1.8])
    np.testing.assert_allclose(var, [8.0, 2.16])


def test_running_mean_std_fed_batch_by_batch_knows_all_of_them():
    rms = pc.RunningMeanStd((1,))
    rms.update(np.array([[1.0], [3.0]]), pc.Ranks())
    rms.update(np.array([[5.0], [7.0], [9.0]]), pc.Ranks())
    # the tiny prior count (1e-4 of a sample at mean 0, variance 1) moves nothing beyond 1e-4
    np.testing.assert_allclose(rms.mean, [5.0], rtol=1e-4)
    np.testing.assert_allclose(rms.var, [8.0], rtol=1e-4)
    assert rms.count == pytest.approx(5.0, abs=1e-3)


def test_normalize_observations_standardises_and_clips():
    # (3 - 1)/√4 = 1; (-100 - 0)/√1 = -100 → clipped to -10; (0.5 - 0.5)/√0.25 = 0
    out = pc.normalize_observations(np.array([[3.0, -100.0, 0.5]]), np.array([1.0, 0.0, 0.5]),
                                    np.array([4.0, 1.0, 0.25]), clip=10.0)
    np.testing.assert_allclose(out, [[1.0, -10.0, 0.0]], atol=1e-6)
    assert out.dtype == np.float32


def test_running_discounted_returns_restart_after_an_episode_ends():
    # γ = 0.5. Env 0 carries G = 2 in from the last rollout and its episode ends at t=1:
    #   G0 = 1 + 0.5·2 = 2, G1 = 2 + 0.5·2 = 3 (ends), G2 = 3, G3 = 4 + 0.5·3 = 5.5; carried out 5.5
    # Env 1 starts fresh and its episode ends at the last step: G = 1, 1.5, 1.75, 1.875; carried out 0
    rewards = t([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    dones = t([[0, 1, 0, 0], [0, 0, 0, 1]]).astype(bool)
    returns, carried = pc.running_discounted_returns(rewards, dones, np.array([2.0, 0.0], np.float32), 0.5)
    np.testing.assert_allclose(returns, t([[2.0, 3.0, 3.0, 5.5], [1.0, 1.5, 1.75, 1.875]]))
    np.testing.assert_allclose(carried, [5.5, 0.0])


def test_scale_rewards_divides_by_the_return_std_and_clips():
    # Var[G] = 4 → std 2: 2 → 1, -30 → -15 → clipped to -10, 0.5 → 0.25
    np.testing.assert_allclose(pc.scale_rewards(np.array([2.0, -30.0, 0.5]), 4.0, clip=10.0),
                               [1.0, -10.0, 0.25], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# GAE and the losses
# ---------------------------------------------------------------------------------------------

def test_gae_with_termination_and_truncation():
    # γ = 0.9, λ = 0.5 (γλ = 0.45). Env 0 terminates at t=1 (its final state's value 9.0 must not
    # be used); env 1 is truncated at t=1 and bootstraps from V(final obs) = 3.0.
    rewards = t([[1.0, 1.0, 1.0], [0.5, 1.0, 2.0]])
    values = t([[0.5, 0.4, 0.6], [1.0, 2.0, 0.2]])
    next_values = t([[0.4, 9.0, 0.7], [2.0, 3.0, 0.1]])
    terminations = t([[0, 1, 0], [0, 0, 0]]).astype(bool)
    truncations = t([[0, 0, 0], [0, 1, 0]]).astype(bool)
    adv, ret = pc.gae(rewards, values, next_values, terminations, truncations, 0.9, 0.5)
    # Env 0: δ0 = 1 + 0.36 - 0.5 = 0.86, δ1 = 1 - 0.4 = 0.6 (terminal), δ2 = 1 + 0.63 - 0.6 = 1.03
    #   A2 = 1.03, A1 = 0.6 (no chaining past the end), A0 = 0.86 + 0.45·0.6 = 1.13
    # Env 1: δ0 = 0.5 + 1.8 - 1 = 1.3, δ1 = 1 + 2.7 - 2 = 1.7 (bootstrapped), δ2 = 2 + 0.09 - 0.2 = 1.89
    #   A2 = 1.89, A1 = 1.7, A0 = 1.3 + 0.45·1.7 = 2.065
    expected = t([[1.13, 0.6, 1.03], [2.065, 1.7, 1.89]])
    np.testing.assert_allclose(adv, expected, rtol=1e-6)
    np.testing.assert_allclose(ret, expected + values, rtol=1e-6)


def test_clipped_surrogate_loss_by_hand():
    # ε = 0.2: per sample min(r·A, clip(r, 0.8, 1.2)·A)
    #   A = +2, r = 1.5 → min(3, 2.4) = 2.4;  A = -1, r = 0.5 → min(-0.5, -0.8) = -0.8;  A = 1, r = 1 → 1
    # mean = (2.4 - 0.8 + 1)/3 = 0.8667, loss = -0.8667
    loss = pc.clipped_surrogate_loss(torch.tensor([1.5, 0.5, 1.0]), torch.tensor([2.0, -1.0, 1.0]), 0.2)
    assert loss.item() == pytest.approx(-2.6 / 3)


def test_value_loss_unclipped_and_clipped():
    new, old, returns = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 2.5]), torch.tensor([0.5, 0.0])
    # ½·((1 - 0.5)² + (2 - 0)²)/2 = 1.0625; clipped: V_clip = (0.2, 2.3): ½·(0.25 + 5.29)/2 = 1.385
    assert pc.value_loss(new, old, returns).item() == pytest.approx(1.0625)
    assert pc.value_loss(new, old, returns, clip_coef=0.2).item() == pytest.approx(1.385)


def test_approx_kl_and_explained_variance():
    # log r = ±ln 2: E[-log r] = 0, E[(r - 1) - log r] = ((1 - ln 2) + (-0.5 + ln 2))/2 = 0.25
    old, new = pc.approx_kl(torch.tensor([LN2, -LN2]))
    assert (old.item(), new.item()) == pytest.approx((0.0, 0.25), abs=1e-7)
    targets = torch.tensor([1.0, 2.0, 3.0])
    assert pc.explained_variance(torch.full((3,), 2.0), targets) == pytest.approx(0.0)
    torch.testing.assert_close(pc.normalize_advantages(targets, targets.mean(), targets.std()), torch.tensor([-1.0, 0.0, 1.0]))


# ---------------------------------------------------------------------------------------------
# The rollout and a truncation's bootstrap from its normalised final observation
# ---------------------------------------------------------------------------------------------

class BoxCounter(gym.Env):
    """obs = [steps taken this episode]; reward = that count; remembers the actions it was given."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, terminate_at=100):
        self.terminate_at, self.given = terminate_at, []

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.n = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.given.append(float(action[0]))
        self.n += 1
        return np.array([self.n], np.float32), float(self.n), self.n == self.terminate_at, False, {}


def rows(x):
    return np.asarray(x).reshape(x.shape[0], x.shape[1]).T.tolist()


def counter_rollout():
    # Env 0 is cut by a time limit after 2 steps; env 1 terminates after 3.
    counters = [BoxCounter(), BoxCounter(terminate_at=3)]
    envs = gym.vector.SyncVectorEnv([lambda: gym.wrappers.TimeLimit(counters[0], max_episode_steps=2),
                                     lambda: counters[1]], autoreset_mode=AutoresetMode.SAME_STEP)
    rollout = pc.Rollout.empty(4, 2, 1, 1)
    obs, _ = envs.reset(seed=0)
    # An action outside the space [-1, 1]: the env gets it clipped, the rollout keeps it as drawn.
    pc.collect_rollout(envs, lambda o: np.full((len(o), 1), 5.0, np.float32), rollout, obs)
    return rollout, counters


def test_rollout_keeps_final_observations_and_the_unclipped_actions():
    rollout, counters = counter_rollout()
    # env 0: 0→1, 1→2 (truncated; reset to 0 in the same step), 0→1, 1→2 (truncated)
    # env 1: 0→1, 1→2, 2→3 (terminated), 0→1
    assert rows(rollout.obs) == [[0, 1, 0, 1], [0, 1, 2, 0]]
    assert rows(rollout.next_obs) == [[1, 2, 1, 2], [1, 2, 3, 1]]
    assert rows(rollout.truncations) == [[False, True, False, True], [False] * 4]
    assert rows(rollout.terminations) == [[False] * 4, [False, False, True, False]]
    assert (rollout.actions == 5.0).all()
    assert counters[0].given == counters[1].given == [1.0] * 4


def test_truncation_bootstraps_from_the_normalised_final_observation():
    rollout, _ = counter_rollout()
    # The statistics the rollout acted with: mean 1, variance 4 (std 2), from 100 observations.
    rms = pc.RunningMeanStd((1,))
    rms.mean, rms.var, rms.count = np.array([1.0]), np.array([4.0]), 100.0
    obs, next_obs = pc.normalize_batch(rollout, rms, 10.0, pc.Ranks())
    # Every observation is standardised with those, (s - 1) / 2, not with statistics that
    # already include the batch: 0 → -0.5, 1 → 0, 2 → 0.5, 3 → 1.
    z = {0: -0.5, 1: 0.0, 2: 0.5, 3: 1.0}
    np.testing.assert_allclose(obs.ravel(), [z[v] for v in rollout.obs.ravel()], rtol=1e-6)
    # The final observations (2 after env 0's truncations, 3 after env 1's termination) too.
    np.testing.assert_allclose(next_obs.ravel(), [z[v] for v in rollout.next_obs.ravel()], rtol=1e-6)
    # Then the statistics take in the batch, (0, 0), (1, 1), (0, 2), (1, 0): mean 0.625 over 8.
    # δ = 0.625 - 1 = -0.375, n = 108: μ = 1 - 0.375·8/108 = 0.972222;
    # σ² = (100·4 + 8·0.484375 + 0.140625·100·8/108) / 108 = (400 + 3.875 + 1.041667) / 108 = 3.749228.
    np.testing.assert_allclose(rms.mean, [0.972222], rtol=1e-5)
    np.testing.assert_allclose(rms.var, [3.749228], rtol=1e-5)
    assert rms.count == 108

    # With a critic V(s) = s (on standardised s), γ = 0.9 and λ = 0, Â_t = δ_t:
    #   env 0, t=1 (truncated): δ = 2 + 0.9·V(z(2)) - V(z(1)) = 2 + 0.45 - 0 = 2.45
    #   env 1, t=2 (terminated): δ = 3 - V(z(2)) = 3 - 0.5 = 2.5
    values = obs.reshape(4, 2)
    next_values = next_obs.reshape(4, 2)
    adv, returns = pc.gae(rollout.rewards, values, next_values, rollout.terminations, rollout.truncations, 0.9, 0.0)
    assert adv[1, 0] == pytest.approx(2.45, rel=1e-6)
    assert adv[2, 1] == pytest.approx(2.5, rel=1e-6)
    assert adv.dtype == returns.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------------

SMALL = ["--total-timesteps", "1024", "--num-envs", "2", "--num-steps", "256", "--num-minibatches", "4",
         "--update-epochs", "2"]
TAGS = {"charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS",
        "losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl",
        "losses/old_approx_kl", "losses/clipfrac", "losses/explained_variance"}


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "InvertedPendulum-v5"])  # classic control, MuJoCo
def test_smoke_train_save_and_evaluate(tmp_path, capsys, env_id):
    out = run_main(pc, tmp_path, capsys, "--env-id", env_id, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert f"ppo_continuous.py: logs in runs/{run.name}/\n" in out.stdout  # where to point TensorBoard
    assert run.name.startswith(f"{env_id}__ppo_continuous__1__")
    tags, texts = read_tags(run)
    assert TAGS <= set(tags)
    assert "|num_minibatches|4|" in texts["hyperparameters/text_summary"]
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["script"] == "ppo_continuous.py" and ckpt["global_step"] == 1024
    obs_dim = gym.make(env_id).observation_space.shape[0]
    assert ckpt["obs_rms"]["mean"].shape == (obs_dim,) and ckpt["obs_rms"]["count"] == pytest.approx(1024, abs=1)
    assert ckpt["return_rms"]["var"] > 0

    # By the run's folder, with no --env-id: the checkpoint's env.
    # Training's batch flags are no evaluation's business: no "less than one batch", no "does not divide".
    out = run_main(pc, tmp_path, capsys, "--eval-checkpoint", str(run), "--eval-episodes", "3",
                   "--total-timesteps", "10", "--num-minibatches", "7")
    assert out.returncode == 0, out.stderr
    assert f"eval: 3 episodes of {env_id}" in out.stdout
    (evals,) = [d for d in (tmp_path / "runs").iterdir() if "-eval__" in d.name]
    assert len(read_tags(evals)[0]["eval/episodic_return"]) == 3


class OffsetTarget(gym.Env):
    """A one-step-at-a-time target: u ~ U(-1, 1), seen as obs = 100 + 10u; reward -(a - u)².

    Useless unless standardised (a tanh network sees 90..110 as one saturated input), so a
    policy evaluated without its training's statistics acts blindly: what users of CleanRL's
    saved models saw. A random policy scores about -25 in its 20 steps, a perfect one 0.
    """

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.u = self.np_random.uniform(-1, 1)
        return np.array([100 + 10 * self.u], np.float32), {}

    def step(self, action):
        reward = -float((action[0] - self.u) ** 2)
        self.u = self.np_random.uniform(-1, 1)
        return np.array([100 + 10 * self.u], np.float32), reward, False, False, {}


gym.register("OffsetTarget-v0", entry_point=OffsetTarget, max_episode_steps=20)


@pytest.mark.parametrize("every", ["0", "600"])  # a save each iteration and the final one; the final one alone
def test_the_logs_are_on_disk_before_each_checkpoint(tmp_path, capsys, monkeypatch, every):
    # Killed just after a save (the final one included: torchrun stops rank 0 when a peer dies), the run resumes
    # from the checkpoint and purges what came after it: what came before must be on disk already.
    saves = watch_saves(pc, monkeypatch)
    assert run_main(pc, tmp_path, capsys, *SMALL, "--save-model", "--checkpoint-every", every).returncode == 0
    (run,) = (tmp_path / "runs").iterdir()
    logged = read_steps(run, "losses/policy_loss")
    assert len(saves) > 2 if every == "0" else len(saves) == 1
    for step, on_disk in saves:
        assert on_disk == [s for s in logged if s <= step]


def eval_return(out):
    return float(out.stdout.split("return ")[1].split(" ±")[0])


def test_learns_offset_target_and_evaluates_as_trained(tmp_path, capsys):
    out = run_main(pc, tmp_path, capsys, "--env-id", "OffsetTarget-v0", "--num-envs", "4", "--num-steps", "64",
                   "--num-minibatches", "4", "--learning-rate", "3e-3", "--total-timesteps", "6144", "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    trained = np.mean(read_tags(run)[0]["charts/episodic_return"][-20:])
    assert trained > -5, trained  # it learned: random is about -25

    deterministic = run_main(pc, tmp_path, capsys, "--env-id", "OffsetTarget-v0", "--eval-checkpoint",
                             str(run / "model.pt"))
    assert deterministic.returncode == 0, deterministic.stderr
    assert "(the mean action)" in deterministic.stdout
    # The deterministic mean scores at least as well as the noisy training policy (to 1 point).
    assert eval_return(deterministic) > trained - 1.0, (eval_return(deterministic), trained)

    # Sampling as in training costs the noise, (a - μ)² = σ² a step: it scores below the mean action.
    out = run_main(pc, tmp_path, capsys, "--env-id", "OffsetTarget-v0", "--eval-checkpoint", str(run / "model.pt"),
                   "--no-eval-deterministic")
    assert "(sampled actions)" in out.stdout
    assert trained - 3.0 < eval_return(out) < eval_return(deterministic), (eval_return(out), trained)

    # The same weights without the statistics, as CleanRL saves them: near random, or worse.
    ckpt = torch.load(run / "model.pt", weights_only=True)
    ckpt["obs_rms"], ckpt["args"]["norm_obs"] = None, False
    torch.save(ckpt, tmp_path / "no_stats.pt")
    out = run_main(pc, tmp_path, capsys, "--env-id", "OffsetTarget-v0", "--eval-checkpoint", str(tmp_path / "no_stats.pt"))
    assert out.returncode == 0, out.stderr
    assert eval_return(out) < -5, eval_return(out)


class ContinuousBandit(gym.Env):
    """A one-step target: s is 0 or 1 at random, seen one-hot; reward 1 - (a - u_s)², u = (-0.5, 0.5).
    The answer is known: μ(s) = u_s; and the critic's, whatever σ is: V(s) = E[r] = 1 - (μ(s) - u_s)² - σ²
    (the 1 keeps V far from what a critic trained on the advantages instead would learn)."""

    observation_space = gym.spaces.Box(0.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    targets = (-0.5, 0.5)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.s = int(self.np_random.integers(2))
        return one_hot(self.s), {}

    def step(self, action):
        return one_hot(self.s), 1.0 - float((action[0] - self.targets[self.s]) ** 2), True, False, {}


gym.register("ContinuousBandit-v0", entry_point=ContinuousBandit)


def test_learns_a_continuous_bandit_and_its_value(tmp_path, capsys):
    # Unscaled rewards, so that V is in the env's units.
    out = run_main(pc, tmp_path, capsys, "--env-id", "ContinuousBandit-v0", "--num-envs", "4", "--num-steps", "64",
                   "--num-minibatches", "4", "--learning-rate", "3e-3", "--total-timesteps", "8192",
                   "--no-norm-reward", "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run / "model.pt", weights_only=True)
    agent = pc.Agent(2, 1)
    agent.load_state_dict(ckpt["model"])
    policy = pc.NumpyPolicy(agent, pc.RunningMeanStd.from_state(ckpt["obs_rms"]), 10.0)
    states = np.eye(2, dtype=np.float32)
    mean, sigma = policy.mean(states)[:, 0], float(policy.std[0])
    # The policy's mean found both targets (a random or sign-flipped one is off by 0.5 or more).
    np.testing.assert_allclose(mean, [-0.5, 0.5], atol=0.1)
    # The critic knows what that policy earns: V(s) = 1 - (μ(s) - u_s)² - σ².
    obs = torch.from_numpy(pc.normalize_observations(states, policy.obs_rms.mean, policy.obs_rms.var, 10.0))
    expected = 1.0 - (mean - np.array([-0.5, 0.5])) ** 2 - sigma ** 2
    np.testing.assert_allclose(agent.get_value(obs).detach().numpy(), expected, atol=0.05)


class LoudBandit(ContinuousBandit):
    """ContinuousBandit paying in units 100 times larger."""

    def step(self, action):
        obs, reward, *rest = super().step(action)
        return obs, 100.0 * reward, *rest


gym.register("LoudBandit-v0", entry_point=LoudBandit)


@pytest.mark.parametrize("norm_reward", [True, False])
def test_gae_is_given_the_scaled_rewards(tmp_path, capsys, monkeypatch, norm_reward):
    # Episodes of one step: each discounted return G is its reward r, so the scale, √Var[G], is the
    # std of every reward seen so far, this batch's included (a prior of weight 1e-4 aside), and
    # GAE must be given r / std(r so far): rewards of std about one, not the env's hundreds.
    played, given = [], []
    real_collect, real_gae = pc.collect_rollout, pc.gae

    def collect_rollout(envs, policy, rollout, *a, **k):
        obs = real_collect(envs, policy, rollout, *a, **k)
        played.append(rollout.rewards.copy())
        return obs

    def gae(rewards, *a, **k):
        given.append(rewards.copy())
        return real_gae(rewards, *a, **k)
    monkeypatch.setattr(pc, "collect_rollout", collect_rollout)
    monkeypatch.setattr(pc, "gae", gae)
    out = run_main(pc, tmp_path, capsys, "--env-id", "LoudBandit-v0", "--num-envs", "4", "--num-steps", "64",
                   "--total-timesteps", "1024", "--norm-reward" if norm_reward else "--no-norm-reward")
    assert out.returncode == 0, out.stderr
    assert len(played) == len(given) == 4
    for k in range(4):
        assert np.abs(played[k]).mean() > 30  # the env's units
        so_far = np.concatenate(played[: k + 1]).reshape(-1)
        expected = np.clip(played[k] / so_far.std(), -10, 10) if norm_reward else played[k]
        np.testing.assert_allclose(given[k], expected, rtol=1e-3, atol=1e-3)


def test_log_pi_old_is_the_log_probability_under_the_policy_that_acted(tmp_path, capsys, monkeypatch):
    # The ratio's denominator must be the policy that chose the actions: the rollout acted with the
    # statistics from before its batch, so log π_θold must be computed with those too.
    acted, stored = [], []

    class RecordingPolicy(pc.NumpyPolicy):
        def __call__(self, obs):
            action = super().__call__(obs)
            mean, std = self.mean(obs), self.std
            acted.append((-0.5 * ((action - mean) / std) ** 2 - np.log(std) - 0.5 * LOG_2PI).sum(-1))
            return action

    real_update = pc.ppo_update

    def recording_update(agent, optimizer, batch, *rest):
        stored.append(batch.logprobs.numpy().copy())
        return real_update(agent, optimizer, batch, *rest)
    monkeypatch.setattr(pc, "NumpyPolicy", RecordingPolicy)
    monkeypatch.setattr(pc, "ppo_update", recording_update)
    out = run_main(pc, tmp_path, capsys, "--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "64",
                   "--num-minibatches", "2", "--total-timesteps", "384")
    assert out.returncode == 0, out.stderr
    # 3 iterations of 64 steps x 2 envs, in the batch's (T, N) order.
    np.testing.assert_allclose(np.stack(stored), np.stack(acted).reshape(3, 128), atol=2e-4)


# ---------------------------------------------------------------------------------------------
# The update: what each flag does to one ppo_update on a fixed batch
# ---------------------------------------------------------------------------------------------

def bandit_batch(n=256):
    """ContinuousBandit-v0 transitions with actions from a fresh agent, as π_θold and its critic see them."""
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 2, (n,), generator=g)
    torch.manual_seed(0)
    agent = pc.Agent(2, 1, log_std_init=-0.5)
    obs = torch.eye(2)[s]
    actions = torch.randn(n, 1, generator=g) * 0.6
    rewards = 1.0 - (actions[:, 0] - (s.float() - 0.5)) ** 2
    with torch.no_grad():
        logprobs, _, values, means, log_stds = agent.evaluate_actions(obs, actions)
    return agent, pc.Batch(obs, actions, logprobs, values, advantages=rewards - values, returns=rewards,
                           means=means, log_stds=log_stds)


def update(agent, batch, optimizer=torch.optim.Adam, lr=3e-3, ranks=pc.Ranks(), kl_beta=0.0, **flags):
    """A copy of `agent` after one ppo_update (2 epochs x 4 minibatches unless told), and its stats."""
    agent = copy.deepcopy(agent)
    args = pc.Args(**{"num_minibatches": 4, "update_epochs": 2, **flags})
    torch.manual_seed(1)  # the same shuffles every time
    stats = pc.ppo_update(agent, optimizer(agent.parameters(), lr=lr), batch, args, ranks, kl_beta)
    return agent, stats


def parameters(agent):
    return torch.cat([p.detach().flatten() for p in agent.parameters()])


def test_ppo_loss_signs():
    # L = -L^CLIP - c_e H + c_v L^V: with clip loss 1, entropy 2, value loss 3, c_e 0.1, c_v 0.5:
    # 1 - 0.2 + 1.5 = 2.3. Descending L raises the entropy and lowers the value loss.
    clip_loss, entropy, v_loss = (torch.tensor(x, requires_grad=True) for x in (1.0, 2.0, 3.0))
    loss = pc.ppo_loss(clip_loss, entropy, v_loss, ent_coef=0.1, vf_coef=0.5)
    assert loss.item() == pytest.approx(2.3)
    loss.backward()
    assert (clip_loss.grad.item(), entropy.grad.item(), v_loss.grad.item()) == pytest.approx((1.0, -0.1, 0.5))


def test_the_entropy_bonus_raises_the_entropy():
    # H = ½ + ½ ln 2π + log σ: only the bonus moves log σ when there is no policy gradient.
    agent, batch = bandit_batch()
    batch.advantages.zero_()
    without, _ = update(agent, batch, ent_coef=0.0)
    with_bonus, _ = update(agent, batch, ent_coef=0.5)
    assert without.actor_logstd.item() == pytest.approx(-0.5, abs=1e-6)
    assert with_bonus.actor_logstd.item() > -0.5 + 0.01


def test_value_clipping_keeps_the_critic_near_its_old_values():
    # Returns 10 above V_old. Plain SGD (no momentum to overshoot with): the clipped loss's gradient
    # stops once V passes V_old + ε = V_old + 0.2, so V ends within one step of it; unclipped it runs on.
    agent, batch = bandit_batch()
    batch.returns = batch.values + 10.0
    batch.advantages.zero_()

    def moved(a):
        return (a.get_value(batch.obs) - batch.values).abs().max().item()
    clipped, _ = update(agent, batch, torch.optim.SGD, lr=0.1, clip_vloss=True, update_epochs=4)
    unclipped, _ = update(agent, batch, torch.optim.SGD, lr=0.1, clip_vloss=False, update_epochs=4)
    assert moved(clipped) < 0.35
    assert moved(unclipped) > 1.0


def test_a_minibatch_of_one_advantage_is_left_as_it_is():
    # One advantage has no std (NaN for torch): --num-minibatches as large as the batch, less its reset steps.
    one, three = torch.tensor([3.0]), torch.tensor([1.0, 2.0, 3.0])
    (m1, s1), (m3, s3) = pc.union_mean_std([one, three], pc.Ranks())
    assert m1.item() == 3.0 and s1.isnan()  # the mean is the value: the adaptive β's mean KL of one step is its KL
    assert pc.normalize_advantages(one, m1, s1).item() == pytest.approx(3.0)
    torch.testing.assert_close(pc.normalize_advantages(three, m3, s3), torch.tensor([-1.0, 0.0, 1.0]))


def test_advantage_normalisation_ignores_a_constant_shift():
    # (Â + c - mean) / std = (Â - mean) / std: normalised, adding 10 to every advantage changes nothing;
    # unnormalised, it pushes up the probability of every action taken, and the update differs.
    agent, batch = bandit_batch()
    shifted = copy.deepcopy(batch)
    shifted.advantages += 10.0
    for norm_adv, same in [(True, True), (False, False)]:
        a, _ = update(agent, batch, norm_adv=norm_adv)
        b, _ = update(agent, shifted, norm_adv=norm_adv)
        assert torch.allclose(parameters(a), parameters(b), atol=1e-5) is same, norm_adv


def logged(tmp_path, capsys, name, *argv):
    out = run_main(pc, tmp_path / name, capsys, "--env-id", "ContinuousBandit-v0", "--num-envs", "4",
                   "--num-steps", "64", "--num-minibatches", "4", "--update-epochs", "2",
                   "--total-timesteps", "2048", *argv)
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / name / "runs").iterdir()
    return read_tags(run)[0]


def test_target_kl_stops_the_epochs_early(tmp_path, capsys):
    # 2 epochs x 4 minibatches = 8 steps an iteration; the first minibatch's KL is 0 (θ = θ_old), the
    # second's is not, so a KL target of 1e-9 stops after 2.
    assert logged(tmp_path, capsys, "free")["losses/minibatch_steps"] == [8] * 8
    assert logged(tmp_path, capsys, "stopped", "--target-kl", "1e-9")["losses/minibatch_steps"] == [2] * 8


# ---------------------------------------------------------------------------------------------
# The KL-penalised objective (L^KLPEN) and the unclipped one (L^CPI)
# ---------------------------------------------------------------------------------------------

def test_gaussian_kl_by_hand_and_as_torch_has_it():
    # One dimension: N(0, 1) to N(1, 2²): log 2 - 0 + (1 + 1²) / (2·4) - ½ = 0.693147 + 0.25 - 0.5.
    # A second dimension where the two agree adds nothing.
    old_mean, old_log_std = torch.tensor([[0.0, 3.0]]), torch.tensor([[0.0, -1.0]])
    new_mean, new_log_std = torch.tensor([[1.0, 3.0]]), torch.tensor([[math.log(2.0), -1.0]])
    kl = pc.gaussian_kl(old_mean, old_log_std, new_mean, new_log_std)
    torch.testing.assert_close(kl, torch.tensor([0.443147]), rtol=0, atol=1e-6)
    assert pc.gaussian_kl(old_mean, old_log_std, old_mean, old_log_std).item() == 0.0
    g = torch.Generator().manual_seed(0)
    m0, s0, m1, s1 = (torch.randn(5, 3, generator=g) for _ in range(4))
    normal = torch.distributions.Normal
    expected = torch.distributions.kl_divergence(normal(m0, s0.exp()), normal(m1, s1.exp())).sum(-1)
    torch.testing.assert_close(pc.gaussian_kl(m0, s0, m1, s1), expected)


def test_unclipped_surrogate_and_kl_penalty_by_hand():
    # -mean(r Â) = -(0.5·1 + 2·(-1)) / 2 = 0.75; β·mean KL = 2·(0.1 + 0.3) / 2 = 0.4.
    assert pc.surrogate_loss(torch.tensor([0.5, 2.0]), torch.tensor([1.0, -1.0])).item() == pytest.approx(0.75)
    assert pc.kl_penalty(torch.tensor([0.1, 0.3]), 2.0).item() == pytest.approx(0.4)


@pytest.mark.parametrize("kl, beta", [(0.005, 0.5), (0.01 / 1.5, 1.0), (0.01, 1.0), (0.015, 1.0), (0.02, 2.0)])
def test_adaptive_beta_halves_below_the_band_and_doubles_above_it(kl, beta):
    # d_targ 0.01: the band is [0.01/1.5, 0.015], edges included; β = 1 before.
    assert pc.adapt_kl_beta(1.0, kl, 0.01) == beta


def test_the_batch_keeps_the_old_policy_while_the_update_moves_it():
    # The update steps the agent that made the batch, as training does: log σ is a parameter that Adam
    # changes in place, and the batch's log σ_old must not change with it.
    agent, batch = bandit_batch()
    before = batch.log_stds.clone()
    pc.ppo_update(agent, torch.optim.Adam(agent.parameters(), lr=3e-2), batch, pc.Args(num_minibatches=4), pc.Ranks(), 1.0)
    assert not torch.equal(agent.actor_logstd.detach().expand_as(before), before)  # σ moved
    assert torch.equal(batch.log_stds, before)  # σ_old did not


def test_the_kl_penalty_holds_the_policy_near_the_old_one():
    agent, batch = bandit_batch()
    def kl_after(beta):
        updated, stats = update(agent, batch, clip_coef=None, kl_beta=beta)
        assert stats["kl_beta"] == beta
        return pc.mean_exact_kl(updated, batch, pc.Ranks())
    free, held = kl_after(0.0), kl_after(30.0)
    assert free > 3 * held > 0


@pytest.mark.parametrize("argv", [[], ["--clip-coef", "None"], ["--clip-coef", "None", "--kl-beta", "1"],
                                  ["--clip-coef", "None", "--kl-dtarg", "0.01"]])
def test_each_objective_trains_and_logs_its_beta(tmp_path, capsys, argv):
    tags = logged(tmp_path, capsys, "run", *argv)
    assert len(tags["losses/kl_beta"]) == 8 and all(math.isfinite(v) for v in tags["losses/policy_loss"])
    if "--clip-coef" in argv:  # nothing is clipped
        assert set(tags["losses/clipfrac"]) == {0.0}
    if "--kl-dtarg" in argv:  # from 1, halved or doubled after every update outside the band
        beta = tags["losses/kl_beta"]
        assert beta[0] == 1.0 and len(set(beta)) > 1
        assert all(b / a in (0.5, 1.0, 2.0) for a, b in zip(beta, beta[1:]))
    else:
        assert set(tags["losses/kl_beta"]) == {1.0 if "--kl-beta" in argv else 0.0}


def test_adaptive_kl_learns_a_continuous_bandit(tmp_path, capsys):
    out = run_main(pc, tmp_path, capsys, "--env-id", "ContinuousBandit-v0", "--num-envs", "4", "--num-steps", "64",
                   "--num-minibatches", "4", "--learning-rate", "3e-3", "--total-timesteps", "8192",
                   "--clip-coef", "None", "--kl-dtarg", "0.01", "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run / "model.pt", weights_only=True)
    agent = pc.Agent(2, 1)
    agent.load_state_dict(ckpt["model"])
    mean = pc.NumpyPolicy(agent, pc.RunningMeanStd.from_state(ckpt["obs_rms"]), 10.0).mean(np.eye(2, dtype=np.float32))
    np.testing.assert_allclose(mean[:, 0], [-0.5, 0.5], atol=0.1)
    # β is the run's state: the checkpoint holds the value the next update would use.
    beta = read_tags(run)[0]["losses/kl_beta"][-1]
    assert ckpt["kl_beta"] in (beta / 2, beta, beta * 2)
    # Resumed for one more iteration, the run goes on with that β, not with a new start at 1.
    out = run_main(pc, tmp_path, capsys, "--resume", str(run), "--total-timesteps", "8448")
    assert out.returncode == 0, out.stderr
    assert read_tags(run)[0]["losses/kl_beta"][-1] == ckpt["kl_beta"]


def test_anneal_lr_falls_linearly_to_zero(tmp_path, capsys):
    # 8 iterations: lr_k = (1 - k/8)·3e-4 for k = 0..7, so the last is 3e-4/8; without annealing, 3e-4 throughout.
    annealed = logged(tmp_path, capsys, "annealed")["charts/learning_rate"]
    np.testing.assert_allclose(annealed, [3e-4 * (1 - k / 8) for k in range(8)], rtol=1e-6)
    np.testing.assert_allclose(logged(tmp_path, capsys, "constant", "--no-anneal-lr")["charts/learning_rate"],
                               [3e-4] * 8, rtol=1e-6)


def test_same_seed_same_returns_tracked_or_not(tmp_path, capsys):
    # Tracked by Weights & Biases (offline) in the fresh process where wandb is installed, untracked in this one.
    returns = run_twice(pc, "ppo_continuous.py", tmp_path, capsys, "--env-id", "Pendulum-v1", *SMALL,
                        "--total-timesteps", "2048", "--seed", "7",
                        fresh=["--track"] if TRACKING else [], env=WANDB_OFFLINE)
    assert len(returns[0]) >= 8
    assert returns[0] == returns[1]
    if TRACKING:  # the W&B run is the run (a resumed one goes on in it), with the scalars and the flags
        ((name, record),) = wandb_records(tmp_path / "0").items()
        (run,) = (tmp_path / "0" / "runs").iterdir()
        assert name.endswith(run.name)
        for tag in (b"wandb_project_name",  # a flag only the config holds
                    b"charts/episodic_return", b"losses/value_loss", b"charts/learning_rate", b"Pendulum-v1"):
            assert tag in record, tag


@pytest.mark.parametrize("argv, fragments", [
    (["--env-id", "NoSuchEnv-v0"], ["unknown env id", "NoSuchEnv-v0"]),
    (["--env-id", "ALE/Breakout-v5"],
     ["ALE/Breakout-v5 is an Atari game", "ppo.py and a2c.py", "ppo_continuous.py takes Box actions"]),
    (["--env-id", "ale_py:PongNoFrameskip-v4"], ["ale_py:PongNoFrameskip-v4 is an Atari game"]),
    (["--env-id", "Breakout-v4"], ["Breakout-v4 is an Atari game"]),  # registered by ale-py, which is not loaded
    (["--env-id", "CartPole-v1"], ["Discrete", "ppo.py"]),
    (["--num-envs", "3", "--num-steps", "5", "--num-minibatches", "4"], ["does not divide", "15"]),
    (["--num-envs", "0"], ["--num-envs must be positive"]),
    (["--update-epochs", "-1"], ["--update-epochs must be positive"]),
    (["--total-timesteps", "10"], ["less than one batch"]),
    (["--obs-clip", "0"], ["--obs-clip"]),
    (["--eval-checkpoint", "no/such/model.pt"], ["no checkpoint at no/such/model.pt"]),
    (["--seed", "-1"], ["--seed must lie in [0, 2^32)", "-1"]),
    (["--seed", "99999999999"], ["--seed must lie in [0, 2^32)"]),
    (["--seed", "99999999999", "--eval-checkpoint", "model.pt"], ["--seed must lie in [0, 2^32)"]),
    (["--learning-rate", "nan"], ["--learning-rate must be a finite number, got nan"]),
    (["--obs-clip", "nan"], ["--obs-clip must be a finite number"]),
    (["--checkpoint-every", "-1"], ["--checkpoint-every must be 0 or more seconds"]),
    (["--target-kl", "0"], ["--target-kl must be positive, got 0.0"]),  # None turns the early stop off
    (["--resume", ""], ["--resume was given an empty path"]),  # "$RUN" unset: not a new run
    (["--eval-checkpoint", ""], ["--eval-checkpoint was given an empty path"]),
    (["--kl-beta", "-1"], ["--kl-beta must be 0 or more"]),
    (["--kl-dtarg", "0"], ["--kl-dtarg positive"]),
    (["--clip-coef", "None", "--clip-vloss"], ["--clip-vloss clips by --clip-coef"]),
    (["--clip-coef", "0"], ["--clip-coef", "must be positive"]),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, fragments):
    one_line_error(run_main(pc, tmp_path, capsys, *argv), "ppo_continuous.py", *fragments)


def test_an_unwritable_working_directory_is_one_line(tmp_path, capsys):
    out = run_main(pc, tmp_path / "train", capsys, "--env-id", "Pendulum-v1", *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "train" / "runs").iterdir()
    make_runs_unwritable(tmp_path / "ro")
    # Training fails before it starts, not after it has trained.
    one_line_error(run_main(pc, tmp_path / "ro", capsys, "--env-id", "Pendulum-v1", *SMALL), "ppo_continuous.py",
                   "cannot write runs/Pendulum-v1__ppo_continuous__1__")
    # An evaluation prints its result, then says that it could not log it.
    out = run_main(pc, tmp_path / "ro", capsys, "--env-id", "Pendulum-v1", "--eval-checkpoint", str(run / "model.pt"),
                   "--eval-episodes", "2")
    assert "eval: 2 episodes of Pendulum-v1 (the mean action): return" in out.stdout
    one_line_error(out, "ppo_continuous.py", "cannot write runs/Pendulum-v1__ppo_continuous-eval__1__")


def test_a_user_error_from_the_command_line_has_no_traceback(tmp_path):
    one_line_error(run_script("ppo_continuous.py", tmp_path, "--env-id", "CartPole-v1"), "ppo_continuous.py", "ppo.py")


@pytest.mark.parametrize("rank, launcher, says, waits", USER_ERROR_UNDER_TORCHRUN)
def test_under_torchrun_only_rank_0_says_a_user_error_and_the_others_wait_to_be_stopped(
        tmp_path, capsys, monkeypatch, rank, launcher, says, waits):
    user_error_as_rank(pc, tmp_path, capsys, monkeypatch, rank, launcher, says, waits)


def test_checkpoint_errors(tmp_path, capsys):
    script = "ppo_continuous.py"
    foreign = tmp_path / "ppo.pt"
    torch.save({"script": "ppo.py", "model": {}, "args": {"env_id": "NoSuchEnv-v0"}}, foreign)
    one_line_error(run_main(pc, tmp_path, capsys, "--eval-checkpoint", str(foreign)), script, "written by ppo.py")
    garbage = tmp_path / "notes.pt"
    garbage.write_text("not a checkpoint")
    one_line_error(run_main(pc, tmp_path, capsys, "--eval-checkpoint", str(garbage)), script, "not a checkpoint")
    incomplete = tmp_path / "incomplete.pt"
    torch.save({"script": script}, incomplete)
    one_line_error(run_main(pc, tmp_path, capsys, "--eval-checkpoint", str(incomplete)), script,
                   "incomplete ppo_continuous.py checkpoint", "model")

    out = run_main(pc, tmp_path, capsys, "--env-id", "Pendulum-v1", *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    model = str(run / "model.pt")
    one_line_error(run_main(pc, tmp_path, capsys, "--env-id", "InvertedPendulum-v5", "--eval-checkpoint", model),
                   script, "trained on Pendulum-v1", "--env-id Pendulum-v1")
    one_line_error(run_main(pc, tmp_path, capsys, "--env-id", "HalfCheetah-v5", "--eval-checkpoint", model),
                   script, "trained on Pendulum-v1")  # --env-id given as its default still wins
    ckpt = torch.load(model, weights_only=True)
    torch.save({**ckpt, "obs_rms": None}, tmp_path / "no_stats.pt")
    one_line_error(run_main(pc, tmp_path, capsys, "--env-id", "Pendulum-v1", "--eval-checkpoint",
                            str(tmp_path / "no_stats.pt")), script, "no statistics")
    torch.save({**ckpt, "model": {"some.layer": torch.zeros(3)}}, tmp_path / "misshapen.pt")
    one_line_error(run_main(pc, tmp_path, capsys, "--env-id", "Pendulum-v1", "--eval-checkpoint",
                            str(tmp_path / "misshapen.pt")), script, "weights do not fit")


def test_capture_video_without_moviepy(tmp_path, capsys):
    try:
        import moviepy  # noqa: F401
        pytest.skip("moviepy is installed")
    except ImportError:
        pass
    one_line_error(run_main(pc, tmp_path, capsys, "--env-id", "Pendulum-v1", *SMALL, "--capture-video"),
                   "ppo_continuous.py", "moviepy")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None or importlib.util.find_spec("moviepy") is None,
                    reason="needs wandb and moviepy (pip install wandb moviepy)")
def test_track_with_weights_and_biases_offline_and_film_the_evaluation(tmp_path, capsys):
    out = run_main(pc, tmp_path, capsys, "--env-id", "Pendulum-v1", *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    evaluation = ["--env-id", "Pendulum-v1", "--eval-checkpoint", str(run / "model.pt"), "--eval-episodes", "2"]
    out = run_script("ppo_continuous.py", tmp_path, *evaluation, "--capture-video", "--track", env=WANDB_OFFLINE)
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stderr.splitlines() if not line.startswith("wandb:")] == []  # no SDL noise, no warning
    videos = sorted(p.name for p in (tmp_path / "videos").glob("Pendulum-v1__ppo_continuous-eval__1__*/*.mp4"))
    assert videos == ["eval-0-episode-0.mp4", "eval-1-episode-0.mp4"]  # each evaluated episode, once
    # Filmed, the episodes are those played unfilmed: the camera sees the env; the policy, its saved statistics.
    assert eval_return(out) == eval_return(run_main(pc, tmp_path / "unfilmed", capsys, *evaluation))
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
    one_line_error(run_main(pc, tmp_path, capsys, "--env-id", "Pendulum-v1", *SMALL, "--track"), "ppo_continuous.py",
                   "--track: Weights & Biases could not start a run (No API key configured.", "WANDB_MODE=offline")


def test_track_without_wandb(tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(pc.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    one_line_error(run_main(pc, tmp_path, capsys, "--env-id", "Pendulum-v1", *SMALL, "--track"), "ppo_continuous.py",
                   "--track", "pip install wandb")


def test_an_env_from_the_users_own_module(tmp_path, capsys, monkeypatch):
    # A user's package registers its env when imported, `module:EnvId-v0`: here a one-step bandit that pays
    # -(a - 0.7)², so an untrained policy's mean action, about 0, scores about -0.49.
    (tmp_path / "toy_ppo_continuous.py").write_text(
        "import gymnasium as gym\n"
        "import numpy as np\n\n\n"
        "class Target(gym.Env):\n"
        "    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)\n"
        "    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)\n\n"
        "    def reset(self, seed=None, options=None):\n"
        "        super().reset(seed=seed)\n"
        "        return np.zeros(1, np.float32), {}\n\n"
        "    def step(self, action):\n"
        "        return np.zeros(1, np.float32), -float((action[0] - 0.7) ** 2), True, False, {}\n\n\n"
        "gym.register('ToyTarget-v0', entry_point=Target)\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # imported by the script, not here
    env_id = "toy_ppo_continuous:ToyTarget-v0"
    out = run_main(pc, tmp_path, capsys, "--env-id", env_id, "--num-envs", "4", "--num-steps", "64",
                   "--num-minibatches", "4", "--learning-rate", "3e-3", "--total-timesteps", "4096", "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("toy_ppo_continuous-ToyTarget-v0__ppo_continuous__1__")
    out = run_main(pc, tmp_path, capsys, "--env-id", env_id, "--eval-checkpoint", str(run / "model.pt"),
                   "--eval-episodes", "2")
    assert out.returncode == 0, out.stderr
    assert eval_return(out) > -0.01  # it learned: the mean action is within 0.1 of 0.7
    one_line_error(run_main(pc, tmp_path, capsys, "--env-id", "no_such_module:Pays-v0"), "ppo_continuous.py",
                   "cannot import 'no_such_module' for --env-id no_such_module:Pays-v0")


# One tiny batch of Hopper, filmed: MuJoCo renders in software here, 0.2 to 0.6 s a frame.
FILM_HOPPER = ["--env-id", "Hopper-v5", "--total-timesteps", "4", "--num-steps", "4", "--num-minibatches", "2",
               "--update-epochs", "1", "--capture-video"]


@pytest.mark.skipif(importlib.util.find_spec("moviepy") is None or ctypes.util.find_library("EGL") is None,
                    reason="needs moviepy (pip install moviepy) and EGL (libegl1)")
def test_mujoco_films_with_no_display(tmp_path):
    out = run_script("ppo_continuous.py", tmp_path, *FILM_HOPPER,
                     env={"DISPLAY": None, "WAYLAND_DISPLAY": None, "MUJOCO_GL": None})
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    (video,) = (tmp_path / "videos").glob("Hopper-v5__ppo_continuous__1__*/*.mp4")
    assert video.stat().st_size > 0


@pytest.mark.parametrize("env_id, camera", [("Hopper-v5", {"camera_name": "track"}), ("Pendulum-v1", {})])
def test_mujoco_is_filmed_by_the_camera_that_follows_the_body(monkeypatch, env_id, camera):
    asked = []
    def make(env_id, **kwargs):  # stands in for the probe's gym.make: what the video would be filmed with
        asked.append(kwargs)
        raise RuntimeError("no GL here")
    monkeypatch.setattr(pc.gym, "make", make)
    with pytest.raises(pc.UserError, match="cannot render"):
        pc.make_envs(env_id, 1, 1, capture_video=True, run_name="x")
    assert asked == [{"render_mode": "rgb_array", **camera}]  # Gymnasium's default camera stays put


@pytest.mark.skipif(importlib.util.find_spec("moviepy") is None, reason="needs moviepy (pip install moviepy)")
@pytest.mark.skipif(ctypes.util.find_library("OSMesa") is not None, reason="libOSMesa is installed: MUJOCO_GL=osmesa loads")
@pytest.mark.parametrize("pyopengl_platform", [None, "egl"])  # egl: PyOpenGL loads, MuJoCo's viewer is left half-made
def test_a_mujoco_gl_that_cannot_load_is_one_line(tmp_path, pyopengl_platform):
    out = run_script("ppo_continuous.py", tmp_path, *FILM_HOPPER,
                     env={"DISPLAY": None, "WAYLAND_DISPLAY": None, "MUJOCO_GL": "osmesa",
                          "PYOPENGL_PLATFORM": pyopengl_platform})
    one_line_error(out, "ppo_continuous.py", "--capture-video cannot render Hopper-v5", "MUJOCO_GL=osmesa",
                   "libosmesa6")


def test_cuda_without_a_gpu_warns_and_runs_on_the_cpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = run_main(pc, tmp_path, capsys, "--env-id", "Pendulum-v1", *SMALL, "--cuda")
    assert out.returncode == 0
    assert out.stderr.count("warning") == 1 and "running on the CPU" in out.stderr


def test_first_ctrl_c_is_a_request_and_the_second_interrupts(python_sigint):
    before = signal.getsignal(signal.SIGINT)
    stop = pc.StopRequest()
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
        stop = pc.StopRequest()
        os.kill(os.getpid(), signal.SIGINT)
        assert not stop.requested and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        stop.restore()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_sigterm_is_a_request_too():
    def previous(signum, frame):  # stands in for the default handler, which would end the test run
        pass
    before = signal.signal(signal.SIGTERM, previous)
    try:
        stop = pc.StopRequest()
        try:
            assert stop.exit_code == 0
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested and stop.exit_code == 143
            assert signal.getsignal(signal.SIGTERM) is previous  # a second SIGTERM acts as it would have
        finally:
            stop.restore()
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, before)


def test_ctrl_c_and_sigterm_save_model_statistics_and_logs(tmp_path, capsys):
    stopped = interrupt_script(pc, "ppo_continuous.py", tmp_path, capsys, "--env-id", "Pendulum-v1",
                               "--total-timesteps", "10000000", "--num-steps", "256", "--save-model")
    for signum, out, folder in stopped:
        assert out.returncode == 128 + signum, out.stderr  # 130 after Ctrl-C, 143 after SIGTERM
        assert "Traceback" not in out.stderr
        assert f"stopped by {'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'} at step" in out.stdout
        (run,) = (folder / "runs").iterdir()
        ckpt = torch.load(run / "model.pt", weights_only=True)
        assert ckpt["obs_rms"]["count"] >= 256 and ckpt["global_step"] < 10_000_000  # stopped early
        assert read_tags(run)[0]["charts/SPS"]


def test_non_finite_loss_stops_and_saves(tmp_path, capsys):
    # An absurd learning rate blows the weights up until the loss is NaN.
    out = run_main(pc, tmp_path, capsys, "--env-id", "Pendulum-v1", *SMALL, "--total-timesteps", "10240",
                   "--learning-rate", "1e30", "--save-model")
    assert out.returncode == 1, out.stderr
    assert "NaN or infinite at step" in out.stderr and "Traceback" not in out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    model = torch.load(run / "model.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in model.values())


def test_a_crash_saves_what_was_learned(tmp_path, capsys, monkeypatch):
    def crash(*a, **k):
        raise OSError("the env's simulator died")
    real_update = pc.ppo_update

    def update_then_crash(*a, **k):  # the second iteration's rollout crashes, after one update
        stats = real_update(*a, **k)
        monkeypatch.setattr(pc, "collect_rollout", crash)
        return stats
    monkeypatch.setattr(pc, "ppo_update", update_then_crash)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError):
        pc.main(["--env-id", "Pendulum-v1", *SMALL, "--save-model"])
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["global_step"] == 512 and ckpt["obs_rms"]["count"] == pytest.approx(512, abs=1)
    assert "(crashed)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Periodic, atomic checkpoints and --resume
# ---------------------------------------------------------------------------------------------

def test_a_crash_while_writing_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "model.pt")
    pc.write_atomically({"script": "ppo_continuous.py", "global_step": 1}, path)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        pc.write_atomically({"script": "ppo_continuous.py", "global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_a_killed_run_resumes_where_its_checkpoint_left_it(tmp_path, capsys):
    # Killed with SIGKILL after its first periodic checkpoint, then resumed: it ends at
    # --total-timesteps, and TensorBoard has each iteration's step once, in order.
    argv = ["--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "256", "--num-minibatches", "4",
            "--update-epochs", "2", "--total-timesteps", "10240", "--save-model", "--checkpoint-every", "0"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "ppo_continuous.py"), *argv], cwd=tmp_path,
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
    out = run_main(pc, tmp_path, capsys, "--resume", str(checkpoint.parent))
    assert out.returncode == 0, out.stderr
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt["global_step"] == 10240
    assert min(steps_of_the_last_writer(checkpoint.parent, "charts/episodic_return")) > killed_at  # went on, not over
    assert read_steps(checkpoint.parent, "losses/policy_loss") == list(range(512, 10241, 512))


def test_a_resumed_run_starts_from_the_checkpoint_exactly(tmp_path, capsys):
    # Resumed with nothing left to train, it saves what it restored: weights, the optimizer's moments,
    # the observation and return statistics and the step count come back bit for bit.
    out = run_main(pc, tmp_path, capsys, "--env-id", "Pendulum-v1", *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    before = torch.load(run / "model.pt", weights_only=True)
    out = run_main(pc, tmp_path, capsys, "--resume", str(run / "model.pt"))
    assert out.returncode == 0, out.stderr
    after = torch.load(run / "model.pt", weights_only=True)
    assert after["global_step"] == before["global_step"] == 1024
    for name, tensor in before["model"].items():
        assert torch.equal(tensor, after["model"][name])
    for i, state in before["optimizer"]["state"].items():
        assert all(torch.equal(state[k], after["optimizer"]["state"][i][k]) for k in ("exp_avg", "exp_avg_sq"))
    for stats in ("obs_rms", "return_rms"):
        assert torch.equal(before[stats]["var"], after[stats]["var"]) and before[stats]["count"] == after[stats]["count"]
    assert after["rng"]["acting"] == before["rng"]["acting"]


def test_resuming_with_a_flag_that_cannot_change_is_one_line(tmp_path, capsys):
    out = run_main(pc, tmp_path, capsys, "--env-id", "Pendulum-v1", *SMALL, "--save-model")
    (run,) = (tmp_path / "runs").iterdir()
    one_line_error(run_main(pc, tmp_path, capsys, "--resume", str(run), "--env-id", "Hopper-v5"),
                   "ppo_continuous.py", "--env-id cannot change when resuming", "Pendulum-v1", "Hopper-v5")
    steps = torch.load(run / "model.pt", weights_only=True)["global_step"]
    one_line_error(run_main(pc, tmp_path, capsys, "--resume", str(run), "--total-timesteps", str(steps - 1)),
                   "ppo_continuous.py", f"--total-timesteps {steps - 1} is less than the {steps} steps the run has taken")
    out = run_main(pc, tmp_path, capsys, "--resume", str(run), "--total-timesteps", str(steps + 511))  # < 1 batch more
    assert out.returncode == 0, out.stderr
    assert "ppo_continuous.py: the run has done all 2 iterations of its --total-timesteps 1535" in out.stdout
    out = run_main(pc, tmp_path, capsys, "--resume", str(run), "--total-timesteps", "2048")  # train longer: allowed
    assert out.returncode == 0, out.stderr
    assert torch.load(run / "model.pt", weights_only=True)["global_step"] == 2048


def test_a_second_ctrl_c_stops_at_once_and_saves_as_interrupted_not_crashed(tmp_path, capsys, monkeypatch):
    # The second Ctrl-C raises KeyboardInterrupt wherever it lands: here, at the first status line.
    def lands_here(self, step, recent_returns, force=False):
        if not force:
            raise KeyboardInterrupt
    monkeypatch.setattr(pc.StatusLine, "update", lands_here)
    out = run_main(pc, tmp_path, capsys, "--env-id", "Pendulum-v1", *SMALL, "--save-model")
    assert out.returncode == 130 and out.stderr.strip() == "ppo_continuous.py: interrupted"
    (run,) = (tmp_path / "runs").iterdir()
    assert f"model saved to runs/{run.name}/model.pt (a second Ctrl-C)" in out.stdout
    assert torch.load(run / "model.pt", weights_only=True)["global_step"] > 0


def test_the_status_line_shows_the_last_step_once(capsys):
    status = pc.StatusLine(total=100, every=0.0)
    status.update(50, [1.0])
    status.update(100, [1.0])
    status.update(100, [1.0], force=True)  # as training's end does, whether or not the last iteration showed it
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["50/100", "100/100"]
    held = pc.StatusLine(total=100, every=1e9)
    held.update(100, [1.0])  # too soon after the start: not shown
    held.update(100, [1.0], force=True)
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["100/100"]


def test_a_checkpoint_from_before_resume_evaluates_and_cannot_be_resumed(tmp_path, capsys):
    out = run_main(pc, tmp_path, capsys, "--env-id", "Pendulum-v1", *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    old = torch.load(run / "model.pt", weights_only=True)
    del old["rng"]  # as written before --resume existed
    torch.save(old, tmp_path / "old.pt")
    env = old["args"]["env_id"]
    out = run_main(pc, tmp_path, capsys, "--env-id", env, "--eval-checkpoint", str(tmp_path / "old.pt"),
                   "--eval-episodes", "2")
    assert out.returncode == 0, out.stderr
    one_line_error(run_main(pc, tmp_path, capsys, "--resume", str(tmp_path / "old.pt")), "ppo_continuous.py",
                   "written before --resume existed")


# ---------------------------------------------------------------------------------------------
# Many processes (torchrun): the ranks are one learner
# ---------------------------------------------------------------------------------------------

def test_two_ranks_learn_as_one_and_keep_identical_parameters(two_ranks):
    _, ((code0, rank0), (code1, rank1)), tmp_path, _ = two_ranks
    assert code0 == code1 == 0
    ranks = [rank0, rank1]
    for name in ranks[0]:  # every optimizer step was the same on both: bitwise the same weights
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    (run,) = (tmp_path / "runs").iterdir()  # rank 0 alone writes logs and checkpoints
    agent = pc.Agent(2, 1)
    agent.load_state_dict(torch.load(run / "model.pt", weights_only=True)["model"])
    assert all(torch.equal(p, ranks[0][name]) for name, p in agent.named_parameters())
    # --total-timesteps counts both ranks' steps, and every one-step episode of both reaches the log.
    assert len(read_steps(run, "charts/episodic_return")) == 4096
    assert not ranks_played_alike(run)  # each rank its own envs and draws (seeded from seed and rank)
    obs_rms = pc.RunningMeanStd.from_state(torch.load(run / "model.pt", weights_only=True)["obs_rms"])
    assert obs_rms.count == pytest.approx(4096, abs=1)  # both ranks' observations, merged
    # And they learned: the mean found both targets, from 2048 steps of each rank.
    mean = pc.NumpyPolicy(agent, obs_rms, 10.0).mean(np.eye(2, dtype=np.float32))[:, 0]
    np.testing.assert_allclose(mean, [-0.5, 0.5], atol=0.15)


def collectives_as_rank(rank):
    """What tests (b)-(d) need of a rank: one update of its half of a batch, its share of the
    statistics, and a KL stop; the halves differ, so only a correct merge makes the ranks agree."""
    join_gloo()
    ranks = pc.Ranks(rank, 2)
    agent, batch = bandit_batch(128)
    half = slice(64 * rank, 64 * (rank + 1))
    mine = pc.Batch(*(getattr(batch, f)[half] for f in ("obs", "actions", "logprobs", "values", "advantages", "returns",
                                                        "means", "log_stds")))
    out = {}
    # (b) 2 epochs of 1 minibatch (the union of the halves is the whole batch); plain SGD, unclipped,
    # so that the gradient's scale shows (Adam's step would not change if the ranks summed it).
    updated = update(agent, mine, torch.optim.SGD, num_minibatches=1, max_grad_norm=1e9, ranks=ranks)[0]
    out["update"] = parameters(updated)
    # The KL that adapts β: over both halves, and, for comparison, over this rank's half alone.
    out["kl_d"], out["kl_d_alone"] = (pc.mean_exact_kl(updated, mine, r) for r in (ranks, pc.Ranks()))
    # (c) each rank's data to the running statistics; the union's mean and std.
    data = np.arange(6.0).reshape(3, 2) * (rank + 1) + 10 * rank  # (3, 2) on rank 0, shifted and wider on 1
    rms = pc.RunningMeanStd((2,))
    rms.update(data, ranks)
    out["rms"] = (rms.mean, rms.var, rms.count)
    out["mean_std"] = pc.union_mean_std([torch.from_numpy(data[:, 0]).float()], ranks)[0]
    out["of_none_and_one"] = pc.union_mean_std([torch.zeros(0), torch.tensor([3.0] if rank == 0 else [])], ranks)
    # (d) rank 0's old log-probabilities 0.5 too high: its KL estimate is e^-0.5 - 1 + 0.5 = 0.107 from the
    # first minibatch, rank 1's is 0 there (θ = θ_old); their mean, 0.053, passes --target-kl 0.01.
    if rank == 0:
        mine = replace(mine, logprobs=mine.logprobs + 0.5)
    kl_agent, stats = update(agent, mine, lr=1e-4, target_kl=0.01, ranks=ranks)
    out["kl_steps"], out["kl_update"] = stats["minibatch_steps"], parameters(kl_agent)
    out["fail_together"] = fail_together_as_rank(pc, ranks)
    out["start_alike"] = start_alike_as_rank(pc, agent, ranks)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """2 ranks: the collectives of tests (b)-(d), then a short training run, in one spawn.
    Returns (each rank's collectives, each rank's (exit code, final parameters), the run's folder, each
    rank's exit code where runs/ could not be written)."""
    cwd = tmp_path_factory.mktemp("train")
    argv = ["--env-id", "ContinuousBandit-v0", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "4",
            "--learning-rate", "3e-3", "--total-timesteps", "4096", "--no-norm-reward", "--save-model"]
    ranks = run_ranks(collectives_then_training, 2, collectives_as_rank, (free_port(), free_port()),
                      "ppo_continuous", "Agent", str(cwd), argv, "test_ppo_continuous",
                      tmp_path=tmp_path_factory.mktemp("ranks"))
    return ([tested for tested, _, _ in ranks], [trained for *_, trained in ranks], cwd,
            [refused for _, refused, _ in ranks])


@pytest.fixture(scope="module")
def collectives(two_ranks):
    return two_ranks[0]


def test_an_update_by_two_ranks_on_half_a_batch_each_is_the_update_on_the_whole_batch(collectives):
    agent, batch = bandit_batch(128)
    alone = parameters(update(agent, batch, torch.optim.SGD, num_minibatches=1, max_grad_norm=1e9)[0])
    for rank in collectives:
        torch.testing.assert_close(rank["update"], alone, rtol=0, atol=1e-6)
    assert torch.equal(collectives[0]["update"], collectives[1]["update"])


def test_the_adaptive_penalty_s_kl_is_the_mean_over_every_rank_s_batch(collectives):
    agent, batch = bandit_batch(128)
    d = pc.mean_exact_kl(update(agent, batch, torch.optim.SGD, num_minibatches=1, max_grad_norm=1e9)[0], batch,
                         pc.Ranks())
    assert d > 0 and collectives[0]["kl_d_alone"] != collectives[1]["kl_d_alone"]  # the halves' KLs differ
    for rank in collectives:  # so every rank adapts β alike, from the whole batch's KL
        assert rank["kl_d"] == pytest.approx(d, rel=1e-6)


def test_merged_running_statistics_are_those_of_the_union(collectives):
    union = np.concatenate([np.arange(6.0).reshape(3, 2), np.arange(6.0).reshape(3, 2) * 2 + 10])
    # By hand, column 0: rank 0 has 0, 2, 4 and rank 1 has 10, 14, 18: mean 8, variance
    # (64 + 36 + 16 + 4 + 36 + 100) / 6 = 256 / 6; the prior (count 1e-4) barely moves them.
    for rank in collectives:
        mean, var, count = rank["rms"]
        np.testing.assert_allclose(mean, union.mean(0), rtol=1e-4)
        np.testing.assert_allclose(var, union.var(0), rtol=1e-4)
        assert mean[0] == pytest.approx(8.0, rel=1e-4) and var[0] == pytest.approx(256 / 6, rel=1e-4)
        assert count == pytest.approx(6, abs=1e-3)
        m, s = rank["mean_std"]  # the (n-1) std: sqrt(256 / 5)
        assert (m.item(), s.item()) == pytest.approx((8.0, math.sqrt(256 / 5)), rel=1e-6)
        # As torch's alone: no values, NaN and NaN (not a ZeroDivisionError); one value, itself and NaN.
        (m0, s0), (m1, s1) = rank["of_none_and_one"]
        assert math.isnan(m0.item()) and math.isnan(s0.item()) and m1.item() == 3.0 and math.isnan(s1.item())
    assert all(np.array_equal(a, b) for a, b in zip(collectives[0]["rms"][:2], collectives[1]["rms"][:2]))


def test_the_kl_stop_is_taken_by_all_ranks_together(collectives):
    # Alone, rank 1 would not stop (KL 0, then a step of lr 1e-4); together both stop after the first step.
    assert [rank["kl_steps"] for rank in collectives] == [1, 1]
    assert torch.equal(collectives[0]["kl_update"], collectives[1]["kl_update"])


def test_a_user_error_on_one_rank_is_every_rank_s(collectives):
    # On every rank, so each exits 2; rank 0 prints it, saying which rank found it when not rank 0.
    expected = ["a mistake only this rank finds", "rank 1: a mistake only this rank finds", None]
    assert [rank["fail_together"] for rank in collectives] == [expected, expected]


def test_ranks_start_from_rank_0_s_weights_and_refuse_different_steps_together(collectives):
    (rank_0_before, after0, error0), (_, after1, error1) = (rank["start_alike"] for rank in collectives)
    assert torch.equal(after0, rank_0_before) and torch.equal(after1, rank_0_before)
    assert error0 == error1 == ("the ranks start from different steps (1000 to 2000): "
                                "every rank must resume from the same checkpoint")


def test_a_mistake_only_rank_0_finds_ends_every_rank_with_exit_code_2(two_ranks):
    assert two_ranks[3] == [2, 2]  # runs/ unwritable: rank 1 no longer crashes in its next collective


def test_at_the_end_no_rank_leaves_before_rank_0_has_saved(tmp_path):
    # torchrun stops the whole job once one worker exits with an error code (here 143 would be one): a rank that
    # left first could stop rank 0 mid-checkpoint.
    argv = ["--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2",
            "--total-timesteps", "512", "--save-model", "--checkpoint-every", "1e9"]
    rank0, rank1 = run_ranks(slow_rank_0_save_as_rank, 2, "ppo_continuous", str(tmp_path), argv, tmp_path=tmp_path)
    assert rank1["left"] >= rank0["saved"]


def test_a_stop_request_to_one_rank_stops_every_rank_at_the_same_iteration(tmp_path):
    argv = ["--env-id", "Pendulum-v1", "--num-steps", "64", "--num-minibatches", "2", "--total-timesteps",
            "100000000", "--save-model"]
    ((code0, rank0), (code1, rank1)), ckpt = stop_one_rank("ppo_continuous", "Agent", argv, tmp_path)
    assert code0 == code1 == 143  # both took rank 1's SIGTERM as their own
    assert 0 < ckpt["global_step"] < 100_000_000 and ckpt["global_step"] % 128 == 0
    assert all(torch.equal(ckpt["model"][name], rank0[name]) and torch.equal(rank1[name], rank0[name]) for name in rank0)


def test_under_torchrun_a_user_error_is_one_line_not_one_per_rank(tmp_path):
    # Rank 0 starts 3 s late, as on a busy machine. torchrun stops every worker once one exits with an error,
    # so rank 1, silent, must not leave first: rank 0 would be stopped before it printed the job's one line.
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('RANK') == '0':\n    time.sleep(3)\n")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(free_port()), str(ROOT / "ppo_continuous.py"), "--env-id", "Pendulum-v1", "--num-envs", "0"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                             [str(tmp_path / "late")] + [p for p in [os.environ.get("PYTHONPATH")] if p])))
    assert out.returncode != 0
    assert out.stderr.count("ppo_continuous.py: error: --num-envs must be positive, got 0") == 1, out.stderr


def test_under_torchrun_a_user_error_is_one_line_not_one_per_rank_even_if_one_rank_alone_finds_it(tmp_path):
    make_runs_unwritable(tmp_path)  # rank 0 alone makes the run's folder
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(free_port()), str(ROOT / "ppo_continuous.py"), "--env-id", "Pendulum-v1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if "ppo_continuous.py: error:" in line]
    assert len(errors) == 1 and "cannot write runs/" in errors[0], out.stderr
    assert "[rank1]" not in out.stderr  # rank 1 exited 2 too, silent: no traceback from a collective with rank 0 gone
    assert "terminate called" not in out.stderr  # nor an abort at exit, gloo's threads still running


def rank_pid(launcher_pid, rank, timeout=60):
    """The pid of torchrun's worker `rank` (Linux: its children, by the RANK in their environment)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/environ", "rb") as f:
                    environ = f.read().split(b"\0")
            except (OSError, ValueError):
                continue
            if parent == launcher_pid and f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} under torchrun (pid {launcher_pid})")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers in /proc")
def test_torchrun_restarts_a_job_whose_rank_died_from_its_last_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "--max-restarts", "1", str(ROOT / "ppo_continuous.py"), "--env-id", "Pendulum-v1",
                             "--num-steps", "64", "--num-minibatches", "2", "--total-timesteps", "4096",
                             "--save-model", "--checkpoint-every", "0"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = rank_pid(proc.pid, 1)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob("runs/*/model.pt")):
        time.sleep(0.1)
    os.kill(victim, signal.SIGKILL)  # no time to save: the group dies and torchrun starts it again
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    (run,) = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]  # the restart resumed it: no second run
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["global_step"] == 4096
    steps = read_steps(run, "charts/SPS")
    assert steps == sorted(set(steps)) and steps[-1] == 4096  # one curve, no step twice, to the end


def test_more_ranks_than_gpus_is_one_line(tmp_path, capsys, monkeypatch):
    # torchrun --nproc-per-node 2 --cuda on a machine with one GPU: rank 1 would ask for GPU 1.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    one_line_error(run_main(pc, tmp_path, capsys, "--env-id", "Pendulum-v1", *SMALL, "--cuda"), "ppo_continuous.py",
                   "needs GPU 1 (LOCAL_RANK)", "has 1")
