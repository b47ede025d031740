"""Proximal Policy Optimization (PPO) for continuous action spaces (MuJoCo), in one file.

The clipped-surrogate PPO of Schulman et al. (2017) with a Gaussian policy: as the seed tutorial
puts it, for continuous control the policy network gives a mean and a variance, and actions are
drawn from that normal distribution. Run π_θold in N synchronous envs for T steps, estimate
advantages with GAE, optimise the clipped surrogate for K epochs over shuffled minibatches.

    python ppo_continuous.py --env-id HalfCheetah-v5
    python ppo_continuous.py --env-id Pendulum-v1 --total-timesteps 300000 --save-model
    python ppo_continuous.py --env-id Hopper-v5 --eval-checkpoint runs/RUN/model.pt
    torchrun --nproc-per-node 2 ppo_continuous.py --env-id HalfCheetah-v5   # 2 data-parallel learners

Gymnasium 1.x: a truncated episode (time limit) bootstraps from V(final observation); a
terminated one does not. Observations are standardised by running statistics that this file
keeps itself (`update_running_mean_std`), so the final observation of an episode is
normalised exactly as every other observation of its batch, and the statistics go into the
checkpoint and are used, frozen, to evaluate it.
"""

import contextlib
import gc
import glob
import importlib.util
import io
import math
import os
import random
import signal
import sys
import time
import traceback
import warnings
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import tyro
from gymnasium.vector import AutoresetMode

SCRIPT = os.path.basename(__file__)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (torch, numpy, random and the envs)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = False
    """if toggled, train on the GPU (off: small MLPs are faster on the CPU)"""
    capture_video: bool = False
    """if toggled, record videos to `videos/RUN/` (needs moviepy): of env 0 while training
    (episodes 0, 1, 8, 27, ..., then every 1000th); with --eval-checkpoint, of every evaluated episode"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (needs wandb): the TensorBoard
    scalars, the flags, and the videos"""
    wandb_project_name: str = "policy-gradients"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    save_model: bool = False
    """if toggled, save the model and normalisation statistics to `runs/RUN/model.pt` (also on Ctrl-C, SIGTERM and a NaN)"""
    checkpoint_every: float = 600.0
    """with --save-model, also write the checkpoint every this many seconds (at an iteration's end)"""
    resume: Optional[str] = None
    """continue this run (its directory or its model.pt) where its checkpoint left it, with its flags;
    given again, only --total-timesteps, --checkpoint-every, --save-model, --cuda and the --track flags may differ"""

    env_id: str = "HalfCheetah-v5"
    """the id of the environment (a Box action space)"""
    total_timesteps: int = 1_000_000
    """total env steps of the experiment"""
    learning_rate: float = 3e-4
    """the learning rate of the optimizer"""
    num_envs: int = 1
    """the number of parallel game environments"""
    num_steps: int = 2048
    """the number of steps to run in each environment per policy rollout (T)"""
    anneal_lr: bool = True
    """toggle learning-rate annealing (linear, to zero at the end of training)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda of the general advantage estimation"""
    num_minibatches: int = 32
    """the number of minibatches per epoch"""
    update_epochs: int = 10
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """toggles advantage normalisation (per minibatch)"""
    clip_coef: Optional[float] = 0.2
    """the surrogate clipping coefficient epsilon; None: no clipping, the plain surrogate r_t A_t (L^CPI)"""
    clip_vloss: bool = False
    """toggles the clipped value loss (the PPO paper and CleanRL: on; off measured better, see README)"""
    ent_coef: float = 0.0
    """coefficient of the entropy bonus"""
    vf_coef: float = 0.5
    """coefficient of the value function loss"""
    max_grad_norm: float = 0.5
    """the maximum norm for the global gradient clipping"""
    target_kl: Optional[float] = None
    """stop the epochs early once the approximate KL exceeds this (checked every minibatch)"""
    kl_beta: float = 0.0
    """beta, the coefficient of the KL penalty: the objective less beta KL(pi_old(.|s), pi(.|s)), the exact KL
    (the PPO paper's L^KLPEN); 0: no penalty"""
    kl_dtarg: Optional[float] = None
    """d_targ: when given, beta adapts after each update (halved when the batch's mean KL is below d_targ / 1.5,
    doubled above 1.5 d_targ), starting from --kl-beta, or 1 if that is 0"""
    norm_obs: bool = True
    """toggles standardising observations by their running mean and std (clipped to +-obs-clip)"""
    obs_clip: float = 10.0
    """the bound of the standardised observations"""
    norm_reward: bool = True
    """toggles dividing rewards by the running std of the discounted return (clipped to +-reward-clip)"""
    reward_clip: float = 10.0
    """the bound of the scaled rewards"""
    log_std_init: float = -0.5
    """the initial log σ of the Gaussian, every action dimension (SB3's `log_std_init`; the PPO paper's: 0; see README)"""

    eval_checkpoint: Optional[str] = None
    """evaluate this saved model (its model.pt or its run's folder) with the deterministic policy, the Gaussian's
    mean, instead of training"""
    eval_episodes: int = 10
    """the number of episodes to evaluate a saved model for"""
    eval_deterministic: bool = True
    """evaluate the Gaussian's mean (on) or sample actions from it as in training (off; SB3's `deterministic`)"""


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit code 2."""


class NonFiniteGradient(Exception):
    """The loss or its gradient became NaN or infinite: training stops before applying it, exit code 1."""




def check_args(args: Args) -> None:
    for flag, path in (("--resume", args.resume), ("--eval-checkpoint", args.eval_checkpoint)):
        if path == "":  # "$RUN" with RUN unset: read as not given, it would start a new run
            raise UserError(f"{flag} was given an empty path")
    for name, value in asdict(args).items():  # NaN slips through every comparison below
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if not 0 <= args.seed < 2**32:  # numpy's global seed takes no more
        raise UserError(f"--seed must lie in [0, 2^32), got {args.seed}")
    counts = dict(total_timesteps=args.total_timesteps, num_envs=args.num_envs, num_steps=args.num_steps,
                  num_minibatches=args.num_minibatches, update_epochs=args.update_epochs,
                  eval_episodes=args.eval_episodes)
    for name, value in counts.items():
        if value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.eval_checkpoint is None:  # training's batches: an evaluation plays --eval-episodes episodes
        batch_size = args.num_envs * args.num_steps
        if batch_size % args.num_minibatches:
            raise UserError(f"the batch (--num-envs {args.num_envs} x --num-steps {args.num_steps} = {batch_size}) "
                            f"does not divide into --num-minibatches {args.num_minibatches}")
        world_size = int(os.environ.get("WORLD_SIZE", 1))  # under torchrun an iteration takes every rank's batch
        if args.total_timesteps < batch_size * world_size:
            raise UserError(f"--total-timesteps {args.total_timesteps} is less than one batch ({batch_size}"
                            + (f" x {world_size} ranks" if world_size > 1 else "") + ")")
    if args.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be 0 or more seconds, got {args.checkpoint_every}")
    if args.capture_video and importlib.util.find_spec("moviepy") is None:
        raise UserError("--capture-video needs moviepy: pip install moviepy")
    if args.track and importlib.util.find_spec("wandb") is None:
        raise UserError("--track needs Weights & Biases: pip install wandb")
    if not 0.0 < args.gamma <= 1.0 or not 0.0 <= args.gae_lambda <= 1.0:
        raise UserError("--gamma must lie in (0, 1] and --gae-lambda in [0, 1]")
    positive = dict(learning_rate=args.learning_rate, clip_coef=args.clip_coef, max_grad_norm=args.max_grad_norm,
                    target_kl=args.target_kl, obs_clip=args.obs_clip, reward_clip=args.reward_clip)  # None: off
    for name, value in positive.items():
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.clip_coef is None and args.clip_vloss:
        raise UserError("--clip-vloss clips by --clip-coef, which is None: give a --clip-coef or --no-clip-vloss")
    if args.kl_beta < 0 or (args.kl_dtarg is not None and args.kl_dtarg <= 0):
        raise UserError("--kl-beta must be 0 or more, and --kl-dtarg positive")


# ---------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------

def env_spec(env_id: str) -> gym.envs.registration.EnvSpec:
    """The registered spec of `env_id`; `module:EnvId-v0` imports `module` first, as gym.make does."""
    module, _, name = env_id.rpartition(":")
    atari = UserError(f"{env_id} is an Atari game, learned from its frames by ppo.py and a2c.py; "
                      f"{SCRIPT} takes Box actions")
    if name.startswith("ALE/") or "NoFrameskip" in name:  # not even looked up: this script does not load ale-py
        raise atari
    if module:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UserError(f"cannot import {module!r} for --env-id {env_id} ({e})") from None
    if name not in gym.registry:  # Breakout-v4 is unknown until ale-py is loaded (and a typo's message lists its ids)
        register_ale_py()
    try:
        spec = gym.spec(name)
    except gym.error.Error as e:
        raise UserError(f"unknown env id {env_id!r} ({e})") from None
    if str(spec.entry_point).startswith("ale_py"):  # the ids of ale-py's without ALE/ or NoFrameskip
        raise atari
    return spec


def register_ale_py() -> None:
    """Register ale-py's Atari ids, where it is installed: done only for an id that is not registered without them."""
    if importlib.util.find_spec("ale_py") is not None:
        import ale_py
        gym.register_envs(ale_py)


def render_offscreen(capture_video: bool) -> None:
    """With no display, record videos off screen: MuJoCo through EGL, SDL (classic control) to no window and
    no noise. Set before either is imported (the first gym.make); a user's own setting wins."""
    if capture_video and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("MUJOCO_GL", "egl")
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


def make_envs(env_id: str, num_envs: int, seed: int, capture_video: bool = False, run_name: str = "",
              record_every_env: bool = False) -> gym.vector.VectorEnv:
    """N copies of `env_id` in a SyncVectorEnv that autoresets SAME_STEP, with episode statistics.

    SAME_STEP wastes no step on resets and hands over each ended episode's final observation
    in `info`. Normalisation is not done by Gymnasium's wrappers: the vector-level ones accept
    only NEXT_STEP autoreset, and the per-env ones would keep N different sets of statistics
    (N policies, in effect). This file normalises the whole batch itself (see `train`), so the
    videos show the env as it is. With --capture-video, env 0 is filmed, or with
    `record_every_env` (evaluation) each env's first episode.
    """
    spec = env_spec(env_id)
    # Gymnasium 1.4 films MuJoCo envs from a free camera that stays put (HalfCheetah leaves the frame within
    # two seconds); the models' own "track" camera follows the body. A model without one gets the free camera.
    filmed = dict(render_mode="rgb_array", **({"camera_name": "track"} if "mujoco" in str(spec.entry_point) else {}))
    if capture_video:  # rendering needs a package of its own (pygame), or OpenGL (MuJoCo)
        try:
            probe = gym.make(env_id, **filmed)
            probe.reset(seed=seed)
            probe.render()
            probe.close()
        except Exception as e:  # noqa: BLE001 (no OpenGL is a mujoco.FatalError, or an error deep in PyOpenGL)
            with contextlib.redirect_stderr(io.StringIO()):  # what failed half-made (a MuJoCo viewer with no GL
                traceback.clear_frames(e.__traceback__)      # context) complains as it is collected: here, unheard
                gc.collect()
            # str(): an entry point may be the env's class itself
            gl = f"; MUJOCO_GL={os.environ['MUJOCO_GL']}: install EGL (libegl1) or OSMesa (libosmesa6 and " \
                 "MUJOCO_GL=osmesa)" if "mujoco" in str(spec.entry_point) and "MUJOCO_GL" in os.environ else ""
            raise UserError(f"--capture-video cannot render {env_id}: {str(e).strip().splitlines()[0]}{gl}") from None
        warnings.filterwarnings("ignore", ".*Overwriting existing videos")  # one folder, a new run's, for every env

    def thunk(i):
        def make():
            if capture_video and record_every_env:  # the one episode of this env that is evaluated
                return gym.wrappers.RecordVideo(gym.make(env_id, **filmed), f"videos/{run_name}",
                                                name_prefix=f"eval-{i}", episode_trigger=lambda e: e == 0)
            if capture_video and i == 0:
                return gym.wrappers.RecordVideo(gym.make(env_id, **filmed), f"videos/{run_name}")
            return gym.make(env_id)
        return make
    try:
        envs = gym.vector.SyncVectorEnv([thunk(i) for i in range(num_envs)], autoreset_mode=AutoresetMode.SAME_STEP)
    except gym.error.Error as e:
        raise UserError(f"cannot make {env_id!r}: {e}") from None
    action_space = envs.single_action_space
    if not isinstance(action_space, gym.spaces.Box) or len(action_space.shape) != 1:
        envs.close()
        hint = " (use ppo.py for Discrete actions)" if isinstance(action_space, gym.spaces.Discrete) else ""
        raise UserError(f"{env_id} has a {type(action_space).__name__} action space; "
                        f"{SCRIPT} needs a flat Box one{hint}")
    obs_space = envs.single_observation_space
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        envs.close()
        raise UserError(f"{env_id} has observation space {obs_space}; {SCRIPT} needs a flat Box")
    return gym.wrappers.vector.RecordEpisodeStatistics(envs, buffer_length=100)


# ---------------------------------------------------------------------------------------------
# Normalisation: running mean and variance, merged batch by batch
# ---------------------------------------------------------------------------------------------

def update_running_mean_std(mean: np.ndarray, var: np.ndarray, count: float, batch_mean: np.ndarray,
                            batch_var: np.ndarray, batch_count: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Merge two sets' moments: δ = μ_B - μ_A, n = n_A + n_B, μ = μ_A + δ n_B/n, σ² = (n_A σ_A² + n_B σ_B² + δ² n_A n_B/n) / n."""
    delta = batch_mean - mean
    total = count + batch_count
    new_mean = mean + delta * batch_count / total
    new_var = (var * count + batch_var * batch_count + delta ** 2 * count * batch_count / total) / total
    return new_mean, new_var, total


class RunningMeanStd:
    """Mean and (population) variance of everything seen so far, feature by feature."""

    def __init__(self, shape: tuple = (), epsilon: float = 1e-4):
        # A tiny prior count (mean 0, variance 1), so the first batch all but replaces it.
        self.mean, self.var, self.count = np.zeros(shape), np.ones(shape), epsilon

    def update(self, batch: np.ndarray, ranks: "Ranks") -> None:
        """Take in this rank's batch and, under torchrun, every other rank's (`union_moments`)."""
        self.mean, self.var, self.count = update_running_mean_std(self.mean, self.var, self.count,
                                                                  *union_moments(batch, ranks))

    def state(self) -> dict:
        """As plain tensors and a float, for a weights_only checkpoint."""
        return {"mean": torch.as_tensor(self.mean), "var": torch.as_tensor(self.var), "count": float(self.count)}

    @classmethod
    def from_state(cls, state: dict) -> "RunningMeanStd":
        rms = cls()
        rms.mean, rms.var, rms.count = state["mean"].numpy(), state["var"].numpy(), state["count"]
        return rms


def normalize_observations(obs: np.ndarray, mean: np.ndarray, var: np.ndarray, clip: float,
                           eps: float = 1e-8) -> np.ndarray:
    """clip((s - μ) / √(σ² + ε), -c, c)."""
    return np.clip((obs - mean) / np.sqrt(var + eps), -clip, clip).astype(np.float32)


def running_discounted_returns(rewards: np.ndarray, dones: np.ndarray, carried: np.ndarray,
                               gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """G_t = r_t + γ G_{t-1}, restarting at 0 after an episode ends; returns (G, the G to carry on).

    Arrays (T, N); `carried` is what the previous rollout returned. These forward-discounted
    returns are what the reward scale is the running std of (as SB3's VecNormalize).
    """
    returns = np.empty_like(rewards)
    g = carried
    for t in range(rewards.shape[0]):
        g = rewards[t] + gamma * g
        returns[t] = g
        g = np.where(dones[t], 0.0, g)
    return returns, g.astype(rewards.dtype)


def scale_rewards(rewards: np.ndarray, return_var: float, clip: float, eps: float = 1e-8) -> np.ndarray:
    """clip(r / √(Var[G] + ε), -c, c): rewards divided by the running std of the discounted return."""
    return np.clip(rewards / np.sqrt(return_var + eps), -clip, clip).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The policy network π_θ(a|s) = N(μ_θ(s), σ²) and the critic V(s)
# ---------------------------------------------------------------------------------------------

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(actions: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log π(a|s) = Σ_i [-(a_i - μ_i)² / (2σ_i²) - log σ_i - ½ log 2π], summed over action dimensions."""
    return (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std - 0.5 * LOG_2PI).sum(-1)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """H(π(·|s)) = Σ_i [½ + ½ log 2π + log σ_i], summed over action dimensions."""
    return (0.5 + 0.5 * LOG_2PI + log_std).sum(-1)


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights with gain `std`, constant bias (the PPO implementations' init)."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Separate 64-64 tanh MLPs: the actor gives the mean μ_θ(s), the critic V(s); log σ is a
    learned vector of its own, the same in every state (as in the PPO paper)."""

    def __init__(self, obs_dim: int, action_dim: int, log_std_init: float = 0.0):
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        # A small last layer starts every mean near 0, so early actions are σ noise around it.
        self.actor_mean = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, action_dim), std=0.01),
        )
        self.actor_logstd = nn.Parameter(torch.full((1, action_dim), log_std_init))

    def get_value(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(x).squeeze(-1)

    def evaluate_actions(self, x: torch.Tensor, action: torch.Tensor):
        """(log π_θ(a|s), entropy of π_θ(·|s), V(s), μ_θ(s), log σ) for given states and actions."""
        mean = self.actor_mean(x)
        log_std = self.actor_logstd.expand_as(mean)  # a view of the parameter, which Adam changes in place:
        # what is returned is a copy, so that a batch keeps θ_old's log σ while θ moves on
        return gaussian_log_prob(action, mean, log_std), gaussian_entropy(log_std), self.get_value(x), mean, log_std.clone()


class NumpyPolicy:
    """a ~ N(μ_θ(s), σ²) for the rollout: the actor's forward pass in numpy, on a copy of its weights.

    Observations are standardised inside, with statistics frozen for the rollout: the policy
    that acts is a fixed function of the raw observation. Made anew each rollout. For a few
    envs, numpy's per-layer overhead (~1 µs) is far below torch's (~10 µs).
    """

    def __init__(self, agent: Agent, obs_rms: Optional[RunningMeanStd], obs_clip: float,
                 rng: Optional[np.random.Generator] = None):
        self.layers = [(m.weight.detach().cpu().numpy().T.copy(), m.bias.detach().cpu().numpy().copy())
                       for m in agent.actor_mean if isinstance(m, nn.Linear)]
        self.std = agent.actor_logstd.detach().exp().cpu().numpy()[0]
        self.obs_rms, self.obs_clip, self.rng = obs_rms, obs_clip, rng

    def mean(self, obs: np.ndarray) -> np.ndarray:
        """μ_θ(s): the deterministic policy, used to evaluate a saved model."""
        x = obs.astype(np.float32, copy=False)  # no copy in the rollout: already float32
        if self.obs_rms is not None:
            x = normalize_observations(x, self.obs_rms.mean, self.obs_rms.var, self.obs_clip)
        for i, (weight, bias) in enumerate(self.layers):
            x = x @ weight + bias
            if i < len(self.layers) - 1:
                x = np.tanh(x)
        return x

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        mean = self.mean(obs)
        return mean + self.std * self.rng.standard_normal(mean.shape, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Rollout: run π_θold for T steps in N envs
# ---------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """One batch of experience, each field shaped (T, N, ...), as numpy arrays; raw observations.

    `actions` are the Gaussian samples as drawn, not clipped to the action space: the env is
    given the clipped action, but log π_θold(a|s) must be of the sample π_θold produced.
    `next_obs[t]` is the state the transition at t led to: the final observation when the
    episode ended at t (so a truncated episode can bootstrap from it), else the next one.
    """
    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminations: np.ndarray
    truncations: np.ndarray
    next_obs: np.ndarray

    @classmethod
    def empty(cls, num_steps: int, num_envs: int, obs_dim: int, action_dim: int) -> "Rollout":
        steps = (num_steps, num_envs)
        return cls(obs=np.zeros(steps + (obs_dim,), np.float32), actions=np.zeros(steps + (action_dim,), np.float32),
                   rewards=np.zeros(steps, np.float32), terminations=np.zeros(steps, bool),
                   truncations=np.zeros(steps, bool), next_obs=np.zeros(steps + (obs_dim,), np.float32))


def collect_rollout(envs, policy, rollout: Rollout, obs: np.ndarray, on_episode=None) -> np.ndarray:
    """Fill `rollout` with T steps of `policy` (observations -> actions) in `envs`, from `obs`.

    `envs` autoreset SAME_STEP: the observation after an episode's last step is already the
    next episode's first, and the final one is in `info["final_obs"]`. Returns the obs to
    continue from. `on_episode(returns, lengths)` is called with the stats of episodes that end.
    """
    low, high = envs.single_action_space.low, envs.single_action_space.high
    for t in range(rollout.obs.shape[0]):
        rollout.obs[t] = obs
        action = policy(rollout.obs[t])
        rollout.actions[t] = action

        obs, reward, terminated, truncated, info = envs.step(np.clip(action, low, high))
        rollout.rewards[t] = reward
        rollout.terminations[t] = terminated
        rollout.truncations[t] = truncated
        rollout.next_obs[t] = obs
        if "_final_obs" in info:
            ended = info["_final_obs"]
            rollout.next_obs[t, ended] = np.stack(info["final_obs"][ended])
        if on_episode is not None and "_episode" in info:
            ended = info["_episode"]
            on_episode(info["episode"]["r"][ended], info["episode"]["l"][ended])
    return obs


def normalize_batch(rollout: Rollout, obs_rms: Optional[RunningMeanStd], obs_clip: float,
                    ranks: "Ranks") -> tuple[np.ndarray, np.ndarray]:
    """The batch's observations and the states they led to, (T·N, d) each, standardised alike.

    Standardised with the statistics the rollout acted with, so that log π_θold(a|s) below is
    the log-probability under the policy that chose a; the final observations truncations
    bootstrap from get the same ones. Only then do the statistics take in the batch (every
    rank's), for the next rollout.
    """
    obs, next_obs = (x.reshape(-1, x.shape[-1]) for x in (rollout.obs, rollout.next_obs))
    if obs_rms is None:
        return obs, next_obs
    normalized = (normalize_observations(obs, obs_rms.mean, obs_rms.var, obs_clip),
                  normalize_observations(next_obs, obs_rms.mean, obs_rms.var, obs_clip))
    obs_rms.update(obs, ranks)
    return normalized


# ---------------------------------------------------------------------------------------------
# The math: advantages and losses, as pure functions
# ---------------------------------------------------------------------------------------------

def gae(rewards: np.ndarray, values: np.ndarray, next_values: np.ndarray, terminations: np.ndarray,
        truncations: np.ndarray, gamma: float, gae_lambda: float) -> tuple[np.ndarray, np.ndarray]:
    """Â_t = δ_t + γλ(1-done_t)Â_{t+1}, δ_t = r_t + γ(1-term_t)V(s_{t+1}) - V(s_t); returns (Â, Â+V).

    Arrays (T, N). `next_values[t]` is V of the state step t led to (the final observation
    when the episode ended at t), so a truncated step bootstraps and a terminated one does
    not; either way the sum stops at the episode's end. After step T-1 nothing is summed.
    """
    deltas = rewards + gamma * (1.0 - terminations) * next_values - values
    continues = 1.0 - (terminations | truncations)
    advantages = np.zeros_like(deltas)
    running = np.zeros(deltas.shape[1], deltas.dtype)
    for t in reversed(range(deltas.shape[0])):
        running = deltas[t] + gamma * gae_lambda * continues[t] * running
        advantages[t] = running
    return advantages.astype(np.float32), (advantages + values).astype(np.float32)


def normalize_advantages(advantages: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                         eps: float = 1e-8) -> torch.Tensor:
    """(Â - mean Â) / (std Â + ε), the mean and std of one minibatch (all ranks' together: `union_mean_std`).
    One advantage has no std (NaN): it is left as it is, SB3's rule, not made NaN."""
    return torch.where(std.isnan(), advantages, (advantages - mean) / (std + eps))


def clipped_surrogate_loss(ratio: torch.Tensor, advantages: torch.Tensor, clip_coef: float) -> torch.Tensor:
    """-E_t[min(r_t Â_t, clip(r_t, 1-ε, 1+ε) Â_t)], r_t = π_θ(a_t|s_t) / π_θold(a_t|s_t)."""
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef) * advantages
    return -torch.min(unclipped, clipped).mean()


def surrogate_loss(ratio: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """-E_t[r_t Â_t]: the surrogate unclipped (the PPO paper's L^CPI, TRPO's objective), negated to descend."""
    return -(ratio * advantages).mean()


def gaussian_kl(old_mean: torch.Tensor, old_log_std: torch.Tensor, new_mean: torch.Tensor,
                new_log_std: torch.Tensor) -> torch.Tensor:
    """KL(π_old(·|s), π(·|s)) of diagonal Gaussians, exact: Σ_i [log σ'_i - log σ_i + (σ_i² + (μ_i - μ'_i)²) / 2σ'_i² - ½]."""
    return (new_log_std - old_log_std
            + ((2 * old_log_std).exp() + (old_mean - new_mean) ** 2) / (2 * (2 * new_log_std).exp()) - 0.5).sum(-1)


def kl_penalty(kl: torch.Tensor, beta: float) -> torch.Tensor:
    """β E_t[KL(π_θold(·|s_t), π_θ(·|s_t))]: what L^KLPEN subtracts from the surrogate, so a loss adds."""
    return beta * kl.mean()


def adapt_kl_beta(beta: float, kl: float, kl_dtarg: float) -> float:
    """The PPO paper's adaptive β, after an update whose batch's mean KL is d: β/2 if d < d_targ/1.5, 2β if d > 1.5 d_targ."""
    if kl < kl_dtarg / 1.5:
        return beta / 2
    if kl > kl_dtarg * 1.5:
        return beta * 2
    return beta


def value_loss(new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip_coef: Optional[float] = None) -> torch.Tensor:
    """½E[(V-R)²], or with `clip_coef` ½E[max((V-R)², (V_old + clip(V-V_old, ±ε) - R)²)]."""
    unclipped = (new_values - returns) ** 2
    if clip_coef is None:
        return 0.5 * unclipped.mean()
    v_clipped = old_values + torch.clamp(new_values - old_values, -clip_coef, clip_coef)
    return 0.5 * torch.max(unclipped, (v_clipped - returns) ** 2).mean()


def ppo_loss(clip_loss: torch.Tensor, entropy: torch.Tensor, v_loss: torch.Tensor, ent_coef: float,
             vf_coef: float) -> torch.Tensor:
    """L = -L^CLIP - c_e H + c_v L^V: the PPO paper's objective L^CLIP - c_1 L^VF + c_2 S, negated to descend
    (its first term -L^CPI without clipping, and plus β KL with the penalty: `ppo_update`)."""
    return clip_loss - ent_coef * entropy + vf_coef * v_loss


def approx_kl(logratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimates of KL(π_θold, π_θ) from log r = log π_θ - log π_θold: (E[-log r], E[(r-1) - log r])."""
    return (-logratio).mean(), ((logratio.exp() - 1) - logratio).mean()


def clip_gradients(agent: nn.Module, max_norm: float) -> None:
    """Rescale ∇θ to norm ≤ max_norm; a NaN or infinite norm raises before the optimizer step, so θ stays finite."""
    if not torch.isfinite(nn.utils.clip_grad_norm_(agent.parameters(), max_norm)):
        raise NonFiniteGradient


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R]: 1 is a perfect critic, 0 no better than a constant (nan if Var[R]=0)."""
    if len(targets) < 2:  # one return has no variance (and torch warns)
        return float("nan")
    var_targets = targets.var()
    return float("nan") if var_targets == 0 else float(1 - (targets - predictions).var() / var_targets)


# ---------------------------------------------------------------------------------------------
# The update: K epochs of minibatch gradient steps on L
# ---------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """The rollout flattened to T·N transitions, with what π_θold and the critic made of them.
    """
    obs: torch.Tensor
    actions: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    means: Optional[torch.Tensor] = None  # π_θold(·|s): μ and log σ at each state, for the exact KL
    log_stds: Optional[torch.Tensor] = None


def shuffled_minibatches(advantages: torch.Tensor, num_minibatches: int, epochs: int, ranks: "Ranks",
                         norm_adv: bool = True):
    """Each epoch a new shuffle of the batch into minibatches: (indices, mean Â, std Â) for each, the mean
    and std those of the minibatch's advantages together with the other ranks' same-numbered minibatches
    (None without `norm_adv`). One all-reduce per epoch brings every minibatch's moments."""
    for _ in range(epochs):
        minibatches = torch.tensor_split(torch.randperm(len(advantages), device=advantages.device), num_minibatches)
        moments = (union_mean_std([advantages[mb] for mb in minibatches], ranks) if norm_adv
                   else [(None, None)] * len(minibatches))
        yield from ((mb, mean, std) for mb, (mean, std) in zip(minibatches, moments))


def ppo_update(agent: Agent, optimizer: torch.optim.Optimizer, batch: Batch, args: Args, ranks: "Ranks",
               kl_beta: float = 0.0) -> dict:
    """Optimise L for K epochs over shuffled minibatches; θ changes, θ_old does not.

    The policy's objective is L^CLIP, or with --clip-coef None the unclipped L^CPI; with a penalty
    coefficient β > 0 it also subtracts β times the exact KL(π_θold(·|s), π_θ(·|s)) (L^KLPEN).
    Returns the last minibatch's losses (the policy's with the penalty in it) and KL estimates, the
    clip fraction over all of them, and how many minibatch steps were taken (fewer when the KL
    passed --target-kl). Under torchrun a minibatch is the union of the ranks' minibatches: its
    advantages are normalised together, its gradient is the mean of theirs, and its KL estimate
    (approx_kl, which may stop the epochs) theirs.
    """
    clipfracs = []
    for mb, adv_mean, adv_std in shuffled_minibatches(batch.advantages, args.num_minibatches, args.update_epochs, ranks,
                                                      args.norm_adv):
        newlogprob, entropy, newvalue, new_mean, new_log_std = agent.evaluate_actions(batch.obs[mb], batch.actions[mb])
        logratio = newlogprob - batch.logprobs[mb]
        ratio = logratio.exp()
        with torch.no_grad():
            old_kl, kl = approx_kl(logratio)
            clipfracs.append(((ratio - 1.0).abs() > (args.clip_coef or math.inf)).float().mean())

        mb_advantages = batch.advantages[mb]
        if args.norm_adv:
            mb_advantages = normalize_advantages(mb_advantages, adv_mean, adv_std)
        if args.clip_coef is None:
            pg_loss = surrogate_loss(ratio, mb_advantages)
        else:
            pg_loss = clipped_surrogate_loss(ratio, mb_advantages, args.clip_coef)
        if kl_beta > 0:
            exact_kl = gaussian_kl(batch.means[mb], batch.log_stds[mb], new_mean, new_log_std)
            pg_loss = pg_loss + kl_penalty(exact_kl, kl_beta)
        v_loss = value_loss(newvalue, batch.values[mb], batch.returns[mb],
                            args.clip_coef if args.clip_vloss else None)
        entropy_loss = entropy.mean()
        loss = ppo_loss(pg_loss, entropy_loss, v_loss, args.ent_coef, args.vf_coef)

        optimizer.zero_grad()
        loss.backward()
        kl = average_gradients(agent, ranks, kl)  # and the ranks' mean KL, in the same all-reduce
        clip_gradients(agent, args.max_grad_norm)
        optimizer.step()
        if args.target_kl is not None and kl > args.target_kl:
            break  # π_θ has moved far enough from π_θold: no more steps, this epoch or the next
    return {"policy_loss": pg_loss.item(), "value_loss": v_loss.item(), "entropy": entropy_loss.item(),
            "old_approx_kl": old_kl.item(), "approx_kl": kl.item(),
            "clipfrac": torch.stack(clipfracs).mean().item(), "minibatch_steps": len(clipfracs), "kl_beta": kl_beta}


def mean_exact_kl(agent: Agent, batch: Batch, ranks: "Ranks") -> float:
    """d = E_t[KL(π_θold(·|s_t), π_θ(·|s_t))] over the whole batch (every rank's), exact: what adapts β."""
    with torch.no_grad():
        _, _, _, mean, log_std = agent.evaluate_actions(batch.obs, batch.actions)
        ((d, _),) = union_mean_std([gaussian_kl(batch.means, batch.log_stds, mean, log_std)], ranks)
    return d.item()


# ---------------------------------------------------------------------------------------------
# Many processes (torchrun): N learners that stay one. Alone, each helper does nothing.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ranks:
    """This process among torchrun's data-parallel learners: rank 0 of 1 when run alone."""
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")  # where the collectives' tensors live (nccl: the GPU)


def join_ranks(device: torch.device) -> Ranks:
    """Under torchrun (WORLD_SIZE > 1), join the process group: gloo on the CPU, nccl on GPUs.

    The rank is RANK, unique across machines; LOCAL_RANK repeats on each machine and only picks the GPU.
    """
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size == 1:
        return Ranks()
    # Keys of this attempt only: when torchrun restarts the ranks (--max-restarts) its store still holds
    # the dead attempt's addresses, and a new rank that read one first failed to connect (measured here).
    store, rank, size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size,
                            store=dist.PrefixStore(f"attempt-{attempt}", store))
    return Ranks(rank, size, device)


def rank_seed(seed: int, ranks: Ranks) -> int:
    """The seed of this rank's envs (seed + i for env i) and action draws: --seed on rank 0, as alone; on the
    others one drawn from (seed, rank), so no rank repeats rank 0 of another --seed (seed + 1, ...)."""
    if ranks.rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, ranks.rank]).generate_state(1)[0] >> 2)  # < 2^30: int32 env seeds fit


def leave_ranks(ranks: Ranks, together: bool) -> None:
    """Leave the process group. After an end every rank agreed on (`together`: done, a stop, a NaN), first wait in a
    barrier until every rank, rank 0 with its checkpoint written, is here: torchrun stops the whole job as soon
    as one worker exits with an error code."""
    if ranks.size > 1:
        if together:
            dist.barrier()
        dist.destroy_process_group()


def start_alike(agent: nn.Module, global_step: int, ranks: Ranks) -> None:
    """θ ← rank 0's θ on every rank, and every rank at the same step. Built from one seed, the weights
    agree on one machine; another machine's arithmetic, or an older copy of a checkpoint, could make
    them differ, and averaged gradients would never bring them back together."""
    if ranks.size == 1:
        return
    device = next(agent.parameters()).device
    flat = nn.utils.parameters_to_vector(agent.parameters()).detach().to(ranks.device)
    dist.broadcast(flat, src=0)
    nn.utils.vector_to_parameters(flat.to(device), agent.parameters())
    steps = torch.tensor([global_step, -global_step], device=ranks.device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    if steps[0] != -steps[1]:
        raise UserError(f"the ranks start from different steps ({-steps[1].item()} to {steps[0].item()}): "
                        "every rank must resume from the same checkpoint")  # every rank knows it: each exits 2


def average_gradients(agent: nn.Module, ranks: Ranks, kl: torch.Tensor) -> torch.Tensor:
    """∇θ ← the mean of the ranks' ∇θ, all parameters in one flat all-reduce: every rank then takes the
    same optimizer step, so the ranks' θ stay identical (and a NaN on one rank is a NaN on all). The KL
    estimate rides in the same all-reduce, and its mean over the ranks comes back, so the --target-kl
    stop is one decision taken by all: a second collective per gradient step would cost as much again."""
    if ranks.size == 1:
        return kl
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in agent.parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads] + [kl.detach().reshape(1).to(grads[0].dtype)]).to(ranks.device)
    dist.all_reduce(flat)
    flat = (flat / ranks.size).to(grads[0].device)
    *flat_grads, mean_kl = torch.split(flat, [g.numel() for g in grads] + [1])
    for p, g in zip(agent.parameters(), flat_grads):
        p.grad = g.view_as(p)
    return mean_kl[0].to(kl.dtype)


@contextlib.contextmanager
def fail_together(ranks: Ranks):
    """Setup that can fail on one rank only (rank 0 alone writes the run's folder, films and tracks): a
    UserError on any rank in the block is raised again on every rank when the block ends, so each exits 2
    and rank 0 says why, where the others would crash in their next collective with a rank that had left."""
    if ranks.size == 1:
        yield
        return
    error = None
    try:
        yield
    except UserError as e:
        error = str(e)
    errors = [None] * ranks.size
    dist.all_gather_object(errors, error)
    for rank, error in enumerate(errors):  # rank 0 prints it: where another rank found it, the line says which
        if error is not None:
            raise UserError(error if rank == 0 else f"rank {rank}: {error}")


def all_ranks_stop(stop: "StopRequest", ranks: Ranks) -> bool:
    """Whether any rank was asked to stop (Ctrl-C, SIGTERM): then every rank stops, at the same iteration,
    and takes the request as its own, so all of them save and exit alike."""
    if ranks.size == 1:
        return stop.requested
    signum = torch.tensor([stop.signum or 0], device=ranks.device)
    dist.all_reduce(signum, op=dist.ReduceOp.MAX)
    agreed = int(signum.item())  # a signal landing after the tensor was made waits for the next iteration
    if agreed and not stop.requested:
        stop.signum = agreed
    return agreed > 0


def union_mean_std(xs: list[torch.Tensor], ranks: Ranks) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each x in xs, the mean and (n-1) std of the union of every rank's x (the ranks' xs match up one
    to one): from the ranks' n, Σx, Σx² summed, all of xs in one all-reduce."""
    if ranks.size == 1:  # the std of one value is NaN, as below (torch's own would also warn)
        return [(x.mean(), x.std() if len(x) > 1 else x.new_tensor(math.nan)) for x in xs]
    sums = torch.stack([torch.stack([torch.tensor(float(len(x)), dtype=torch.float64, device=x.device),
                                     x.double().sum(), x.double().square().sum()]) for x in xs]).to(ranks.device)
    dist.all_reduce(sums)
    moments = []
    for x, (n, total, squares) in zip(xs, sums.tolist()):
        mean = total / n if n else float("nan")  # no valid step on any rank: as torch's mean of none
        var = max(squares - n * mean * mean, 0.0) / (n - 1) if n > 1 else float("nan")  # as torch's std of one
        moments.append((x.new_tensor(mean), x.new_tensor(math.sqrt(var))))
    return moments


def union_moments(batch: np.ndarray, ranks: Ranks) -> tuple[np.ndarray, np.ndarray, int]:
    """The mean, variance and size of the union of every rank's batch: each rank's moments, gathered,
    merged in rank order with `update_running_mean_std`, so every rank gets the same numbers."""
    mean, var, count = batch.mean(0), batch.var(0), batch.shape[0]
    if ranks.size == 1:
        return mean, var, count
    mine = torch.from_numpy(np.concatenate([[count], np.ravel(mean), np.ravel(var)])).to(ranks.device)
    gathered = [torch.empty_like(mine) for _ in range(ranks.size)]
    dist.all_gather(gathered, mine)
    moments = [(m[1:1 + mean.size].reshape(mean.shape), m[1 + mean.size:].reshape(mean.shape), float(m[0]))
               for m in (g.cpu().numpy() for g in gathered)]
    mean, var, count = moments[0]
    for other in moments[1:]:
        mean, var, count = update_running_mean_std(mean, var, count, *other)
    return mean, var, int(count)


def gather_episodes(episodes: list, ranks: Ranks) -> list:
    """Every rank's (return, length) of the episodes that ended, for rank 0 to log."""
    if ranks.size == 1:
        return episodes
    everyone = [None] * ranks.size
    dist.all_gather_object(everyone, episodes)
    return [episode for rank_episodes in everyone for episode in rank_episodes]


def restart_marker() -> Optional[str]:
    """Where a torchrun job notes its run directory for its restarts: runs/.torchrun-ID, ID being torchrun's
    --rdzv-id (with --standalone, one of its own per launch), or without either the launcher's pid, which
    its restarts keep."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id == "none":
        run_id = f"pid{os.getppid()}"
    return f"runs/.torchrun-{run_id}" if run_id else None


def note_run_dir(run_dir: str, ranks: Ranks) -> None:
    """Rank 0 notes the run directory, so that ranks torchrun restarts (--max-restarts) resume it."""
    if ranks.rank == 0 and restart_marker():
        os.makedirs(os.path.dirname(restart_marker()), exist_ok=True)
        with open(f"{restart_marker()}.tmp", "w") as f:
            f.write(run_dir)
        os.replace(f"{restart_marker()}.tmp", restart_marker())


def restarted_run() -> Optional[str]:
    """After torchrun restarted the ranks (a rank died; --max-restarts), the run to resume: the one the
    first attempt noted, if it wrote a checkpoint (else the job starts again from scratch)."""
    marker = restart_marker()
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0 or not (marker and os.path.isfile(marker)):
        return None
    with open(marker) as f:
        run_dir = f.read().strip()
    return run_dir if run_dir and os.path.isfile(os.path.join(run_dir, "model.pt")) else None


class Silent:
    """The other ranks' SummaryWriter and status line: rank 0 alone writes logs and prints progress."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def space_signature(envs) -> dict:
    return {"obs_dim": envs.single_observation_space.shape[0], "action_dim": envs.single_action_space.shape[0]}


def save_checkpoint(path: str, args: Args, global_step: int, agent: Agent, optimizer, envs,
                    obs_rms: Optional[RunningMeanStd], return_rms: Optional[RunningMeanStd],
                    rng: np.random.Generator, kl_beta: float = 0.0) -> None:
    # Plain tensors and Python scalars only, so `torch.load(weights_only=True)` can read it.
    write_atomically({"script": SCRIPT, "args": asdict(args), "global_step": global_step,
                      "model": agent.state_dict(), "optimizer": optimizer.state_dict(), "spaces": space_signature(envs),
                      "obs_rms": obs_rms and obs_rms.state(), "return_rms": return_rms and return_rms.state(),
                      "rng": rng_states(rng), "kl_beta": kl_beta}, path)


def write_atomically(checkpoint: dict, path: str) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`: a kill or a
    crash mid-write leaves the previous checkpoint whole (a rename within a directory is atomic)."""
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def rng_states(rng: np.random.Generator) -> dict:
    """Every random state a run draws from, as plain tensors and Python scalars."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "random": random.getstate(), "acting": rng.bit_generator.state}


def restore_rng_states(states: dict, rng: np.random.Generator) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["random"])
    rng.bit_generator.state = states["acting"]


def read_checkpoint(path: str) -> dict:
    """A checkpoint of this script, complete, or a UserError saying what it is instead."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torch.load of a foreign file can raise almost anything
        raise UserError(f"{path} is not a checkpoint this script can read ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT:
        writer = ckpt.get("script", "an unknown program") if isinstance(ckpt, dict) else "an unknown program"
        raise UserError(f"{path} was written by {writer}, not {SCRIPT}")
    missing = [key for key in ['args', 'model', 'spaces', 'obs_rms'] if key not in ckpt]
    if missing:
        raise UserError(f"{path} is an incomplete {SCRIPT} checkpoint (no {', '.join(missing)})")
    return ckpt


def load_checkpoint(path: str, env_id: str, envs) -> dict:
    """A checkpoint of this script whose spaces are `env_id`'s."""
    ckpt = read_checkpoint(path)
    if ckpt["spaces"] != space_signature(envs):
        raise UserError(f"{path} was trained on {ckpt['args']['env_id']}, whose spaces differ from {env_id}'s: "
                        f"pass --env-id {ckpt['args']['env_id']}")
    if ckpt["args"].get("norm_obs", True) and ckpt["obs_rms"] is None:
        raise UserError(f"{path} was trained on normalised observations but holds no statistics for them")
    return ckpt


# Flags a resumed run may be given anew; any other would make it a different run than the one saved.
RESUMABLE = {"total_timesteps", "checkpoint_every", "save_model", "cuda", "resume", "track", "wandb_project_name",
             "wandb_entity"}


def checkpoint_file(path: str) -> str:
    """A run's checkpoint, named by the file or by the run's folder (which holds it as model.pt)."""
    return os.path.join(path, "model.pt") if os.path.isdir(path) else path


def trained_env(args: Args, argv: Optional[list[str]]) -> Args:
    """`args` for --eval-checkpoint: without --env-id, the env the checkpoint was trained on. A second parse with
    a marker default tells --env-id left unset from --env-id given as its default."""
    if tyro.cli(Args, args=argv, default=replace(args, env_id="")).env_id:
        return args
    try:
        ckpt = torch.load(checkpoint_file(args.eval_checkpoint), map_location="cpu", weights_only=True)
        return replace(args, env_id=ckpt["args"]["env_id"]) if ckpt.get("script") == SCRIPT else args
    except Exception:  # noqa: BLE001 (no file, a foreign one: load_checkpoint says what is wrong with it)
        return args


def resumed_args(argv: Optional[list[str]], resume: str) -> tuple[Args, dict]:
    """The run's flags from its checkpoint, with the ones given again on the command line; and the checkpoint."""
    path = checkpoint_file(resume)
    ckpt = read_checkpoint(path)
    if "rng" not in ckpt:
        raise UserError(f"{path} was written before --resume existed: it can be evaluated, not resumed")
    saved = Args(**{k: v for k, v in ckpt["args"].items() if k in Args.__dataclass_fields__})
    args = tyro.cli(Args, args=argv, default=saved, description=__doc__.split("\n\n")[0])
    for name, value in asdict(args).items():
        if name not in RESUMABLE and value != getattr(saved, name):
            raise UserError(f"--{name.replace('_', '-')} cannot change when resuming: the run has "
                            f"{getattr(saved, name)!r}, given {value!r}")
    if args.total_timesteps < ckpt["global_step"]:
        raise UserError(f"--total-timesteps {args.total_timesteps} is less than the {ckpt['global_step']} steps "
                        "the run has taken: resume it with more")
    ckpt["run_dir"] = os.path.dirname(os.path.abspath(path))
    return replace(args, save_model=True), ckpt


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------

def select_device(args: Args) -> torch.device:
    """The CPU, or with --cuda the GPU (under torchrun, the machine's LOCAL_RANK-th)."""
    if args.cuda and not torch.cuda.is_available():
        print(f"{SCRIPT}: warning: --cuda given but no GPU is available; running on the CPU", file=sys.stderr)
    if not (args.cuda and torch.cuda.is_available()):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if local_rank >= torch.cuda.device_count():  # torchrun --nproc-per-node N with fewer than N GPUs
        raise UserError(f"--cuda: this rank needs GPU {local_rank} (LOCAL_RANK), but the machine has "
                        f"{torch.cuda.device_count()}: start at most that many ranks per machine")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def seed_everything(args: Args) -> None:
    # One thread is fastest for 64-unit MLPs, and keeps a run's numbers independent of core count.
    torch.set_num_threads(1)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic


class StatusLine:
    """Progress every few seconds on one line (a new line each time when not a terminal)."""

    def __init__(self, total: int, first_step: int = 0, every: float = 3.0):
        self.total, self.first_step, self.every = total, first_step, every
        self.start = self.last = time.time()
        self.tty = sys.stdout.isatty()
        self.shown = None  # the step of the last line shown

    def update(self, step: int, recent_returns, force: bool = False) -> None:
        now = time.time()
        if (not force and now - self.last < self.every) or step == self.shown:  # forced at the end: once
            return
        self.last, self.shown = now, step
        sps = (step - self.first_step) / max(now - self.start, 1e-9)
        mean = f"{np.mean(recent_returns):9.2f}" if len(recent_returns) else "      n/a"
        left = (self.total - step) / max(sps, 1e-9)
        line = (f"step {step:>{len(str(self.total))}}/{self.total}  SPS {sps:7.0f}  "
                f"return (last {len(recent_returns):3d}) {mean}  left {left:5.0f}s")
        print("\r" + line if self.tty else line, end="" if self.tty else "\n", flush=True)

    def close(self) -> None:
        if self.tty:
            print()


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks training to stop at the next iteration; a second Ctrl-C stops at once.

    `kill`, `timeout` and cluster schedulers send SIGTERM. A KeyboardInterrupt raised wherever
    Ctrl-C lands can land inside TensorBoard's writer queue and lose the wake-up of its thread,
    and closing the writer then hangs for up to two minutes: so the first one only asks.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self.previous = {signum: signal.getsignal(signum) for signum in self.SIGNALS}
        for signum, previous in self.previous.items():
            if previous is not signal.SIG_IGN:  # a shell's background job ignores Ctrl-C: so do we
                signal.signal(signum, self._request)

    def _request(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self.previous[signum])  # the second acts as it would have

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """0 if nothing was asked, else the shell's 128 + signal number: 130 (Ctrl-C), 143 (SIGTERM)."""
        return 0 if self.signum is None else 128 + self.signum

    def restore(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)


def folder_name(env_id: str) -> str:
    """The env id as part of a folder's name: ALE/Breakout-v5 and mypkg:MyEnv-v0 are no folder names."""
    return env_id.replace("/", "-").replace(":", "-")


def make_run_dir(run_name: str, capture_video: bool) -> str:
    """runs/RUN (and videos/RUN, where the videos go), made first: a directory that cannot be written is
    one line, not a late crash."""
    run_dir = f"runs/{run_name}"
    for path in [run_dir] + ([f"videos/{run_name}"] if capture_video else []):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write {path} in {os.getcwd()} ({e.strerror})") from None
    return run_dir


# How training ended, by exit code (None: an exception is on its way out).
ENDINGS = {0: "end of training", 1: "the last finite weights", 130: "Ctrl-C", 143: "SIGTERM", None: "crashed"}


def start_tracking(args: Args, run_dir: str):
    """A Weights & Biases run (--track), started before the SummaryWriter: patched, it sends W&B each scalar
    it writes (reading the event files back instead, sync_tensorboard=True, costs ~10 s at the end). The
    run's name is its id, so a resumed run goes on in the same W&B run."""
    import wandb
    wandb.tensorboard.patch(root_logdir=run_dir, pytorch=True, save=False)
    run_name = os.path.basename(run_dir)
    try:
        return wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_name, id=run_name,
                          resume="allow", config=asdict(args), save_code=True)
    except Exception as e:  # noqa: BLE001 (no API key, a bad WANDB_MODE, no network: W&B's own exceptions)
        raise UserError(f"--track: Weights & Biases could not start a run ({str(e).strip().splitlines()[0]}); "
                        "log in with `wandb login`, or set WANDB_MODE=offline") from None


def finish_tracking(tracker, video_folder: str, exit_code: Optional[int]) -> None:
    """Upload the videos recorded in `video_folder` and close the W&B run (a crash, None, is exit code 1)."""
    import wandb
    for path in sorted(glob.glob(f"{video_folder}/*.mp4")):
        tracker.log({f"videos/{os.path.basename(path)[: -len('.mp4')]}": wandb.Video(path)})
    tracker.finish(exit_code=1 if exit_code is None else exit_code)


def speaks() -> bool:
    """Whether this process prints: alone, or rank 0 under torchrun (whose RANK is set before Python starts)."""
    return os.environ.get("RANK", "0") == "0"


def leave_after_rank_0(exit_code: int) -> None:
    """sys.exit(exit_code) on a mistake every rank meets; a torchrun worker other than rank 0 first waits, up to
    30 s, for torchrun to stop it: torchrun stops every worker as soon as one exits with an error, and a rank
    leaving first could stop rank 0 before it printed the job's one line. (A rank on another machine, whose
    torchrun does not see rank 0 leave, waits the whole 30 s.)"""
    if not speaks() and os.environ.get("TORCHELASTIC_RUN_ID"):
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(30)
    sys.exit(exit_code)


def ending(exit_code: Optional[int]) -> str:
    """How training ended, for the save's message. A second Ctrl-C raises KeyboardInterrupt wherever it lands,
    so it leaves no exit code (None, as a crash does) but is the exception still on its way out."""
    return "a second Ctrl-C" if exit_code is None and sys.exc_info()[0] is KeyboardInterrupt else ENDINGS[exit_code]


def report_end(exit_code: int, global_step: int) -> None:
    """Say how training ended and exit with its code: 0, 1 (NaN), 130 (Ctrl-C), 143 (SIGTERM)."""
    if exit_code == 1 and speaks():
        print(f"{SCRIPT}: error: the loss or its gradient became NaN or infinite at step {global_step}; "
              "stopped before applying it", file=sys.stderr)
    elif exit_code and speaks():
        print(f"{SCRIPT}: stopped by {ENDINGS[exit_code]} at step {global_step}")
    if exit_code:
        sys.exit(exit_code)


def train(args: Args, resume: Optional[dict] = None) -> None:
    """Train from scratch, or from the checkpoint `resume` on (see `resumed_args`)."""
    render_offscreen(args.capture_video)  # a resumed run's --capture-video is the checkpoint's
    check_args(args)
    device = select_device(args)
    ranks = join_ranks(device)
    run_name = f"{folder_name(args.env_id)}__{args.exp_name}__{args.seed}__{int(time.time())}"
    seed_everything(args)
    seed = rank_seed(args.seed, ranks)
    with fail_together(ranks):  # rank 0 alone writes the run's folder, films and tracks
        if resume:
            run_dir = resume["run_dir"]
        else:
            run_dir = make_run_dir(run_name, args.capture_video) if ranks.rank == 0 else None
        envs = make_envs(args.env_id, args.num_envs, seed, args.capture_video and ranks.rank == 0, run_name)
        tracker = start_tracking(args, run_dir) if args.track and ranks.rank == 0 else None

    obs_dim, action_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    agent = Agent(obs_dim, action_dim, args.log_std_init).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5,
                                 fused=device.type in ("cpu", "cuda"))
    obs_rms = RunningMeanStd((obs_dim,)) if args.norm_obs else None
    return_rms = RunningMeanStd() if args.norm_reward else None
    rng = np.random.default_rng(seed)
    global_step = 0
    kl_beta = args.kl_beta or (1.0 if args.kl_dtarg is not None else 0.0)  # β of L^KLPEN; adapted, it is state
    if resume:  # where the checkpoint left off; the envs start new episodes, so the return being
        # scaled (`discounted_return`) starts at 0 again, as at any episode's start
        agent.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        obs_rms = resume["obs_rms"] and RunningMeanStd.from_state(resume["obs_rms"])
        return_rms = resume["return_rms"] and RunningMeanStd.from_state(resume["return_rms"])
        global_step = resume["global_step"]
        kl_beta = resume.get("kl_beta", kl_beta)
        restore_rng_states(resume["rng"], rng)
        if ranks.rank > 0:  # the checkpoint holds rank 0's acting noise; the others draw their own
            rng = np.random.default_rng([seed, global_step])
    start_alike(agent, global_step, ranks)

    from torch.utils.tensorboard import SummaryWriter  # slow to import; evaluation needs none
    # Resumed, what was logged after the checkpoint is dropped: no step is logged twice.
    writer = SummaryWriter(run_dir, purge_step=global_step + 1 if resume else None) if ranks.rank == 0 else Silent()
    note_run_dir(run_dir, ranks)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                    "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    if ranks.rank == 0:  # where to point TensorBoard
        print(f"{SCRIPT}: logs in {run_dir}/" + (f", videos in videos/{run_name}/" if args.capture_video else ""))

    batch_size = args.num_envs * args.num_steps  # this rank's; an iteration takes every rank's
    num_iterations = args.total_timesteps // (batch_size * ranks.size)
    if resume and global_step // (batch_size * ranks.size) >= num_iterations and ranks.rank == 0:  # why nothing happens
        print(f"{SCRIPT}: the run has done all {num_iterations} iterations of its --total-timesteps "
              f"{args.total_timesteps}; resume it with more to train on")
    rollout = Rollout.empty(args.num_steps, args.num_envs, obs_dim, action_dim)
    first_step = global_step
    status = StatusLine(num_iterations * batch_size * ranks.size, first_step) if ranks.rank == 0 else Silent()
    recent_returns = deque(maxlen=100)

    obs, _ = envs.reset(seed=seed)
    discounted_return = np.zeros(args.num_envs, np.float32)
    start_time = time.time()
    next_checkpoint = start_time + args.checkpoint_every
    stop = StopRequest()
    exit_code = None  # stays None if anything but the ends below leaves the loop (a crash)
    try:
        for iteration in range(global_step // (batch_size * ranks.size) + 1, num_iterations + 1):
            if all_ranks_stop(stop, ranks):  # Ctrl-C or SIGTERM: stop here, between two iterations
                break
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate

            # 1. Run π_θold for T steps in each of the N envs.
            episodes = []
            obs = collect_rollout(envs, NumpyPolicy(agent, obs_rms, args.obs_clip, rng), rollout, obs,
                                  lambda returns, lengths: episodes.extend(zip(returns, lengths)))
            global_step += batch_size * ranks.size
            for episodic_return, length in gather_episodes(episodes, ranks):  # every rank's, at the step count
                writer.add_scalar("charts/episodic_return", episodic_return, global_step)  # the rollout ended on
                writer.add_scalar("charts/episodic_length", length, global_step)
                recent_returns.append(episodic_return)

            # 2. Normalise the batch with the statistics it was collected with (see `normalize_batch`).
            batch_obs, batch_next_obs = normalize_batch(rollout, obs_rms, args.obs_clip, ranks)
            # Rewards are scaled so that returns, and the critic's targets, keep a scale of about
            # one whatever the env's units; the policy never sees them, so the scale may take in
            # this batch before it is applied to it.
            rewards = rollout.rewards
            if return_rms is not None:
                returns_so_far, discounted_return = running_discounted_returns(
                    rollout.rewards, rollout.terminations | rollout.truncations, discounted_return, args.gamma)
                return_rms.update(returns_so_far.reshape(-1), ranks)
                rewards = scale_rewards(rollout.rewards, return_rms.var, args.reward_clip)
            with torch.inference_mode():
                b_obs = torch.from_numpy(batch_obs).to(device)
                b_actions = torch.from_numpy(rollout.actions.reshape(-1, action_dim)).to(device)
                b_logprobs, _, b_values, b_means, b_log_stds = agent.evaluate_actions(b_obs, b_actions)
                values = b_values.cpu().numpy().reshape(args.num_steps, args.num_envs)
                next_values = agent.get_value(torch.from_numpy(batch_next_obs).to(device)).cpu().numpy()
                next_values = next_values.reshape(args.num_steps, args.num_envs)

            # 3. The advantage estimate Â_t.
            advantages, returns = gae(rewards, values, next_values, rollout.terminations,
                                      rollout.truncations, args.gamma, args.gae_lambda)

            # 4. Optimise the surrogate for K epochs over shuffled minibatches.
            batch = Batch(b_obs, b_actions, b_logprobs, b_values,
                          torch.from_numpy(advantages.reshape(-1)).to(device),
                          torch.from_numpy(returns.reshape(-1)).to(device), b_means, b_log_stds)
            stats = ppo_update(agent, optimizer, batch, args, ranks, kl_beta)
            if args.kl_dtarg is not None:  # the paper's adaptive β: from the KL this update reached
                kl_beta = adapt_kl_beta(kl_beta, mean_exact_kl(agent, batch, ranks), args.kl_dtarg)

            # 5. Log what the update did (under torchrun, on rank 0's minibatches; approx_kl is the ranks' mean).
            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            for name, value in stats.items():
                writer.add_scalar(f"losses/{name}", value, global_step)
            writer.add_scalar("losses/explained_variance", explained_variance(batch.values, batch.returns), global_step)
            writer.add_scalar("charts/SPS", int((global_step - first_step) / (time.time() - start_time)), global_step)
            status.update(global_step, recent_returns)
            if args.save_model and ranks.rank == 0 and time.time() >= next_checkpoint:  # nothing learned is lost to a kill
                writer.flush()  # the logs up to the checkpoint reach the disk with it
                save_checkpoint(f"{run_dir}/model.pt", args, global_step, agent, optimizer, envs, obs_rms,
                                return_rms, rng, kl_beta)
                next_checkpoint = time.time() + args.checkpoint_every
        exit_code = stop.exit_code  # 0, or 130 after Ctrl-C, 143 after SIGTERM
    except NonFiniteGradient:
        exit_code = 1
    finally:  # every way out, a crash included: keep what was learned, close the logs
        stop.restore()
        status.update(global_step, recent_returns, force=True)
        status.close()
        writer.flush()  # the logs up to the final checkpoint reach the disk before it, as at every save
        if args.save_model and ranks.rank == 0:
            save_checkpoint(f"{run_dir}/model.pt", args, global_step, agent, optimizer, envs, obs_rms, return_rms,
                            rng, kl_beta)
            print(f"{SCRIPT}: model saved to {run_dir}/model.pt ({ending(exit_code)})")
        writer.close()
        envs.close()
        if tracker:
            finish_tracking(tracker, f"videos/{run_name}", exit_code)
        leave_ranks(ranks, together=exit_code is not None)  # not after a crash: the others may never come
    report_end(exit_code, global_step)


def evaluate(args: Args) -> None:
    """Run the policy of a saved model (the Gaussian's mean, unless told to sample); train nothing.

    Observations are standardised with the statistics saved in the checkpoint, frozen: the
    policy learned on standardised inputs, and without them it acts all but at random.
    """
    args = replace(args, eval_checkpoint=checkpoint_file(args.eval_checkpoint))
    render_offscreen(args.capture_video)
    check_args(args)
    select_device(args)  # only to warn about a missing GPU: evaluation acts in numpy
    seed_everything(args)
    run_name = f"{folder_name(args.env_id)}__{args.exp_name}-eval__{args.seed}__{int(time.time())}"
    if args.capture_video:  # the videos' folder must be writable before the episodes are played
        make_run_dir(run_name, True)
    # One env per episode, so short episodes are not over-represented in the mean.
    envs = make_envs(args.env_id, args.eval_episodes, args.seed, args.capture_video, run_name, record_every_env=True)
    ckpt = load_checkpoint(args.eval_checkpoint, args.env_id, envs)
    agent = Agent(envs.single_observation_space.shape[0], envs.single_action_space.shape[0])
    try:
        agent.load_state_dict(ckpt["model"])
    except RuntimeError:  # same script and spaces, other layer shapes (another version of it)
        raise UserError(f"{args.eval_checkpoint}'s weights do not fit this {SCRIPT}'s network") from None
    obs_rms = ckpt["obs_rms"] and RunningMeanStd.from_state(ckpt["obs_rms"])
    policy = NumpyPolicy(agent, obs_rms, ckpt["args"].get("obs_clip", args.obs_clip),
                         np.random.default_rng(args.seed))
    act = policy.mean if args.eval_deterministic else policy
    low, high = envs.single_action_space.low, envs.single_action_space.high

    returns = np.full(args.eval_episodes, np.nan)
    obs, _ = envs.reset(seed=args.seed)
    while np.isnan(returns).any():
        obs, _, _, _, info = envs.step(np.clip(act(obs), low, high))
        if "_episode" in info:
            first = info["_episode"] & np.isnan(returns)
            returns[first] = info["episode"]["r"][first]
    envs.close()

    how = "the mean action" if args.eval_deterministic else "sampled actions"
    print(f"eval: {args.eval_episodes} episode{'s' * (args.eval_episodes != 1)} of {args.env_id} ({how}): "
          f"return {returns.mean():.2f} ± {returns.std():.2f}", flush=True)
    if args.capture_video:
        print(f"eval: videos in videos/{run_name}/")
    run_dir = make_run_dir(run_name, False)  # an unwritable folder costs the log, not the result printed above
    tracker = start_tracking(args, run_dir) if args.track else None
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(run_dir)
    for i, r in enumerate(returns):
        writer.add_scalar("eval/episodic_return", r, i)
    writer.close()
    if tracker:
        finish_tracking(tracker, f"videos/{run_name}", 0)


def main(argv: Optional[list[str]] = None) -> None:
    args = tyro.cli(Args, args=argv, description=__doc__.split("\n\n")[0])
    try:
        resume = args.resume or (restarted_run() if not args.eval_checkpoint else None)  # torchrun's restarts
        if resume:
            train(*resumed_args(argv, resume))
        else:
            evaluate(trained_env(args, argv)) if args.eval_checkpoint else train(args)
    except UserError as e:
        if speaks():  # under torchrun every rank has the same mistake (fail_together): one line, not N
            print(f"{SCRIPT}: error: {e}", file=sys.stderr)
        if dist.is_initialized():  # a rank leaving with gloo's threads running can abort at exit (SIGABRT)
            dist.destroy_process_group()
        leave_after_rank_0(2)
    except KeyboardInterrupt:  # before training started, or during an evaluation: nothing to save
        print(f"{SCRIPT}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
