"""Tests of ppo.py: the math against numbers worked out by hand, the rollout's episode
boundaries in both autoreset modes, and the script end to end (smoke, errors, seeds)."""

import copy
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

import ppo
from conftest import (ROOT, watch_saves, slow_rank_0_save_as_rank, run_twice, Counter, interrupt_script, fail_together_as_rank, start_alike_as_rank,
                      join_gloo, make_runs_unwritable, one_line_error, ranks_played_alike, read_steps, read_tags,
                      run_main, run_ranks, run_script, ScriptedAtari, ShortGames, stop_one_rank, collectives_then_training,
                      free_port, toy_env_module, wandb_records, WANDB_OFFLINE, TRACKING,
                      USER_ERROR_UNDER_TORCHRUN, user_error_as_rank, after_this_second, steps_of_the_last_writer)

GAMMA, LAM = 0.9, 0.5  # γλ = 0.45


def t(rows):
    """Hand-written (N, T) rows -> a (T, N) array, so each env reads as a line below."""
    return np.array(rows, dtype=np.float32).T


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------

def test_gae_same_step_rollout_with_termination_and_truncation():
    # Env 0 terminates at t=2 (the final state's value, 9.0, must not be used);
    # env 1 is truncated at t=1 and bootstraps from V(final obs) = 3.0.
    rewards = t([[1.0, 1.0, 1.0, 1.0, 1.0],
                 [0.5, 1.0, 0.0, 2.0, 1.0]])
    values = t([[0.5, 0.4, 0.3, 0.6, 0.7],
                [1.0, 2.0, 0.5, 0.2, 0.1]])
    next_values = t([[0.4, 0.3, 9.0, 0.7, 0.8],
                     [2.0, 3.0, 0.2, 0.1, 0.0]])
    terminations = t([[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]).astype(bool)
    truncations = t([[0, 0, 0, 0, 0], [0, 1, 0, 0, 0]]).astype(bool)
    adv, ret = ppo.gae(rewards, values, next_values, terminations, truncations, GAMMA, LAM)

    # Env 0: δ = r + 0.9 V' (1 - term) - V
    #   δ0 = 1 + 0.36 - 0.5 = 0.86, δ1 = 1 + 0.27 - 0.4 = 0.87, δ2 = 1 - 0.3 = 0.7 (terminal),
    #   δ3 = 1 + 0.63 - 0.6 = 1.03, δ4 = 1 + 0.72 - 0.7 = 1.02
    #   A4 = 1.02, A3 = 1.03 + 0.45·1.02 = 1.489, A2 = 0.7 (episode ends: no chaining),
    #   A1 = 0.87 + 0.45·0.7 = 1.185, A0 = 0.86 + 0.45·1.185 = 1.39325
    # Env 1: δ0 = 0.5 + 1.8 - 1 = 1.3, δ1 = 1 + 0.9·3 - 2 = 1.7 (truncated: bootstrapped),
    #   δ2 = 0 + 0.18 - 0.5 = -0.32, δ3 = 2 + 0.09 - 0.2 = 1.89, δ4 = 1 + 0 - 0.1 = 0.9
    #   A4 = 0.9, A3 = 1.89 + 0.405 = 2.295, A2 = -0.32 + 0.45·2.295 = 0.71275,
    #   A1 = 1.7 (episode ends), A0 = 1.3 + 0.45·1.7 = 2.065
    expected = t([[1.39325, 1.185, 0.7, 1.489, 1.02],
                  [2.065, 1.7, 0.71275, 2.295, 0.9]])
    np.testing.assert_allclose(adv, expected, rtol=1e-6)
    np.testing.assert_allclose(ret, expected + values, rtol=1e-6)


def test_gae_next_step_rollout_ignores_the_reset_step():
    # NEXT_STEP autoreset: env 0 terminates at t=1, so t=2 is its reset step (observation =
    # the final state, value 7.0; reward 0). Env 1 is truncated at t=2 and its reset step is
    # t=3. In this mode the state after step t is the observation at t+1, final or not.
    rewards = t([[1.0, 2.0, 0.0, 1.0, 1.0],
                 [1.0, 1.0, 1.0, 0.0, 2.0]])
    values = t([[0.5, 0.4, 7.0, 0.6, 0.7],
                [1.0, 1.0, 4.0, 0.5, 0.5]])
    next_values = t([[0.4, 7.0, 0.6, 0.7, 0.2],
                     [1.0, 4.0, 0.5, 0.5, 1.0]])
    terminations = t([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]]).astype(bool)
    truncations = t([[0, 0, 0, 0, 0], [0, 0, 1, 0, 0]]).astype(bool)
    adv, _ = ppo.gae(rewards, values, next_values, terminations, truncations, GAMMA, LAM)

    # Env 0: δ0 = 1 + 0.36 - 0.5 = 0.86, δ1 = 2 - 0.4 = 1.6 (terminal: 7.0 unused),
    #   δ3 = 1 + 0.63 - 0.6 = 1.03, δ4 = 1 + 0.18 - 0.7 = 0.48
    #   A4 = 0.48, A3 = 1.03 + 0.216 = 1.246, A1 = 1.6 (the reset step is not chained in),
    #   A0 = 0.86 + 0.45·1.6 = 1.58
    # Env 1: δ0 = 1 + 0.9 - 1 = 0.9, δ1 = 1 + 3.6 - 1 = 3.6, δ2 = 1 + 0.45 - 4 = -2.55
    #   (truncated: bootstraps from the final state's value 0.5),
    #   δ4 = 2 + 0.9 - 0.5 = 2.4; A4 = 2.4, A2 = -2.55, A1 = 3.6 - 1.1475 = 2.4525,
    #   A0 = 0.9 + 0.45·2.4525 = 2.003625
    for env, step, value in [(0, 0, 1.58), (0, 1, 1.6), (0, 3, 1.246), (0, 4, 0.48),
                             (1, 0, 2.003625), (1, 1, 2.4525), (1, 2, -2.55), (1, 4, 2.4)]:
        assert adv[step, env] == pytest.approx(value), (env, step)


def test_gae_with_lambda_one_and_no_boundary_is_the_discounted_return_minus_value():
    # λ = 1, γ = 0.5, rewards 1, 2, 4, bootstrap V' = 8 after the last step, V = 0:
    # R0 = 1 + 0.5·2 + 0.25·4 + 0.125·8 = 4, R1 = 2 + 2 + 2 = 6, R2 = 4 + 4 = 8
    rewards = np.array([[1.0], [2.0], [4.0]], np.float32)
    zeros = np.zeros((3, 1), np.float32)
    next_values = np.array([[0.0], [0.0], [8.0]], np.float32)
    no = np.zeros((3, 1), bool)
    adv, ret = ppo.gae(rewards, zeros, next_values, no, no, 0.5, 1.0)
    np.testing.assert_allclose(ret, [[4.0], [6.0], [8.0]])


# ---------------------------------------------------------------------------------------------
# The rollout: what a real Gymnasium vector env hands back at episode boundaries
# ---------------------------------------------------------------------------------------------

def counter_envs(mode):
    # Env 0 terminates after 3 steps; env 1 is cut by a time limit after 2.
    envs = gym.vector.SyncVectorEnv(
        [lambda: Counter(terminate_at=3), lambda: gym.wrappers.TimeLimit(Counter(), max_episode_steps=2)],
        autoreset_mode=mode)
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


def rows(x):
    """(T, N, ...) -> per-env lists, to compare with the hand-written tables."""
    return np.asarray(x).reshape(x.shape[0], x.shape[1]).T.tolist()


def test_rollout_same_step_keeps_final_observations():
    envs = counter_envs(AutoresetMode.SAME_STEP)
    rollout = ppo.Rollout.empty(4, 2, (1,))
    episodes = []
    obs, _ = envs.reset(seed=0)
    obs, after_done = ppo.collect_rollout(envs, lambda o: np.zeros(len(o), np.int64), rollout, obs,
                                          np.zeros(2, bool), lambda r, l: episodes.extend(zip(r, l)))
    # env 0: 0→1, 1→2, 2→3 (terminated; reset to 0 in the same step), 0→1
    # env 1: 0→1, 1→2 (truncated), 0→1, 1→2 (truncated)
    assert rows(rollout.obs) == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert rows(rollout.next_obs) == [[1, 2, 3, 1], [1, 2, 1, 2]]
    assert rows(rollout.rewards) == [[1, 2, 3, 1], [1, 2, 1, 2]]
    assert rows(rollout.terminations) == [[False, False, True, False], [False] * 4]
    assert rows(rollout.truncations) == [[False] * 4, [False, True, False, True]]
    assert rollout.valid.all()
    assert obs.ravel().tolist() == [1, 0] and after_done.tolist() == [False, True]
    # Episodes, in the order they end: env 1 (1+2, length 2), env 0 (1+2+3, 3), env 1 again.
    assert [(float(r), int(l)) for r, l in episodes] == [(3.0, 2), (6.0, 3), (3.0, 2)]


def test_rollout_next_step_marks_reset_steps_invalid():
    envs = counter_envs(AutoresetMode.NEXT_STEP)
    rollout = ppo.Rollout.empty(5, 2, (1,))
    obs, _ = envs.reset(seed=0)
    obs, after_done = ppo.collect_rollout(envs, lambda o: np.zeros(len(o), np.int64), rollout, obs,
                                          np.zeros(2, bool))
    # env 0: 0→1, 1→2, 2→3 (terminated; 3 is the final obs), 3→0 (reset step), 0→1
    # env 1: 0→1, 1→2 (truncated), 2→0 (reset step), 0→1, 1→2 (truncated)
    assert rows(rollout.obs) == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert rows(rollout.next_obs) == [[1, 2, 3, 0, 1], [1, 2, 0, 1, 2]]
    assert rows(rollout.rewards) == [[1, 2, 3, 0, 1], [1, 2, 0, 1, 2]]
    assert rows(rollout.valid) == [[True, True, True, False, True], [True, True, False, True, True]]
    assert rows(rollout.truncations) == [[False] * 5, [False, True, False, False, True]]
    # The next rollout starts on env 1's reset step.
    assert after_done.tolist() == [False, True]
    rollout2 = ppo.Rollout.empty(1, 2, (1,))
    ppo.collect_rollout(envs, lambda o: np.zeros(len(o), np.int64), rollout2, obs, after_done)
    assert rows(rollout2.valid) == [[True], [False]]


def test_native_cartpole_vector_env_is_next_step():
    envs = ppo.make_envs(ppo.Args(env_id="CartPole-v1"), 2)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    envs = ppo.make_envs(ppo.Args(env_id="Acrobot-v1"), 2)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP


# ---------------------------------------------------------------------------------------------
# Losses and statistics
# ---------------------------------------------------------------------------------------------

def test_clipped_surrogate_at_ratios_below_inside_and_above_the_clip_range():
    # ε = 0.2, so the clip range is [0.8, 1.2]. Per sample, min(r·A, clip(r)·A):
    #   A = +1: r = 0.5 → min(0.5, 0.8) = 0.5;  r = 1.0 → 1.0;  r = 1.5 → min(1.5, 1.2) = 1.2
    #   A = -1: r = 0.5 → min(-0.5, -0.8) = -0.8;  r = 1.0 → -1.0;  r = 1.5 → min(-1.5, -1.2) = -1.5
    # Sum = 0.5 + 1 + 1.2 - 0.8 - 1 - 1.5 = -0.6, mean = -0.1, loss = -mean = 0.1.
    ratio = torch.tensor([0.5, 1.0, 1.5, 0.5, 1.0, 1.5], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    loss = ppo.clipped_surrogate_loss(ratio, adv, 0.2)
    assert loss.item() == pytest.approx(0.1)
    loss.backward()
    # Zero gradient where the clipped term is the minimum (the seed's clipped-objective
    # figure): A>0 above 1+ε, A<0 below 1-ε. Elsewhere d(-mean rA)/dr = -A/6, including
    # A<0 far above 1+ε, the unbounded corrective case.
    s = 1 / 6
    torch.testing.assert_close(ratio.grad, torch.tensor([-s, -s, 0.0, 0.0, s, s]))


def test_value_loss_unclipped_and_clipped():
    new = torch.tensor([1.0, 2.0])
    old = torch.tensor([0.0, 2.5])
    returns = torch.tensor([0.5, 0.0])
    # Unclipped: ½·mean((1 - 0.5)², (2 - 0)²) = ½·(0.25 + 4)/2 = 1.0625
    assert ppo.value_loss(new, old, returns).item() == pytest.approx(1.0625)
    # Clipped (ε = 0.2): V_clip = old + clip(new - old, ±0.2) = (0.2, 2.3);
    # (0.2 - 0.5)² = 0.09 < 0.25, (2.3 - 0)² = 5.29 > 4 → ½·(0.25 + 5.29)/2 = 1.385
    assert ppo.value_loss(new, old, returns, clip_coef=0.2).item() == pytest.approx(1.385)


def test_approx_kl_estimators():
    # log r = ±log 2: E[-log r] = 0; E[(r - 1) - log r] = ((1 - ln 2) + (-0.5 + ln 2)) / 2 = 0.25
    old, new = ppo.approx_kl(torch.tensor([math.log(2.0), math.log(0.5)]))
    assert old.item() == pytest.approx(0.0, abs=1e-7)
    assert new.item() == pytest.approx(0.25)


def test_normalize_advantages_and_explained_variance():
    # mean 2, sample std 1 → (-1, 0, 1)
    a = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(ppo.normalize_advantages(a, a.mean(), a.std()), torch.tensor([-1.0, 0.0, 1.0]))
    targets = torch.tensor([1.0, 2.0, 3.0])
    assert ppo.explained_variance(targets, targets) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full((3,), 2.0), targets) == pytest.approx(0.0)
    # residuals (1, 1, 1) - var 0 → 1; a constant target has no variance to explain
    assert ppo.explained_variance(targets - 1, targets) == pytest.approx(1.0)
    assert math.isnan(ppo.explained_variance(targets, torch.ones(3)))


def test_categorical_entropy_and_log_probs():
    # Uniform over 2 actions: H = ln 2; over (0.25, 0.75): H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75]]))
    torch.testing.assert_close(ppo.categorical_entropy(logp), torch.tensor([math.log(2), 0.562335]))


def test_gumbel_max_samples_follow_the_torch_categorical():
    # softmax(ln 1, ln 3, ln 6) = (0.1, 0.3, 0.6), as torch's Categorical says: 40,000 samples put
    # each frequency within 0.01 of it (σ ≤ 0.0025).
    logits = np.log(np.tile([[1.0, 3.0, 6.0]], (40_000, 1))).astype(np.float32)
    probs = torch.distributions.Categorical(logits=torch.from_numpy(logits[0])).probs.numpy()
    np.testing.assert_allclose(probs, [0.1, 0.3, 0.6], rtol=1e-5)
    actions = ppo.sample_categorical(logits, np.random.default_rng(0))
    np.testing.assert_allclose(np.bincount(actions, minlength=3) / len(actions), probs, atol=0.01)


def test_gumbel_max_with_an_exponential_draw_of_zero_is_finite():
    class ZeroAt1:  # a generator whose exponential draw for action 1 is exactly 0 (-log 0 = inf)
        def standard_exponential(self, shape, dtype):
            e = np.ones(shape, dtype)
            e[..., 1] = 0.0
            return e
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "divide by zero encountered in log" fails the test
        actions = ppo.sample_categorical(np.zeros((3, 4), np.float32), ZeroAt1())
    np.testing.assert_array_equal(actions, [1, 1, 1])  # the largest noise still wins


def test_numpy_policy_matches_the_torch_actor():
    agent = ppo.Agent((4,), 3)
    obs = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    logits = ppo.NumpyPolicy(agent.actor, np.random.default_rng(0)).logits(obs)
    np.testing.assert_allclose(logits, agent.actor(torch.from_numpy(obs)).detach().numpy(), atol=1e-6)


def test_agent_log_prob_and_value_shapes():
    agent = ppo.Agent((4,), 2)
    obs, actions = torch.zeros(3, 4), torch.tensor([0, 1, 1])
    logprob, entropy, value, _ = agent.evaluate_actions(obs, actions)
    assert logprob.shape == entropy.shape == value.shape == (3,)
    # The actor's last layer starts tiny, so the first policy is near uniform.
    torch.testing.assert_close(logprob, torch.full((3,), math.log(0.5)), atol=1e-2, rtol=0)


def test_ppo_loss_signs():
    # L = -L^CLIP - c_e H + c_v L^V: with clip loss 1, entropy 2, value loss 3, c_e 0.1, c_v 0.5:
    # 1 - 0.2 + 1.5 = 2.3. Descending L raises the entropy and lowers the value loss.
    clip_loss, entropy, v_loss = (torch.tensor(x, requires_grad=True) for x in (1.0, 2.0, 3.0))
    loss = ppo.ppo_loss(clip_loss, entropy, v_loss, ent_coef=0.1, vf_coef=0.5)
    assert loss.item() == pytest.approx(2.3)
    loss.backward()
    assert (clip_loss.grad.item(), entropy.grad.item(), v_loss.grad.item()) == pytest.approx((1.0, -0.1, 0.5))


def test_value_loss_gradient_stops_once_clipped():
    # V_old = 0, R = 10, ε = 0.2. At V = 0.5 (past V_old + ε) the clipped term (0.2 - 10)² = 96.04 exceeds
    # (0.5 - 10)² = 90.25, so the loss is ½·96.04 = 48.02 and does not depend on V: gradient 0.
    # Unclipped: ½(V - R)², gradient V - R = -9.5.
    new = torch.tensor([0.5], requires_grad=True)
    loss = ppo.value_loss(new, torch.tensor([0.0]), torch.tensor([10.0]), clip_coef=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(48.02) and new.grad.item() == 0.0
    new.grad = None
    ppo.value_loss(new, torch.tensor([0.0]), torch.tensor([10.0])).backward()
    assert new.grad.item() == pytest.approx(-9.5)


# ---------------------------------------------------------------------------------------------
# The update: what each flag does to one ppo_update on a fixed batch
# ---------------------------------------------------------------------------------------------

def bandit_batch(n=256):
    """Bandit-v0 transitions with random actions, as π_θold (a fresh agent) and its critic see them."""
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 2, (n,), generator=g)
    actions = torch.randint(0, 2, (n,), generator=g)
    torch.manual_seed(0)
    agent = ppo.Agent((2,), 2)
    obs, rewards = torch.eye(2)[s], (actions == s).float()
    with torch.no_grad():
        logprobs, _, values, policies = agent.evaluate_actions(obs, actions)
    return agent, ppo.Batch(obs, actions, logprobs, values, advantages=rewards - values, returns=rewards,
                            valid=torch.arange(n), policies=policies)


def update(agent, batch, optimizer=torch.optim.Adam, lr=3e-3, ranks=ppo.Ranks(), kl_beta=0.0, **flags):
    """A copy of `agent` after one ppo_update (2 epochs x 4 minibatches unless told), and its stats."""
    agent = copy.deepcopy(agent)
    args = ppo.with_defaults(ppo.Args(**{"num_minibatches": 4, "update_epochs": 2, **flags}), frames=False)
    torch.manual_seed(1)  # the same shuffles every time
    stats = ppo.ppo_update(agent, optimizer(agent.parameters(), lr=lr), batch, args, ranks, kl_beta)
    return agent, stats


def parameters(agent):
    return torch.cat([p.detach().flatten() for p in agent.parameters()])


def test_reset_steps_leave_the_update_unchanged():
    agent, batch = bandit_batch()
    batch.valid = torch.arange(0, 256, 2)  # every other step a NEXT_STEP reset step
    poisoned = copy.deepcopy(batch)
    reset = torch.arange(1, 256, 2)
    poisoned.obs[reset] = torch.randn(128, 2) * 100
    poisoned.actions[reset] = 1 - poisoned.actions[reset]
    poisoned.advantages[reset] = 1000.0
    poisoned.returns[reset] = -1000.0
    poisoned.logprobs[reset] = -50.0
    clean, _ = update(agent, batch)
    learned_from_poison, _ = update(agent, poisoned)
    assert torch.equal(parameters(clean), parameters(learned_from_poison))


def test_the_entropy_bonus_raises_the_entropy():
    agent, batch = bandit_batch()
    with torch.no_grad():
        agent.actor[-1].bias.copy_(torch.tensor([2.0, -2.0]))  # a confident policy: H well below ln 2
    batch.advantages.zero_()  # no policy gradient but the entropy bonus's

    def entropy(a):
        return ppo.categorical_entropy(torch.log_softmax(a.actor(batch.obs), -1)).mean().item()
    without, _ = update(agent, batch, ent_coef=0.0)
    with_bonus, _ = update(agent, batch, ent_coef=0.5)
    assert entropy(without) == pytest.approx(entropy(agent), abs=1e-6)
    assert entropy(with_bonus) > entropy(agent) + 0.05


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
    (m1, s1), (m3, s3) = ppo.union_mean_std([one, three], ppo.Ranks())
    assert m1.item() == 3.0 and s1.isnan()  # the mean is the value: the adaptive β's mean KL of one step is its KL
    assert ppo.normalize_advantages(one, m1, s1).item() == pytest.approx(3.0)
    torch.testing.assert_close(ppo.normalize_advantages(three, m3, s3), torch.tensor([-1.0, 0.0, 1.0]))


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


# ---------------------------------------------------------------------------------------------
# Tests that can fail: tiny envs with a known answer, learned end to end
# ---------------------------------------------------------------------------------------------

BANDIT = ["--num-envs", "4", "--num-steps", "64", "--total-timesteps", "4096", "--save-model"]


@pytest.mark.parametrize("env_id", ["Bandit-v0", "NextStepBandit-v0"])  # SAME_STEP and NEXT_STEP
def test_learns_a_contextual_bandit(tmp_path, capsys, env_id):
    out = run_main(ppo, tmp_path, capsys, "--env-id", env_id, *BANDIT)
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    # π(a = s | s) → 1: the last 100 episodes score above 0.9 (uniform: 0.5; a sign-flipped learner: 0).
    # NextStepBandit's reset steps pay the wrong action: only a learner that leaves them out gets here.
    assert np.mean(read_tags(run)[0]["charts/episodic_return"][-100:]) > 0.9
    # The critic learned V(s) = 1, the return of that policy, in both states.
    agent = ppo.Agent((2,), 2)
    agent.load_state_dict(torch.load(run / "model.pt", weights_only=True)["model"])
    np.testing.assert_allclose(agent.get_value(torch.eye(2)).detach().numpy(), [1.0, 1.0], atol=0.2)


def logged(tmp_path, capsys, name, *argv):
    out = run_main(ppo, tmp_path / name, capsys, "--env-id", "Bandit-v0", "--num-envs", "4", "--num-steps", "64",
                   "--num-minibatches", "4", "--update-epochs", "2", "--learning-rate", "3e-3",
                   "--total-timesteps", "2048", *argv)
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / name / "runs").iterdir()
    return read_tags(run)[0]


# ---------------------------------------------------------------------------------------------
# The KL-penalised objective (L^KLPEN) and the unclipped one (L^CPI)
# ---------------------------------------------------------------------------------------------

def test_categorical_kl_by_hand_and_as_torch_has_it():
    # π_old = (½, ½), π = (¼, ¾): ½ log(½/¼) + ½ log(½/¾) = ½ log 2 + ½ log(2/3) = ½ log(4/3) = 0.143841.
    old, new = torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.25, 0.75]]).log()
    torch.testing.assert_close(ppo.categorical_kl(old, new), torch.tensor([0.143841]), rtol=0, atol=1e-6)
    assert ppo.categorical_kl(old, old).item() == 0.0
    g = torch.Generator().manual_seed(0)
    p, q = (torch.log_softmax(torch.randn(5, 4, generator=g), -1) for _ in range(2))
    expected = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=p),
                                                 torch.distributions.Categorical(logits=q))
    torch.testing.assert_close(ppo.categorical_kl(p, q), expected)


def test_unclipped_surrogate_and_kl_penalty_by_hand():
    # -mean(r Â) = -(0.5·1 + 2·(-1)) / 2 = 0.75; β·mean KL = 2·(0.1 + 0.3) / 2 = 0.4.
    assert ppo.surrogate_loss(torch.tensor([0.5, 2.0]), torch.tensor([1.0, -1.0])).item() == pytest.approx(0.75)
    assert ppo.kl_penalty(torch.tensor([0.1, 0.3]), 2.0).item() == pytest.approx(0.4)


@pytest.mark.parametrize("kl, beta", [(0.005, 0.5), (0.01 / 1.5, 1.0), (0.01, 1.0), (0.015, 1.0), (0.02, 2.0)])
def test_adaptive_beta_halves_below_the_band_and_doubles_above_it(kl, beta):
    # d_targ 0.01: the band is [0.01/1.5, 0.015], edges included; β = 1 before.
    assert ppo.adapt_kl_beta(1.0, kl, 0.01) == beta


def test_the_kl_penalty_holds_the_policy_near_the_old_one():
    agent, batch = bandit_batch()
    def kl_after(beta):
        updated, stats = update(agent, batch, clip_coef=ppo.NO_CLIPPING, kl_beta=beta)
        assert stats["kl_beta"] == beta
        return ppo.mean_exact_kl(updated, batch, ppo.Ranks())
    free, held = kl_after(0.0), kl_after(30.0)
    assert free > 3 * held > 0


def test_clip_coef_none_means_no_clipping_and_unset_the_kinds_epsilon():
    assert ppo.clipping_as_given(tyro.cli(ppo.Args, args=["--clip-coef", "None"]), ["--clip-coef", "None"]).clip_coef \
        == ppo.NO_CLIPPING
    assert ppo.clipping_as_given(ppo.Args(), []).clip_coef is None  # then DEFAULTS: 0.2 vectors, 0.1 frames
    assert ppo.clipping_as_given(ppo.Args(clip_coef=0.3), ["--clip-coef", "0.3"]).clip_coef == 0.3


@pytest.mark.parametrize("argv", [[], ["--clip-coef", "None"], ["--clip-coef", "None", "--kl-beta", "1"],
                                  ["--clip-coef", "None", "--kl-dtarg", "0.01"]])
def test_each_objective_trains_and_logs_its_beta(tmp_path, capsys, argv):
    tags = logged(tmp_path, capsys, "run", *argv)
    assert len(tags["losses/kl_beta"]) == 8 and all(math.isfinite(v) for v in tags["losses/policy_loss"])
    if "--clip-coef" in argv:
        assert set(tags["losses/clipfrac"]) == {0.0}
    if "--kl-dtarg" in argv:  # from 1, halved or doubled after every update outside the band
        beta = tags["losses/kl_beta"]
        assert beta[0] == 1.0 and len(set(beta)) > 1
        assert all(b / a in (0.5, 1.0, 2.0) for a, b in zip(beta, beta[1:]))
    else:
        assert set(tags["losses/kl_beta"]) == {1.0 if "--kl-beta" in argv else 0.0}


def test_adaptive_kl_learns_a_bandit(tmp_path, capsys):
    tags = logged(tmp_path, capsys, "adaptive", "--clip-coef", "None", "--kl-dtarg", "0.01", "--total-timesteps", "8192")
    assert np.mean(tags["charts/episodic_return"][-100:]) > 0.9  # a random policy earns 0.5


def test_a_run_without_clipping_resumes_from_its_own_command_line(tmp_path, capsys):
    # As torchrun's restarted ranks do: the same command line, --clip-coef None included, and --resume.
    argv = ["--env-id", "Bandit-v0", "--num-envs", "4", "--num-steps", "64", "--clip-coef", "None", "--kl-dtarg", "0.01",
            "--save-model"]
    assert run_main(ppo, tmp_path, capsys, *argv, "--total-timesteps", "512").returncode == 0
    (run,) = (tmp_path / "runs").iterdir()
    beta = torch.load(run / "model.pt", weights_only=True)["kl_beta"]
    out = run_main(ppo, tmp_path, capsys, *argv, "--total-timesteps", "768", "--resume", str(run))
    assert out.returncode == 0, out.stderr
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["args"]["clip_coef"] == ppo.NO_CLIPPING and ckpt["global_step"] == 768
    assert read_tags(run)[0]["losses/kl_beta"][-1] == beta  # the resumed run went on with the saved β


def test_target_kl_stops_the_epochs_early(tmp_path, capsys):
    # 2 epochs x 4 minibatches = 8 steps an iteration; the first minibatch's KL is 0 (θ = θ_old), the
    # second's is not, so a KL target of 1e-9 stops after 2.
    assert logged(tmp_path, capsys, "free")["losses/minibatch_steps"] == [8] * 8
    assert logged(tmp_path, capsys, "stopped", "--target-kl", "1e-9")["losses/minibatch_steps"] == [2] * 8


def test_anneal_lr_falls_linearly_to_zero(tmp_path, capsys):
    # 8 iterations: lr_k = (1 - k/8)·3e-3 for k = 0..7, so the last is 3e-3/8; without annealing, 3e-3 throughout.
    annealed = logged(tmp_path, capsys, "annealed")["charts/learning_rate"]
    np.testing.assert_allclose(annealed, [3e-3 * (1 - k / 8) for k in range(8)], rtol=1e-6)
    np.testing.assert_allclose(logged(tmp_path, capsys, "constant", "--no-anneal-lr")["charts/learning_rate"],
                               [3e-3] * 8, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------------

SMALL = ["--total-timesteps", "2048", "--num-envs", "4", "--num-steps", "128"]
TAGS = {"charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS",
        "losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl",
        "losses/old_approx_kl", "losses/clipfrac", "losses/explained_variance"}


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Acrobot-v1"])  # NEXT_STEP and SAME_STEP
def test_smoke_train_save_and_evaluate(tmp_path, capsys, env_id):
    out = run_main(ppo, tmp_path, capsys, "--env-id", env_id, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert f"ppo.py: logs in runs/{run.name}/\n" in out.stdout  # where to point TensorBoard
    assert run.name.startswith(f"{env_id}__ppo__1__")
    tags, texts = read_tags(run)
    assert TAGS <= set(tags)
    assert "|clip_coef|0.2|" in texts["hyperparameters/text_summary"]
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["script"] == "ppo.py" and ckpt["global_step"] == 2048
    assert ckpt["args"]["env_id"] == env_id

    # By the run's folder, with no --env-id: the checkpoint's env.
    # Training's batch flags are no evaluation's business: no "less than one batch", no "does not divide".
    out = run_main(ppo, tmp_path, capsys, "--eval-checkpoint", str(run), "--eval-episodes", "3",
                   "--total-timesteps", "10", "--num-minibatches", "7")
    assert out.returncode == 0, out.stderr
    assert f"eval: 3 episodes of {env_id}" in out.stdout
    evals = [d for d in (tmp_path / "runs").iterdir() if "-eval__" in d.name]
    tags, _ = read_tags(evals[0])
    assert len(tags["eval/episodic_return"]) == 3


@pytest.mark.parametrize("every", ["0", "600"])  # a save each iteration and the final one; the final one alone
def test_the_logs_are_on_disk_before_each_checkpoint(tmp_path, capsys, monkeypatch, every):
    # Killed just after a save (the final one included: torchrun stops rank 0 when a peer dies), the run resumes
    # from the checkpoint and purges what came after it: what came before must be on disk already.
    saves = watch_saves(ppo, monkeypatch)
    assert run_main(ppo, tmp_path, capsys, *SMALL, "--save-model", "--checkpoint-every", every).returncode == 0
    (run,) = (tmp_path / "runs").iterdir()
    logged = read_steps(run, "losses/policy_loss")
    assert len(saves) > 2 if every == "0" else len(saves) == 1
    for step, on_disk in saves:
        assert on_disk == [s for s in logged if s <= step]


def test_same_seed_same_returns_tracked_or_not(tmp_path, capsys):
    # Tracked by Weights & Biases (offline) in the fresh process where wandb is installed, untracked in this one.
    returns = run_twice(ppo, "ppo.py", tmp_path, capsys, *SMALL, "--seed", "7",
                        fresh=["--track"] if TRACKING else [], env=WANDB_OFFLINE)
    assert len(returns[0]) > 10
    assert returns[0] == returns[1]
    if TRACKING:  # the W&B run is the run (a resumed one goes on in it), with the scalars and the flags
        ((name, record),) = wandb_records(tmp_path / "0").items()
        (run,) = (tmp_path / "0" / "runs").iterdir()
        assert name.endswith(run.name)
        for tag in (b"wandb_project_name",  # a flag only the config holds
                    b"charts/episodic_return", b"losses/value_loss", b"learning_rate", b"CartPole-v1"):
            assert tag in record, tag


@pytest.mark.parametrize("argv, fragments", [
    (["--env-id", "NoSuchEnv-v0"], ["unknown env id", "NoSuchEnv-v0"]),
    (["--env-id", "Pendulum-v1"], ["Box", "ppo_continuous.py"]),
    (["--num-envs", "3", "--num-steps", "5", "--num-minibatches", "4"], ["does not divide", "15"]),
    (["--num-envs", "0"], ["--num-envs must be positive"]),
    (["--update-epochs", "-1"], ["--update-epochs must be positive"]),
    (["--total-timesteps", "10"], ["less than one batch"]),
    (["--eval-checkpoint", "no/such/model.pt"], ["no checkpoint at no/such/model.pt"]),
    (["--seed", "-1"], ["--seed must lie in [0, 2^32)", "-1"]),
    (["--seed", "99999999999"], ["--seed must lie in [0, 2^32)"]),
    (["--seed", "99999999999", "--eval-checkpoint", "model.pt"], ["--seed must lie in [0, 2^32)"]),
    (["--learning-rate", "nan"], ["--learning-rate must be a finite number, got nan"]),
    (["--target-kl", "nan"], ["--target-kl must be a finite number"]),
    (["--atari-noop-max", "-1"], ["--atari-noop-max must be 0 or more"]),
    (["--atari-sticky-actions", "2"], ["--atari-sticky-actions must lie in [0, 1]"]),
    (["--atari-frame-skip", "0"], ["--atari-frame-skip must be positive"]),
    (["--env-id", "ALE/Breakout-v5", "--seed", str(2**31 - 5)], ["--seed must be less than 2^31 - 10"]),
    (["--env-id", "CarRacing-v3"], ["Box", "ppo_continuous.py"]),
    (["--checkpoint-every", "-1"], ["--checkpoint-every must be 0 or more seconds"]),
    (["--target-kl", "0"], ["--target-kl must be positive, got 0.0"]),  # None turns the early stop off
    (["--resume", ""], ["--resume was given an empty path"]),  # "$RUN" unset: not a new run
    (["--eval-checkpoint", ""], ["--eval-checkpoint was given an empty path"]),
    (["--kl-beta", "-1"], ["--kl-beta must be 0 or more"]),
    (["--kl-dtarg", "0"], ["--kl-dtarg positive"]),
    (["--clip-coef", "None", "--clip-vloss"], ["--clip-vloss clips by --clip-coef"]),
    # A flag for frames or Atari, given where it would do nothing (ImageBandit-v0: frames, but no Atari game).
    (["--atari-frame-skip", "2"], ["--atari-frame-skip 2: for Atari ids only, and CartPole-v1 is not one"]),
    (["--env-id", "ImageBandit-v0", "--no-atari-fire-reset", "--atari-sticky-actions", "0"],
     ["--no-atari-fire-reset, --atari-sticky-actions 0.0: for Atari ids only, and ImageBandit-v0 is not one"]),
    (["--cnn-precision", "float32"], ["--cnn-precision float32: for frames only", "CartPole-v1 does not give them"]),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, fragments):
    one_line_error(run_main(ppo, tmp_path, capsys, *argv), "ppo.py", *fragments)


def test_an_unwritable_working_directory_is_one_line(tmp_path, capsys):
    out = run_main(ppo, tmp_path / "train", capsys, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "train" / "runs").iterdir()
    make_runs_unwritable(tmp_path / "ro")
    # Training fails before it starts, not after it has trained.
    one_line_error(run_main(ppo, tmp_path / "ro", capsys, *SMALL), "ppo.py", "cannot write runs/CartPole-v1__ppo__1__")
    # An evaluation prints its result, then says that it could not log it.
    out = run_main(ppo, tmp_path / "ro", capsys, "--eval-checkpoint", str(run / "model.pt"), "--eval-episodes", "2")
    assert "eval: 2 episodes of CartPole-v1: return" in out.stdout
    one_line_error(out, "ppo.py", "cannot write runs/CartPole-v1__ppo-eval__1__")


def test_a_user_error_from_the_command_line_has_no_traceback(tmp_path):
    one_line_error(run_script("ppo.py", tmp_path, "--env-id", "Pendulum-v1"), "ppo.py", "ppo_continuous.py")


@pytest.mark.parametrize("rank, launcher, says, waits", USER_ERROR_UNDER_TORCHRUN)
def test_under_torchrun_only_rank_0_says_a_user_error_and_the_others_wait_to_be_stopped(
        tmp_path, capsys, monkeypatch, rank, launcher, says, waits):
    user_error_as_rank(ppo, tmp_path, capsys, monkeypatch, rank, launcher, says, waits)


def test_checkpoint_errors(tmp_path, capsys):
    foreign = tmp_path / "a2c.pt"
    torch.save({"script": "a2c.py", "model": {}, "args": {"env_id": "NoSuchEnv-v0"}}, foreign)
    one_line_error(run_main(ppo, tmp_path, capsys, "--eval-checkpoint", str(foreign)), "ppo.py", "written by a2c.py")
    garbage = tmp_path / "notes.pt"
    garbage.write_text("not a checkpoint")
    one_line_error(run_main(ppo, tmp_path, capsys, "--eval-checkpoint", str(garbage)), "ppo.py", "not a checkpoint")

    out = run_main(ppo, tmp_path, capsys, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    one_line_error(run_main(ppo, tmp_path, capsys, "--env-id", "Acrobot-v1", "--eval-checkpoint",
                            str(run / "model.pt")), "ppo.py", "trained on CartPole-v1", "--env-id CartPole-v1")
    one_line_error(run_main(ppo, tmp_path, capsys, "--eval-checkpoint", str(run), "--atari-noop-max", "3"), "ppo.py",
                   "--atari-noop-max 3: for Atari ids only, and CartPole-v1 is not one")  # evaluating too
    # --env-id given, even as its default, wins over the checkpoint's env (relabelled here as Acrobot-v1's).
    ckpt = torch.load(run / "model.pt", weights_only=True)
    relabelled = tmp_path / "relabelled.pt"
    torch.save({**ckpt, "args": {**ckpt["args"], "env_id": "Acrobot-v1"}}, relabelled)
    out = run_main(ppo, tmp_path, capsys, "--env-id", "CartPole-v1", "--eval-checkpoint", str(relabelled),
                   "--eval-episodes", "1")
    assert out.returncode == 0 and "eval: 1 episode of CartPole-v1" in out.stdout, out.stderr


def test_capture_video_without_moviepy(tmp_path, capsys):
    try:
        import moviepy  # noqa: F401
        pytest.skip("moviepy is installed")
    except ImportError:
        pass
    one_line_error(run_main(ppo, tmp_path, capsys, *SMALL, "--capture-video"), "ppo.py", "moviepy")


def test_cuda_without_a_gpu_warns_and_runs_on_the_cpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = run_main(ppo, tmp_path, capsys, *SMALL, "--cuda")
    assert out.returncode == 0
    assert out.stderr.count("warning") == 1 and "running on the CPU" in out.stderr


def test_first_ctrl_c_is_a_request_and_the_second_interrupts(python_sigint):
    before = signal.getsignal(signal.SIGINT)
    stop = ppo.StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: training goes on to a safe point
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):  # the second: at once
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_is_a_request_too():
    def previous(signum, frame):  # stands in for the default handler, which would end the test run
        pass
    before = signal.signal(signal.SIGTERM, previous)
    try:
        stop = ppo.StopRequest()
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


def test_an_ignored_ctrl_c_stays_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job of a shell script
    try:
        stop = ppo.StopRequest()
        os.kill(os.getpid(), signal.SIGINT)
        assert not stop.requested and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        stop.restore()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_ctrl_c_and_sigterm_save_model_and_logs(tmp_path, capsys):
    stopped = interrupt_script(ppo, "ppo.py", tmp_path, capsys, "--total-timesteps", "10000000", "--save-model")
    for signum, out, folder in stopped:
        assert out.returncode == 128 + signum, out.stderr  # 130 after Ctrl-C, 143 after SIGTERM
        assert "Traceback" not in out.stderr
        assert f"stopped by {'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'} at step" in out.stdout
        (run,) = (folder / "runs").iterdir()
        assert 0 < torch.load(run / "model.pt", weights_only=True)["global_step"] < 10_000_000  # stopped early
        assert read_tags(run)[0]["charts/SPS"]


def test_a_crash_saves_what_was_learned(tmp_path, capsys, monkeypatch):
    def crash(*a, **k):
        raise OSError("the env's simulator died")
    real_update = ppo.ppo_update
    calls = []

    def update_then_crash(*a, **k):  # the second iteration's rollout crashes, after one update
        calls.append(1)
        stats = real_update(*a, **k)
        monkeypatch.setattr(ppo, "collect_rollout", crash)
        return stats
    monkeypatch.setattr(ppo, "ppo_update", update_then_crash)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError):
        ppo.main(["--total-timesteps", "4096", "--num-envs", "4", "--num-steps", "128", "--save-model"])
    (run,) = (tmp_path / "runs").iterdir()
    assert torch.load(run / "model.pt", weights_only=True)["global_step"] == 512 and calls == [1]
    assert "(crashed)" in capsys.readouterr().out


def test_non_finite_loss_stops_and_saves(tmp_path, capsys):
    # An absurd learning rate blows the weights up until the loss is NaN.
    out = run_main(ppo, tmp_path, capsys, *SMALL, "--total-timesteps", "20480", "--learning-rate", "1e30",
                     "--save-model")
    assert out.returncode == 1, out.stderr
    assert "NaN or infinite at step" in out.stderr and "Traceback" not in out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    model = torch.load(run / "model.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in model.values())


def test_capture_video_without_a_renderer(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pygame", None)  # as if pygame (which renders CartPole) were not installed
    real_find_spec = ppo.importlib.util.find_spec
    monkeypatch.setattr(ppo.importlib.util, "find_spec",  # as if moviepy were installed
                        lambda name, *a: object() if name == "moviepy" else real_find_spec(name, *a))
    one_line_error(run_main(ppo, tmp_path, capsys, *SMALL, "--capture-video"), "ppo.py",
                   "--capture-video cannot render CartPole-v1", "pygame")


def test_incomplete_or_misshapen_checkpoints_are_one_line(tmp_path, capsys):
    incomplete = tmp_path / "incomplete.pt"
    torch.save({"script": "ppo.py"}, incomplete)
    one_line_error(run_main(ppo, tmp_path, capsys, "--eval-checkpoint", str(incomplete)), "ppo.py",
                   "incomplete ppo.py checkpoint", "model")
    out = run_main(ppo, tmp_path, capsys, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run / "model.pt", weights_only=True)
    ckpt["model"] = {"some.layer": torch.zeros(3)}
    torch.save(ckpt, tmp_path / "misshapen.pt")
    one_line_error(run_main(ppo, tmp_path, capsys, "--eval-checkpoint", str(tmp_path / "misshapen.pt")),
                   "ppo.py", "weights do not fit")


# ---------------------------------------------------------------------------------------------
# Frames: the CNN, the Atari learner's view, the logged score
# ---------------------------------------------------------------------------------------------

def test_nature_cnn_shapes():
    agent = ppo.Agent((4, 84, 84), 6)
    frames = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    assert agent.trunk[:-2](frames).shape == (5, 3136)  # 64 maps of 7x7 before the 512-unit layer
    assert agent.trunk(frames).shape == (5, 512)
    logp, entropy, value, _ = agent.evaluate_actions(frames, torch.zeros(5, dtype=torch.int64))
    assert logp.shape == entropy.shape == value.shape == (5,)
    assert agent.logits(frames).shape == (5, 6)
    # One body, two heads: the trunk's parameters are shared, each head is one linear layer.
    assert isinstance(agent.actor, torch.nn.Linear) and isinstance(agent.critic, torch.nn.Linear)
    # Pixels are scaled inside the network: 255 is 1.0, so a frame of 255s and the float 1.0s agree.
    assert torch.equal(agent.trunk[0](torch.full((1, 1), 255, dtype=torch.uint8)), torch.ones(1, 1))
    # Vectors keep their two separate MLPs and no trunk.
    assert isinstance(ppo.Agent((4,), 2).trunk, torch.nn.Identity)


def test_frames_pick_their_defaults_and_a_given_flag_wins():
    frames = ppo.with_defaults(ppo.Args(), frames=True)
    vectors = ppo.with_defaults(ppo.Args(), frames=False)
    assert (frames.learning_rate, frames.num_steps, frames.num_minibatches, frames.clip_coef) == (2.5e-4, 128, 4, 0.1)
    assert (vectors.learning_rate, vectors.num_steps, vectors.num_minibatches, vectors.clip_coef) == (1e-3, 256, 32, 0.2)
    assert ppo.with_defaults(ppo.Args(learning_rate=0.5), frames=True).learning_rate == 0.5
    assert (vectors.total_timesteps, frames.total_timesteps) == (1_000_000, 10_000_000)
    assert ppo.with_defaults(ppo.Args(total_timesteps=2048), frames=True).total_timesteps == 2048


def test_learner_signal_clips_rewards_and_ends_episodes_at_lost_lives():
    rewards, terminations, lives = np.array([4.0, -2.0, 0.0, 1.0]), np.array([False, False, False, True]), \
        np.array([3, 2, 5, 0])
    previous = np.array([3, 3, 0, 1])  # env 1 lost a life; env 2 starts a new game (0 -> 5 lives)
    r, term, new_lives = ppo.learner_signal(rewards, terminations, lives, previous, True, True)
    np.testing.assert_array_equal(r, [1.0, -1.0, 0.0, 1.0])
    np.testing.assert_array_equal(term, [False, True, False, True])
    np.testing.assert_array_equal(new_lives, lives)
    r, term, _ = ppo.learner_signal(rewards, terminations, lives, previous, False, False)
    np.testing.assert_array_equal(r, rewards)
    np.testing.assert_array_equal(term, terminations)


def scripted_rollout(episodic_life, clip_reward):
    envs = ppo.AtariLearnerView(gym.wrappers.vector.RecordEpisodeStatistics(ScriptedAtari()), episodic_life,
                                clip_reward)
    rollout = ppo.Rollout.empty(9, 1, (1, 36, 36), np.uint8)
    episodes = []
    obs, _ = envs.reset(seed=0)
    ppo.collect_rollout(envs, lambda o: np.zeros(len(o), np.int64), rollout, obs, np.zeros(1, bool),
                        lambda r, l: episodes.extend(zip(r, l)))
    return rollout, episodes


def test_the_logged_return_is_the_whole_game_and_the_learner_sees_lives_and_signs():
    # ScriptedAtari: rewards 0, 4, 0, 1, 0, -1, 7 with lives 3, 3, 2, 2, 1, 1, 0 after each step; game
    # over at step 7; step 8 is the reset step (reward 0); step 9 pays 2 in the new game.
    rollout, episodes = scripted_rollout(episodic_life=True, clip_reward=True)
    # The score of the game, all lives, unclipped: 0 + 4 + 0 + 1 + 0 - 1 + 7 = 11, in 7 steps.
    assert episodes == [(11.0, 7)]
    # The learner: each reward's sign, an episode's end at each lost life (steps 3, 5, 7).
    np.testing.assert_array_equal(rollout.rewards[:, 0], [0, 1, 0, 1, 0, -1, 1, 0, 1])
    np.testing.assert_array_equal(rollout.terminations[:, 0], [0, 0, 1, 0, 1, 0, 1, 0, 0])
    # Only the step after the game's end resets the env; steps after a lost life are transitions.
    np.testing.assert_array_equal(rollout.valid[:, 0], [1, 1, 1, 1, 1, 1, 1, 0, 1])

    rollout, episodes = scripted_rollout(episodic_life=False, clip_reward=False)
    assert episodes == [(11.0, 7)]
    np.testing.assert_array_equal(rollout.rewards[:, 0], ScriptedAtari.REWARDS)
    np.testing.assert_array_equal(rollout.terminations[:, 0], [0, 0, 0, 0, 0, 0, 1, 0, 0])


@pytest.mark.skipif(ppo.ale_py is None, reason="needs ale-py")
def test_a_training_run_logs_the_game_score(tmp_path, capsys, monkeypatch):
    # The Atari path of make_envs, with ScriptedAtari in place of ale-py's env: what it is built
    # with (its own clipping and life-loss options) decides what reaches charts/episodic_return.
    monkeypatch.setattr(ppo.ale_py.vector_env, "AtariVectorEnv", ScriptedAtari)
    film = ["--capture-video"] if importlib.util.find_spec("moviepy") else []  # and env 0's game on film
    out = run_main(ppo, tmp_path, capsys, "--env-id", "ALE/Breakout-v5", "--num-envs", "1", "--num-steps", "9",
                   "--num-minibatches", "1", "--total-timesteps", "9", *film)
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    tags = read_tags(run)[0]
    assert tags["charts/episodic_return"] == [11.0] and tags["charts/episodic_length"] == [7]
    assert len(list(tmp_path.glob("videos/ALE-Breakout-v5__ppo__1__*/rl-video-episode-0.mp4"))) == len(film)
    if film:  # the line says where they are
        assert f"ppo.py: logs in runs/{run.name}/, videos in videos/{run.name}/\n" in out.stdout


def logged_run(tmp_path, capsys, *argv):
    out = run_main(ppo, tmp_path, capsys, *argv)
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    return read_tags(run)[0]


def test_cnn_precision(monkeypatch):
    cpu = torch.device("cpu")
    for native in (False, True):  # auto: bfloat16 only where the CPU has it
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        assert ppo.use_bf16("auto", True, cpu) == native
    assert not ppo.use_bf16("bfloat16", False, cpu)  # vectors: never
    assert ppo.use_bf16("bfloat16", True, cpu) and not ppo.use_bf16("float32", True, cpu)


@pytest.mark.skipif(ppo.ale_py is None, reason="needs ale-py")
def test_the_logged_flags_are_the_ones_used(monkeypatch):
    # What a flag leaves to the env or the machine is logged as what the run used, not as unset or "auto".
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    used = ppo.as_used(ppo.Args(env_id="ALE/Breakout-v5"), True, cpu)
    assert used["atari_sticky_actions"] == 0.25 and used["cnn_precision"] == "bfloat16"  # v5's; this CPU's
    used = ppo.as_used(ppo.Args(env_id="BreakoutNoFrameskip-v4"), True, cpu)
    assert used["atari_sticky_actions"] == 0.0
    given = ppo.Args(env_id="ALE/Breakout-v5", atari_sticky_actions=0.1, cnn_precision="float32")
    used = ppo.as_used(given, True, cpu)
    assert used["atari_sticky_actions"] == 0.1 and used["cnn_precision"] == "float32"
    assert ppo.as_used(ppo.Args(), False, cpu) == asdict(ppo.Args())  # vectors: every flag as given


def test_weights_and_biases_gets_the_flags_as_used(tmp_path, capsys, monkeypatch):
    # W&B's config is the logged table: what --cnn-precision auto became on this machine, not "auto".
    configs = []
    monkeypatch.setattr(ppo, "start_tracking", lambda args, run_dir, config: configs.append(config))
    out = run_main(ppo, tmp_path, capsys, "--env-id", "ImageBandit-v0", "--num-envs", "4", "--num-steps", "32",
                   "--total-timesteps", "128", "--track")
    assert out.returncode == 0, out.stderr
    (config,) = configs
    assert config["cnn_precision"] in ("bfloat16", "float32")


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_learns_a_bandit_from_frames(tmp_path, capsys, precision):
    # The frame defaults (lr 2.5e-4, clip 0.1) but a small batch, so it learns in seconds.
    tags = logged_run(tmp_path, capsys, "--env-id", "ImageBandit-v0", "--num-envs", "4", "--num-steps", "32",
                      "--total-timesteps", "3072", "--save-model", "--cnn-precision", precision)
    # π(a = s | s) → 1 from pixels alone: the last 100 episodes score above 0.9 (uniform: 0.5).
    assert np.mean(tags["charts/episodic_return"][-100:]) > 0.9
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["obs_shape"] == [1, 36, 36] and ckpt["args"]["learning_rate"] == 2.5e-4


@pytest.mark.skipif(ppo.ale_py is None, reason="needs ale-py")
def test_atari_ids_make_the_preprocessed_vector_env():
    envs = ppo.make_envs(ppo.Args(env_id="ALE/Breakout-v5"), 2)
    assert envs.single_observation_space.shape == (4, 84, 84) and envs.single_observation_space.dtype == np.uint8
    assert envs.single_action_space == gym.spaces.Discrete(4)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    envs.close()


@pytest.mark.skipif(ppo.ale_py is None, reason="needs ale-py")
def test_atari_smoke_train_save_evaluate_and_resume(tmp_path, capsys):
    # Pong, because every game ends (an untrained agent loses 21-0 in about 800 steps).
    tags = logged_run(tmp_path, capsys, "--env-id", "PongNoFrameskip-v4", "--num-envs", "2", "--num-steps", "64",
                      "--total-timesteps", "256", "--save-model")
    assert {"losses/policy_loss", "charts/SPS"} <= set(tags)
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("PongNoFrameskip-v4__ppo__1__")
    logged = read_tags(run)[1]["hyperparameters/text_summary"]  # the flags as used: the id's sticky actions
    assert "|atari_sticky_actions|0.0|" in logged and "|cnn_precision|auto|" not in logged
    film = ["--capture-video"] if importlib.util.find_spec("moviepy") else []  # the game on film, as the agent saw it
    out = run_main(ppo, tmp_path, capsys, "--env-id", "PongNoFrameskip-v4", "--eval-checkpoint",
                   str(run / "model.pt"), "--eval-episodes", "1", *film)
    assert out.returncode == 0, out.stderr
    score = float(out.stdout.split("eval: 1 episode of PongNoFrameskip-v4: return ")[1].split()[0])
    assert -21 <= score <= -15  # an untrained agent loses nearly every point
    if film:
        (video,) = (tmp_path / "videos").glob("PongNoFrameskip-v4__ppo-eval__1__*/eval-0.mp4")
        assert video.stat().st_size > 10_000
    out = run_main(ppo, tmp_path, capsys, "--resume", str(run), "--total-timesteps", "512")  # and it goes on
    assert out.returncode == 0, out.stderr
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["global_step"] == 512
    assert float(ckpt["optimizer"]["state"][0]["step"]) == 64  # every update's, the first run's too
    assert read_steps(run, "charts/SPS") == [128, 256, 384, 512]  # each step logged once
    assert steps_of_the_last_writer(run, "charts/SPS") == [384, 512]  # the resumed run's own: it went on, not over
    # Evaluated, a model plays the game as trained: an --atari-* flag that differs is one line, not ignored.
    one_line_error(run_main(ppo, tmp_path, capsys, "--eval-checkpoint", str(run), "--atari-frame-skip", "2",
                            "--atari-noop-max", "10"), "ppo.py", "--atari-noop-max 10, --atari-frame-skip 2: the model "
                   "was trained with --atari-noop-max 30, --atari-frame-skip 4")


def test_training_films_games_on_record_video_s_schedule():
    assert [n for n in range(3001) if ppo.filmed_game(n)] == [0, 1, 8, 27, 64, 125, 216, 343, 512, 729, 1000, 2000, 3000]


@pytest.mark.skipif(importlib.util.find_spec("moviepy") is None, reason="needs moviepy (pip install moviepy)")
def test_training_on_atari_films_env_0_s_scheduled_games(tmp_path):
    from imageio_ffmpeg import count_frames_and_secs  # moviepy's own reader can miss a last frame
    from moviepy import VideoFileClip
    envs = ppo.RecordGames(ShortGames(), str(tmp_path), every_env=False, fps=15)
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
    out = run_main(ppo, tmp_path, capsys, "--total-timesteps", "1024", "--num-envs", "4", "--num-steps", "128",
                   "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    out = run_script("ppo.py", tmp_path, "--eval-checkpoint", str(run / "model.pt"), "--eval-episodes", "2",
                     "--capture-video", "--track", env=WANDB_OFFLINE)
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stderr.splitlines() if not line.startswith("wandb:")] == []  # no SDL noise, no warning
    videos = sorted(p.name for p in (tmp_path / "videos").glob("CartPole-v1__ppo-eval__1__*/*.mp4"))
    assert videos == ["eval-0-episode-0.mp4", "eval-1-episode-0.mp4"]  # each evaluated episode, once
    unfilmed = run_main(ppo, tmp_path, capsys, "--eval-checkpoint", str(run / "model.pt"), "--eval-episodes", "2")
    assert unfilmed.stdout.splitlines()[0] == out.stdout.splitlines()[0]  # filmed or not, the same episodes
    ((_, evaluated),) = wandb_records(tmp_path).items()  # the training run was not tracked
    assert b"eval/episodic_return" in evaluated and b"eval-1-episode-0" in evaluated  # and the videos
    assert len(list((tmp_path / "wandb").glob("offline-run-*eval*/files/media/videos/**/*.mp4"))) == 2


class Unrenderable(gym.Env):
    """An env registered by its class (as a user's often is) whose rendering fails."""
    observation_space, action_space = gym.spaces.Box(0.0, 1.0, (2,), np.float32), gym.spaces.Discrete(2)
    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(self, render_mode=None):
        self.render_mode = render_mode

    def reset(self, seed=None, options=None):
        return np.zeros(2, np.float32), {}

    def render(self):
        raise RuntimeError("no screen here\nand a second line")


gym.register("PpoUnrenderable-v0", entry_point=Unrenderable)


def test_an_env_that_cannot_render_is_one_line(tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(ppo.importlib.util, "find_spec",  # as if moviepy were installed
                        lambda name, *a: object() if name == "moviepy" else real_find_spec(name, *a))
    one_line_error(run_main(ppo, tmp_path, capsys, "--env-id", "PpoUnrenderable-v0", *SMALL, "--capture-video"),
                   "ppo.py", "--capture-video cannot render PpoUnrenderable-v0: no screen here")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="needs wandb (pip install wandb)")
def test_track_without_a_wandb_login_is_one_line(tmp_path, capsys, monkeypatch):
    import wandb

    def no_login(**kwargs):  # what wandb.init raises with no API key and no terminal to ask for one
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")
    monkeypatch.setattr(wandb.tensorboard, "patch", lambda **kwargs: None)  # no SummaryWriter patched in this process
    monkeypatch.setattr(wandb, "init", no_login)
    one_line_error(run_main(ppo, tmp_path, capsys, *SMALL, "--track"), "ppo.py",
                   "--track: Weights & Biases could not start a run (No API key configured.", "WANDB_MODE=offline")


def test_track_without_wandb(tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(ppo.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    one_line_error(run_main(ppo, tmp_path, capsys, *SMALL, "--track"), "ppo.py", "--track", "pip install wandb")


def test_an_env_from_the_users_own_module(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    env_id = toy_env_module(tmp_path, "toy_ppo")  # imported by the script, not here
    tags = logged_run(tmp_path, capsys, "--env-id", env_id, "--total-timesteps", "4096", "--num-envs", "4",
                      "--num-steps", "128")
    assert np.mean(tags["charts/episodic_return"][-100:]) > 0.9  # it learned to take the action that pays
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("toy_ppo-ToyPpo-v0__ppo__1__")
    one_line_error(run_main(ppo, tmp_path, capsys, "--env-id", "no_such_module:Pays-v0"), "ppo.py",
                   "cannot import 'no_such_module' for --env-id no_such_module:Pays-v0")


def test_next_state_values_run_the_critic_only_where_the_next_step_does_not_start_from_that_state():
    class Critic:  # V(s) = 10 s, and a record of the states it was asked about
        asked = []

        def get_value(self, x):
            self.asked += x.flatten().tolist()
            return 10.0 * x.float().flatten()

    # Env 0 runs on (NEXT_STEP-like: each step starts where the last ended); env 1 ends an episode at
    # t=0 in SAME_STEP mode, so its next state (final observation 9) is not the next step's start (5).
    obs = t([[1, 2, 3], [4, 5, 6]])[..., None].astype(np.uint8)
    next_obs = t([[2, 3, 7], [9, 6, 8]])[..., None].astype(np.uint8)
    rollout = ppo.Rollout(obs, None, None, None, None, next_obs, None)
    values = t([[10.5, 20.5, 30.5], [40.5, 50.5, 60.5]])  # what the batch pass gave (not exactly 10 s)
    critic = Critic()
    next_values = ppo.next_state_values(critic, rollout, values, torch.device("cpu"))
    # Reused from the batch pass: env 0 at t=0, 1 and env 1 at t=1; asked: env 1's final state and both last steps.
    np.testing.assert_allclose(next_values, t([[20.5, 30.5, 70.0], [90.0, 60.5, 80.0]]))
    assert sorted(critic.asked) == [7, 8, 9]

    # T = 1 (--num-steps 1): no next step to reuse, so the critic is asked about every next state.
    one_step = ppo.Rollout(obs[:1], None, None, None, None, next_obs[:1], None)
    next_values = ppo.next_state_values(Critic(), one_step, values[:1], torch.device("cpu"))
    np.testing.assert_allclose(next_values, [[20.0, 90.0]])


def test_the_frames_policy_keeps_the_log_probs_and_values_of_what_it_did():
    agent = ppo.Agent((1, 36, 36), 3)
    policy = ppo.TorchPolicy(agent, np.random.default_rng(0), torch.device("cpu"))
    frames = np.random.default_rng(1).integers(0, 256, (3, 4, 1, 36, 36), dtype=np.uint8)  # T=3 steps of N=4
    actions = np.stack([policy(f) for f in frames])
    logp, _, value, policies = agent.evaluate_actions(torch.from_numpy(frames.reshape(12, 1, 36, 36)),
                                            torch.from_numpy(actions.reshape(12)))
    np.testing.assert_allclose(torch.cat(policy.logprobs).numpy(), logp.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(torch.cat(policy.policies).numpy(), policies.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(torch.cat(policy.values).numpy(), value.detach().numpy(), atol=1e-5)


def test_float64_observations_train(tmp_path, capsys):
    # MuJoCo's observations are float64: the rollout stores them as float32, as the network takes them.
    out = run_main(ppo, tmp_path, capsys, "--env-id", "Float64Bandit-v0", "--total-timesteps", "4096")
    assert out.returncode == 0, out.stderr


def test_a_checkpoint_from_before_frames_evaluates(tmp_path, capsys):
    out = run_main(ppo, tmp_path, capsys, "--env-id", "CartPole-v1", "--total-timesteps", "4096", "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run / "model.pt", weights_only=True)
    ckpt["obs_dim"] = ckpt.pop("obs_shape")[0]  # how checkpoints were written before issue 12
    torch.save(ckpt, tmp_path / "old.pt")
    out = run_main(ppo, tmp_path, capsys, "--env-id", "CartPole-v1", "--eval-checkpoint", str(tmp_path / "old.pt"),
                   "--eval-episodes", "2")
    assert out.returncode == 0, out.stderr
    assert "eval: 2 episodes" in out.stdout


def test_evaluation_plays_the_game_as_the_model_was_trained(tmp_path):
    def evaluated(trained, **given):
        path = tmp_path / "model.pt"
        torch.save({"script": "ppo.py", "args": {"env_id": "PongNoFrameskip-v4", "seed": 9, **trained}}, path)
        return ppo.as_trained(ppo.Args(env_id="ALE/Pong-v5", eval_checkpoint=str(path), **given))
    args = evaluated({"atari_frame_stack": 2, "atari_sticky_actions": 0.5})
    assert (args.atari_frame_stack, args.atari_sticky_actions, args.seed) == (2, 0.5, 1)  # only the Atari flags
    assert evaluated({"atari_frame_stack": 2}, atari_frame_stack=2).atari_frame_stack == 2  # as trained: accepted
    # Sticky actions are the evaluation's to choose: given, they win; left to the id, the evaluated id's (v5: 0.25).
    assert evaluated({"atari_sticky_actions": 0.5}, atari_sticky_actions=0.0).atari_sticky_actions == 0.0
    assert evaluated({"atari_sticky_actions": None}).atari_sticky_actions is None
    with pytest.raises(ppo.UserError, match="the model was trained with --atari-frame-stack 2"):
        evaluated({"atari_frame_stack": 2}, atari_frame_stack=3)
    cartpole = tmp_path / "cartpole.pt"  # no Atari model: load_checkpoint says what it is
    torch.save({"script": "ppo.py", "args": {"env_id": "CartPole-v1", "atari_frame_skip": 4}}, cartpole)
    given = ppo.Args(env_id="ALE/Pong-v5", eval_checkpoint=str(cartpole), atari_frame_skip=2)
    assert ppo.as_trained(given) == given
    assert ppo.as_trained(ppo.Args(eval_checkpoint=str(tmp_path / "missing.pt"))) == ppo.Args(
        eval_checkpoint=str(tmp_path / "missing.pt"))


# ---------------------------------------------------------------------------------------------
# Periodic, atomic checkpoints
# ---------------------------------------------------------------------------------------------

def test_checkpoint_every_writes_at_iteration_ends(tmp_path, capsys, monkeypatch):
    written = []
    save = ppo.save_checkpoint
    monkeypatch.setattr(ppo, "save_checkpoint", lambda path, args, step, *rest: (written.append(step),
                                                                                 save(path, args, step, *rest)))
    out = run_main(ppo, tmp_path, capsys, *SMALL, "--save-model", "--checkpoint-every", "0")
    assert out.returncode == 0, out.stderr
    assert written == [512, 1024, 1536, 2048, 2048]  # every iteration (0 s), then the end
    written.clear()
    out = run_main(ppo, tmp_path / "b", capsys, *SMALL, "--save-model")  # every 600 s: only the end
    assert written == [2048]
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["iteration"] == 4 and set(ckpt["rng"]) == {"torch", "numpy", "random", "acting"}


def test_a_crash_while_writing_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "model.pt")
    ppo.write_atomically({"script": "ppo.py", "global_step": 1}, path)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        ppo.write_atomically({"script": "ppo.py", "global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_a_killed_run_resumes_where_its_checkpoint_left_it(tmp_path, capsys):
    # Killed with SIGKILL (no chance to save) after its first periodic checkpoint, then resumed:
    # it ends at --total-timesteps, and TensorBoard has each iteration's step once, in order.
    argv = ["--num-envs", "4", "--num-steps", "128", "--num-minibatches", "2", "--update-epochs", "1",
            "--total-timesteps", "10240", "--save-model", "--checkpoint-every", "0"]  # cheap updates: resuming is tested
    proc = subprocess.Popen([sys.executable, str(ROOT / "ppo.py"), *argv], cwd=tmp_path,
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
    out = run_main(ppo, tmp_path, capsys, "--resume", str(checkpoint.parent))
    assert out.returncode == 0, out.stderr
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt["global_step"] == 10240
    assert min(steps_of_the_last_writer(checkpoint.parent, "charts/episodic_return")) > killed_at  # went on, not over
    steps = read_steps(checkpoint.parent, "losses/policy_loss")
    assert steps == list(range(512, 10241, 512))  # each iteration once, in order
    episode_steps = read_steps(checkpoint.parent, "charts/episodic_return")
    assert episode_steps == sorted(episode_steps)


def test_a_resumed_run_starts_from_the_checkpoint_exactly(tmp_path, capsys):
    # Resumed with nothing left to train, it saves what it restored: the weights, the optimizer's
    # moments and the step count come back bit for bit.
    out = run_main(ppo, tmp_path, capsys, *SMALL, "--save-model")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    before = torch.load(run / "model.pt", weights_only=True)
    out = run_main(ppo, tmp_path, capsys, "--resume", str(run / "model.pt"))
    assert out.returncode == 0, out.stderr
    after = torch.load(run / "model.pt", weights_only=True)
    assert after["global_step"] == before["global_step"] == 2048
    for name, tensor in before["model"].items():
        assert torch.equal(tensor, after["model"][name])
    for i, state in before["optimizer"]["state"].items():
        assert all(torch.equal(state[k], after["optimizer"]["state"][i][k]) for k in ("exp_avg", "exp_avg_sq"))
    assert after["rng"]["acting"] == before["rng"]["acting"] and torch.equal(after["rng"]["torch"], before["rng"]["torch"])


def test_a_checkpoint_saved_before_the_flag_check_still_resumes(tmp_path, capsys):
    # --atari-noop-max 3 and --cnn-precision float32 on CartPole were once saved (and did nothing): such a
    # run resumes, with the flags it was started with.
    out = run_main(ppo, tmp_path, capsys, *SMALL, "--save-model")
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run / "model.pt", weights_only=True)
    torch.save({**ckpt, "args": {**ckpt["args"], "atari_noop_max": 3, "cnn_precision": "float32"}}, run / "model.pt")
    out = run_main(ppo, tmp_path, capsys, "--resume", str(run), "--total-timesteps", "4096")
    assert out.returncode == 0, out.stderr
    assert torch.load(run / "model.pt", weights_only=True)["global_step"] == 4096


def test_resuming_with_a_flag_that_cannot_change_is_one_line(tmp_path, capsys):
    out = run_main(ppo, tmp_path, capsys, *SMALL, "--save-model")
    (run,) = (tmp_path / "runs").iterdir()
    one_line_error(run_main(ppo, tmp_path, capsys, "--resume", str(run), "--num-envs", "8"), "ppo.py",
                   "--num-envs cannot change when resuming", "4", "8")
    one_line_error(run_main(ppo, tmp_path, capsys, "--resume", str(run), "--clip-coef", "None"), "ppo.py",
                   "--clip-coef cannot change when resuming: the run has 0.2, given None")  # as typed, not inf
    one_line_error(run_main(ppo, tmp_path, capsys, "--resume", str(run), "--atari-frame-skip", "2"), "ppo.py",
                   "--atari-frame-skip 2: for Atari ids only, and CartPole-v1 is not one")  # not "the run has 4"
    one_line_error(run_main(ppo, tmp_path, capsys, "--resume", str(run), "--cnn-precision", "float32"), "ppo.py",
                   "--cnn-precision float32: for frames only")
    steps = torch.load(run / "model.pt", weights_only=True)["global_step"]
    one_line_error(run_main(ppo, tmp_path, capsys, "--resume", str(run), "--total-timesteps", str(steps - 1)),
                   "ppo.py", f"--total-timesteps {steps - 1} is less than the {steps} steps the run has taken")
    out = run_main(ppo, tmp_path, capsys, "--resume", str(run), "--total-timesteps", "None")  # unset: the run's own
    assert out.returncode == 0, out.stderr
    assert "ppo.py: the run has done all 4 iterations of its --total-timesteps 2048" in out.stdout  # finished: says so
    out = run_main(ppo, tmp_path, capsys, "--resume", str(run), "--total-timesteps", str(steps + 511))  # < 1 batch more
    assert out.returncode == 0 and "the run has done all 4 iterations of its --total-timesteps 2559" in out.stdout
    one_line_error(run_main(ppo, tmp_path, capsys, "--resume", str(tmp_path / "nothing")), "ppo.py",
                   "no checkpoint at")
    old = torch.load(run / "model.pt", weights_only=True)
    del old["rng"]  # as written before --resume existed
    torch.save(old, tmp_path / "old.pt")
    one_line_error(run_main(ppo, tmp_path, capsys, "--resume", str(tmp_path / "old.pt")), "ppo.py",
                   "written before --resume existed")
    out = run_main(ppo, tmp_path, capsys, "--resume", str(run), "--total-timesteps", "3072")  # train longer: allowed
    assert out.returncode == 0, out.stderr
    assert torch.load(run / "model.pt", weights_only=True)["global_step"] == 3072


def test_a_second_ctrl_c_stops_at_once_and_saves_as_interrupted_not_crashed(tmp_path, capsys, monkeypatch):
    # The second Ctrl-C raises KeyboardInterrupt wherever it lands: here, at the first status line.
    def lands_here(self, step, recent_returns, force=False):
        if not force:
            raise KeyboardInterrupt
    monkeypatch.setattr(ppo.StatusLine, "update", lands_here)
    out = run_main(ppo, tmp_path, capsys, *SMALL, "--save-model")
    assert out.returncode == 130 and out.stderr.strip() == "ppo.py: interrupted"
    (run,) = (tmp_path / "runs").iterdir()
    assert f"model saved to runs/{run.name}/model.pt (a second Ctrl-C)" in out.stdout
    assert torch.load(run / "model.pt", weights_only=True)["global_step"] > 0


def test_the_status_line_shows_the_last_step_once(capsys):
    status = ppo.StatusLine(total=100, every=0.0)
    status.update(50, [1.0])
    status.update(100, [1.0])
    status.update(100, [1.0], force=True)  # as training's end does, whether or not the last iteration showed it
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["50/100", "100/100"]
    held = ppo.StatusLine(total=100, every=1e9)
    held.update(100, [1.0])  # too soon after the start: not shown
    held.update(100, [1.0], force=True)
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["100/100"]


def test_what_was_logged_after_the_checkpoint_is_dropped_on_resume(tmp_path, capsys, monkeypatch):
    # A run logs 4 iterations, but its last checkpoint is from iteration 2 (as when it dies before the
    # next): resumed, iterations 3 and 4 are trained and logged again, and each step appears once.
    kept = []
    save = ppo.save_checkpoint
    def keep_iteration_2(path, args, step, *rest):
        save(path, args, step, *rest)
        if step == 1024:
            kept.append(open(path, "rb").read())
    monkeypatch.setattr(ppo, "save_checkpoint", keep_iteration_2)
    out = run_main(ppo, tmp_path, capsys, *SMALL, "--save-model", "--checkpoint-every", "0")
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    (run / "model.pt").write_bytes(kept[0])
    out = run_main(ppo, tmp_path, capsys, "--resume", str(run))
    assert out.returncode == 0, out.stderr
    assert read_steps(run, "losses/policy_loss") == [512, 1024, 1536, 2048]
    episodes = read_steps(run, "charts/episodic_return")
    assert episodes == sorted(episodes) and episodes[-1] == 2048



# ---------------------------------------------------------------------------------------------
# Many processes (torchrun): the ranks are one learner
# ---------------------------------------------------------------------------------------------

def test_two_ranks_learn_as_one_and_keep_identical_parameters(two_ranks):
    _, ((code0, rank0), (code1, rank1)), tmp_path, _ = two_ranks
    assert code0 == code1 == 0
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)  # bitwise: every step the same on both
    (run,) = (tmp_path / "runs").iterdir()  # rank 0 alone writes logs and checkpoints
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["global_step"] == 4096 and all(torch.equal(ckpt["model"][name], rank0[name]) for name in rank0)
    returns = read_tags(run)[0]["charts/episodic_return"]
    assert len(returns) == 2048  # both ranks' episodes: 4096 steps, every other one a reset step
    assert np.mean(returns[-100:]) > 0.9  # learned, from 2048 steps of each rank
    assert not ranks_played_alike(run)  # each rank its own envs and draws (seeded from seed and rank)


def collectives_as_rank(rank):
    """One update of this rank's half of a batch (the halves differ), and a KL stop."""
    join_gloo()
    ranks = ppo.Ranks(rank, 2)
    agent, batch = bandit_batch(128)
    half = slice(64 * rank, 64 * (rank + 1))
    mine = ppo.Batch(*(getattr(batch, f)[half] for f in ("obs", "actions", "logprobs", "values", "advantages",
                                                          "returns")), valid=torch.arange(64),
                     policies=batch.policies[half])
    updated = update(agent, mine, torch.optim.SGD, num_minibatches=1, max_grad_norm=1e9, ranks=ranks)[0]
    out = {"update": parameters(updated)}
    # The KL that adapts β: over both halves, and, for comparison, over this rank's half alone.
    out["kl_d"], out["kl_d_alone"] = (ppo.mean_exact_kl(updated, mine, r) for r in (ranks, ppo.Ranks()))
    if rank == 0:  # its KL estimate e^-0.5 - 1 + 0.5 = 0.107 from the first minibatch; rank 1's 0 there
        mine.logprobs = mine.logprobs + 0.5
    kl_agent, stats = update(agent, mine, lr=1e-4, target_kl=0.01, ranks=ranks)
    out["kl_steps"], out["kl_update"] = stats["minibatch_steps"], parameters(kl_agent)
    out["fail_together"] = fail_together_as_rank(ppo, ranks)
    out["start_alike"] = start_alike_as_rank(ppo, bandit_batch(128)[0], ranks)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """2 ranks: the collectives of tests (b) and (d), then a short training run, in one spawn.
    Returns (each rank's collectives, each rank's (exit code, final parameters), the run's folder, each
    rank's exit code where runs/ could not be written)."""
    cwd = tmp_path_factory.mktemp("train")
    # NextStepBandit's reset steps pay the wrong action: both ranks must leave theirs out.
    argv = ["--env-id", "NextStepBandit-v0", "--num-envs", "2", "--num-steps", "64", "--total-timesteps", "4096",
            "--update-epochs", "2", "--learning-rate", "1e-3", "--save-model"]
    # Rank 1 builds other weights, as another machine's arithmetic might: rank 0's are the ones both start from.
    ranks = run_ranks(collectives_then_training, 2, collectives_as_rank, (free_port(), free_port()), "ppo",
                      "Agent", str(cwd), argv, None, True, tmp_path=tmp_path_factory.mktemp("ranks"))
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
    d = ppo.mean_exact_kl(update(agent, batch, torch.optim.SGD, num_minibatches=1, max_grad_norm=1e9)[0], batch,
                          ppo.Ranks())
    assert d > 0 and collectives[0]["kl_d_alone"] != collectives[1]["kl_d_alone"]  # the halves' KLs differ
    for rank in collectives:  # so every rank adapts β alike, from the whole batch's KL
        assert rank["kl_d"] == pytest.approx(d, rel=1e-6)


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
    argv = ["--env-id", "CartPole-v1", "--num-envs", "2", "--num-steps", "64", "--total-timesteps", "512",
            "--save-model", "--checkpoint-every", "1e9"]
    rank0, rank1 = run_ranks(slow_rank_0_save_as_rank, 2, "ppo", str(tmp_path), argv, tmp_path=tmp_path)
    assert rank1["left"] >= rank0["saved"]


def test_a_stop_request_to_one_rank_stops_every_rank_at_the_same_iteration(tmp_path):
    argv = ["--env-id", "CartPole-v1", "--num-envs", "2", "--num-steps", "64", "--total-timesteps", "100000000",
            "--save-model"]
    ((code0, rank0), (code1, rank1)), ckpt = stop_one_rank("ppo", "Agent", argv, tmp_path)
    assert code0 == code1 == 143  # both took rank 1's SIGTERM as their own
    assert 0 < ckpt["global_step"] < 100_000_000 and ckpt["global_step"] % 256 == 0
    assert all(torch.equal(ckpt["model"][name], rank0[name]) and torch.equal(rank1[name], rank0[name]) for name in rank0)
