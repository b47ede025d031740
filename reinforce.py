"""REINFORCE (Monte Carlo policy gradient), in one file.

The vanilla policy gradient as the seed tutorial derives it: sample complete episodes from
π_θ(a|s), weight each -log π_θ(a_t|s_t) by the discounted reward-to-go G_t (normalised over
the batch), average over the N episodes, and take a gradient step:

    ∇_θ J(θ) ≈ 1/N Σ_i Σ_t ∇_θ log π_θ(a_t^i|s_t^i) Ĝ_t^i

    python reinforce.py --env-id CartPole-v1
    python reinforce.py --env-id Pendulum-v1          # a Gaussian policy for Box actions
    python reinforce.py --eval-checkpoint runs/RUN/model.pt

No critic (that is a2c.py). Two corrections to the seed: its step 4 writes the return as
[r_T, r_T + γ r_{T-1}, ...], which discounts the earlier reward; the reward-to-go is
G_t = Σ_{k≥t} γ^{k-t} r_k (see `discounted_returns`). And a time limit is handled
deliberately (see `discounted_returns` and `collect_episodes`).
"""

import collections
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
from dataclasses import asdict, dataclass, replace
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
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
    """if toggled, save the model to `runs/RUN/model.pt` (also on Ctrl-C, SIGTERM and a NaN)"""
    checkpoint_every: float = 600.0
    """with --save-model, also write the checkpoint every this many seconds (at an update's end)"""
    resume: Optional[str] = None
    """continue this run (its directory or its model.pt) where its checkpoint left it, with its flags;
    given again, only --total-timesteps, --checkpoint-every, --save-model, --cuda and the --track flags may differ"""

    env_id: str = "CartPole-v1"
    """the id of the environment (Discrete or Box actions)"""
    total_timesteps: int = 500_000
    """total env steps of the experiment: at most this many are played; a batch whose episodes do not all end within them is not trained on"""
    learning_rate: float = 5e-3
    """the learning rate of the Adam optimizer"""
    num_envs: int = 8
    """the number of parallel game environments"""
    gamma: float = 0.99
    """the discount factor gamma"""
    episodes_per_update: int = 16
    """N, the complete episodes each gradient step averages over (a multiple of --num-envs)"""
    normalize_returns: bool = True
    """toggles normalising the rewards-to-go over the batch (mean 0, std 1), as the seed does"""

    eval_checkpoint: Optional[str] = None
    """evaluate this saved model (its model.pt or its run's folder; deterministic policy) instead of training"""
    eval_episodes: int = 10
    """the number of episodes to evaluate a saved model for"""


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit code 2."""


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite: training stops before the step that would apply it."""


def check_args(args: Args) -> None:
    for flag, path in (("--resume", args.resume), ("--eval-checkpoint", args.eval_checkpoint)):
        if path == "":  # "$RUN" with RUN unset: read as not given, it would start a new run
            raise UserError(f"{flag} was given an empty path")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun: N copies would train N unrelated agents
        raise UserError("runs in one process; for data-parallel ranks under torchrun use a2c.py, ppo.py "
                        "or ppo_continuous.py")
    for name, value in asdict(args).items():  # NaN slips through every comparison below
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if not 0 <= args.seed < 2**32:  # numpy's global seed takes no more
        raise UserError(f"--seed must lie in [0, 2^32), got {args.seed}")
    counts = dict(total_timesteps=args.total_timesteps, num_envs=args.num_envs,
                  episodes_per_update=args.episodes_per_update, eval_episodes=args.eval_episodes)
    for name, value in counts.items():
        if value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.eval_checkpoint is None:  # training's batches: an evaluation plays --eval-episodes episodes
        if args.episodes_per_update % args.num_envs:
            raise UserError(f"--episodes-per-update {args.episodes_per_update} is not a multiple of "
                            f"--num-envs {args.num_envs}: each env plays the same number of episodes per update")
        if args.total_timesteps < args.episodes_per_update:  # each episode takes at least one step
            raise UserError(f"--total-timesteps {args.total_timesteps} is less than one batch "
                            f"(--episodes-per-update {args.episodes_per_update} episodes take at least as many steps)")
    if args.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be 0 or more seconds, got {args.checkpoint_every}")
    if args.capture_video and importlib.util.find_spec("moviepy") is None:
        raise UserError("--capture-video needs moviepy: pip install moviepy")
    if args.track and importlib.util.find_spec("wandb") is None:
        raise UserError("--track needs Weights & Biases: pip install wandb")
    if not 0.0 < args.gamma <= 1.0:
        raise UserError("--gamma must lie in (0, 1]")
    if args.learning_rate <= 0:
        raise UserError("--learning-rate must be positive")


# ---------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------

def env_spec(env_id: str) -> gym.envs.registration.EnvSpec:
    """The registered spec of `env_id`; `module:EnvId-v0` imports `module` first, as gym.make does."""
    module, _, name = env_id.rpartition(":")
    atari = UserError(f"{env_id} is an Atari game, learned from its frames by ppo.py and a2c.py; "
                      f"{SCRIPT} takes vector observations")
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


def make_envs(env_id: str, num_envs: int, seed: int, capture_video: bool = False,
              run_name: str = "", record_every_env: bool = False) -> gym.vector.VectorEnv:
    """N copies of `env_id` stepping together, with episode statistics recorded.

    The env's own vectorised implementation is used where it has one (CartPole's steps all
    envs in one numpy call); it autoresets NEXT_STEP. Otherwise a SyncVectorEnv, SAME_STEP.
    With `capture_video`, env 0 is filmed, or with `record_every_env` (evaluation) each env's first episode.
    """
    spec = env_spec(env_id)
    if capture_video:  # rendering needs a package of its own (pygame), or OpenGL (MuJoCo)
        try:
            probe = gym.make(env_id, render_mode="rgb_array")
            probe.reset(seed=seed)
            probe.render()
            probe.close()
        except Exception as e:  # noqa: BLE001 (no OpenGL is a mujoco.FatalError, or an ImportError deep in PyOpenGL)
            with contextlib.redirect_stderr(io.StringIO()):  # what failed half-made (a MuJoCo viewer with no GL
                traceback.clear_frames(e.__traceback__)      # context) complains as it is collected: here, unheard
                gc.collect()
            gl = f"; MUJOCO_GL={os.environ['MUJOCO_GL']}: install EGL (libegl1) or OSMesa (libosmesa6 and " \
                 "MUJOCO_GL=osmesa)" if "mujoco" in str(spec.entry_point) and "MUJOCO_GL" in os.environ else ""
            raise UserError(f"--capture-video cannot render {env_id}: {str(e).strip().splitlines()[0]}{gl}") from None
        warnings.filterwarnings("ignore", ".*Overwriting existing videos")  # one folder, a new run's, for every env
    try:
        # An evaluation plays a SyncVectorEnv (env i seeded seed + i), filmed or not: the same episodes either way.
        if spec.vector_entry_point is not None and not capture_video and not record_every_env:
            envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point")
        else:
            def thunk(i):
                def make():
                    if capture_video and record_every_env:  # the one episode of this env that is evaluated
                        return gym.wrappers.RecordVideo(gym.make(env_id, render_mode="rgb_array"), f"videos/{run_name}",
                                                        name_prefix=f"eval-{i}", episode_trigger=lambda e: e == 0)
                    if capture_video and i == 0:
                        return gym.wrappers.RecordVideo(gym.make(env_id, render_mode="rgb_array"), f"videos/{run_name}")
                    return gym.make(env_id)
                return make
            envs = gym.vector.SyncVectorEnv([thunk(i) for i in range(num_envs)],
                                            autoreset_mode=AutoresetMode.SAME_STEP)
    except gym.error.Error as e:
        raise UserError(f"cannot make {env_id!r}: {e}") from None
    action_space = envs.single_action_space
    if not isinstance(action_space, (gym.spaces.Discrete, gym.spaces.Box)) or (
            isinstance(action_space, gym.spaces.Box) and len(action_space.shape) != 1):
        envs.close()
        raise UserError(f"{env_id} has action space {action_space}; {SCRIPT} needs Discrete or a flat Box")
    obs_space = envs.single_observation_space
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        envs.close()
        raise UserError(f"{env_id} has observation space {obs_space}; {SCRIPT} needs a flat Box")
    return gym.wrappers.vector.RecordEpisodeStatistics(envs, buffer_length=100)


# ---------------------------------------------------------------------------------------------
# The policy network π_θ(a|s)
# ---------------------------------------------------------------------------------------------

def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights with gain `std`, constant bias."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Policy(nn.Module):
    """π_θ(a|s): a 64-64 tanh MLP giving softmax logits over Discrete actions, or, for Box
    actions, the mean of a Gaussian N(μ_θ(s), σ²) whose log σ is learned per action dimension."""

    def __init__(self, obs_dim: int, action_space: gym.Space):
        super().__init__()
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        out_dim = int(action_space.n) if self.discrete else action_space.shape[0]
        self.net = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            # A small last layer starts the policy near uniform (or near mean 0), so it explores.
            layer_init(nn.Linear(64, out_dim), std=0.01),
        )
        self.log_std = None if self.discrete else nn.Parameter(torch.zeros(out_dim))

    def log_prob_and_entropy(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log π_θ(a|s), entropy of π_θ(·|s)) for given states and actions."""
        out = self.net(obs)
        if self.discrete:
            logp = torch.log_softmax(out, dim=-1)
            return logp.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1), categorical_entropy(logp)
        return gaussian_log_prob(actions, out, self.log_std), gaussian_entropy(self.log_std).expand(len(obs))

    def act_deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """argmax_a π_θ(a|s), or the Gaussian's mean: the policy used to evaluate a saved model."""
        out = self.net(obs)
        return out.argmax(-1) if self.discrete else out


def categorical_entropy(logp: torch.Tensor) -> torch.Tensor:
    """H(π(·|s)) = -Σ_a π(a|s) log π(a|s), from log-probabilities over the last dimension."""
    return -(logp.exp() * logp).sum(-1)


def gaussian_log_prob(actions: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(a; μ, σ²) summed over action dimensions: Σ_d -(a_d-μ_d)²/(2σ_d²) - log σ_d - ½ log 2π."""
    return (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """H(N(μ, σ²)) summed over action dimensions: Σ_d ½ log(2πe) + log σ_d."""
    return (0.5 * np.log(2 * np.pi * np.e) + log_std).sum()


class NumpyPolicy:
    """a ~ π_θ(·|s) for collecting episodes: the network's forward pass in numpy, on a copy of
    its weights. For a handful of envs torch spends ~10 µs of overhead per layer, numpy ~1 µs,
    and acting is most of the cost of a step. Made anew from the policy before each batch."""

    def __init__(self, policy: Policy, rng: np.random.Generator):
        self.layers = [(m.weight.detach().cpu().numpy().T.copy(), m.bias.detach().cpu().numpy().copy())
                       for m in policy.net if isinstance(m, nn.Linear)]
        self.std = None if policy.discrete else np.exp(policy.log_std.detach().cpu().numpy())
        self.rng = rng

    def forward(self, obs: np.ndarray) -> np.ndarray:
        x = obs.astype(np.float32, copy=False)  # MuJoCo observes in float64; the policy is float32
        for i, (weight, bias) in enumerate(self.layers):
            x = x @ weight + bias
            if i < len(self.layers) - 1:
                x = np.tanh(x)
        return x

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        out = self.forward(obs)
        if self.std is None:  # Gumbel-max: argmax(logits - log e), e ~ Exp(1), is a sample of softmax(logits)
            # A float32 draw can be exactly 0, whose log is -inf; the smallest positive float
            # picks the same action (its noise, 87, beats any logit gap) without the warning.
            e = self.rng.standard_exponential(out.shape, dtype=out.dtype)
            return np.argmax(out - np.log(np.maximum(e, np.finfo(e.dtype).tiny)), axis=-1)
        return out + self.std * self.rng.standard_normal(out.shape, dtype=out.dtype)


# ---------------------------------------------------------------------------------------------
# 1. Sample complete episodes from π_θ
# ---------------------------------------------------------------------------------------------

@dataclass
class Episodes:
    """A batch of complete episodes laid out as the envs played them, each field (T, N, ...).

    Env i plays its episodes one after another in column i; `dones[t, i]` marks the last step
    of an episode (terminated or truncated); `mask[t, i]` is False for the steps that belong
    to no episode of the batch (a NEXT_STEP reset step, or steps after env i's quota).
    """
    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    mask: np.ndarray
    num_episodes: int
    complete: bool


def collect_episodes(envs, policy, episodes_per_env: int, seed: Optional[int] = None,
                     on_episode=None, max_steps: Optional[int] = None) -> Episodes:
    """Reset every env, then step until each has played `episodes_per_env` complete episodes.

    Every env plays the same number of episodes from a fresh start, so the batch is not
    biased towards short episodes (as it would be if it kept the first N episodes to end).
    An env that has played its quota keeps stepping (the vector env steps all together) but
    those steps are masked out. A truncated episode counts as complete: see `discounted_returns`.
    Box actions are stored as sampled and clipped to the space only for the env.
    Stepping stops after `max_steps` env steps (all envs together), the batch then `complete`
    only if every env has played its quota. `on_episode(returns, lengths)` hears of the batch's
    episodes once it is complete, and of no others: not of those an env plays while it waits,
    nor of the short ones that end within an incomplete batch (it is not trained on).
    """
    next_step_mode = envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    space = envs.single_action_space
    bounds = (space.low, space.high) if isinstance(space, gym.spaces.Box) else None
    obs, _ = envs.reset(seed=seed)
    num_envs = len(obs)
    played = np.zeros(num_envs, np.int64)
    resetting = np.zeros(num_envs, bool)
    steps = {"obs": [], "actions": [], "rewards": [], "dones": [], "mask": []}
    episode_returns, episode_lengths = [], []  # the env's own (RecordEpisodeStatistics), in order of ending
    while (played < episodes_per_env).any() and (max_steps is None or (len(steps["obs"]) + 1) * num_envs <= max_steps):
        action = policy(obs)
        steps["obs"].append(obs)
        steps["actions"].append(action)
        steps["mask"].append((played < episodes_per_env) & ~resetting)
        obs, reward, terminated, truncated, info = envs.step(action if bounds is None else np.clip(action, *bounds))
        done = terminated | truncated
        steps["rewards"].append(reward)
        steps["dones"].append(done)
        played += done & steps["mask"][-1]
        if next_step_mode:
            resetting = done
        if "_episode" in info:
            ended = info["_episode"] & steps["mask"][-1]
            episode_returns.extend(info["episode"]["r"][ended])
            episode_lengths.extend(info["episode"]["l"][ended])
    complete = bool((played >= episodes_per_env).all())
    if complete and on_episode is not None:
        on_episode(np.array(episode_returns), np.array(episode_lengths))
    if not steps["obs"]:  # no step fitted in max_steps
        return Episodes(*(np.zeros((0, num_envs)) for _ in range(5)), num_episodes=0, complete=False)
    return Episodes(obs=np.stack(steps["obs"]).astype(np.float32), actions=np.stack(steps["actions"]),
                    rewards=np.stack(steps["rewards"]).astype(np.float32), dones=np.stack(steps["dones"]),
                    mask=np.stack(steps["mask"]), num_episodes=episodes_per_env * num_envs, complete=complete)


# ---------------------------------------------------------------------------------------------
# 2. The math: rewards-to-go, their normalisation, the loss
# ---------------------------------------------------------------------------------------------

def discounted_returns(rewards: np.ndarray, dones: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = r_t + γ(1-done_t)G_{t+1} = Σ_{k=t}^{end} γ^{k-t} r_k, the reward-to-go of each step.

    Arrays (T, N), one env's episodes after one another in each column; `dones` marks each
    episode's last step. The seed's step 4 lists [r_T, r_T + γ r_{T-1}, ...], which weights
    the earlier reward by γ; the reward-to-go discounts the later ones, as here.
    A truncated episode (time limit) ends like a terminated one: REINFORCE has no critic to
    estimate what lies past the cut, and the time limit is part of the task the agent is
    scored on (its episodic return stops there), so J(θ) is the finite-horizon return.
    """
    returns = np.zeros_like(rewards)
    following = np.zeros_like(rewards[0])
    for t in reversed(range(len(rewards))):
        following = returns[t] = rewards[t] + gamma * (1.0 - dones[t]) * following
    return returns


def normalize_returns(returns: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Ĝ = (G - μ_G) / (σ_G + ε), over the batch: a baseline that lowers the gradient's variance."""
    return (returns - returns.mean()) / (returns.std() + eps)


def reinforce_loss(log_probs: torch.Tensor, returns: torch.Tensor, num_episodes: int) -> torch.Tensor:
    """L(θ) = -1/N Σ_i Σ_t log π_θ(a_t^i|s_t^i) Ĝ_t^i: its gradient is -∇_θ J(θ)."""
    return -(log_probs * returns).sum() / num_episodes


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def space_signature(envs) -> dict:
    action_space = envs.single_action_space
    return {"obs_dim": envs.single_observation_space.shape[0],
            "action_type": type(action_space).__name__,
            "action_dim": int(action_space.n) if isinstance(action_space, gym.spaces.Discrete) else action_space.shape[0]}


def save_checkpoint(path: str, args: Args, global_step: int, policy: Policy, optimizer, envs,
                    rng: np.random.Generator) -> None:
    # Plain tensors and Python scalars only, so `torch.load(weights_only=True)` can read it.
    write_atomically({"script": SCRIPT, "args": asdict(args), "global_step": global_step, "model": policy.state_dict(),
                      "optimizer": optimizer.state_dict(), "spaces": space_signature(envs),
                      # Kept for the contract all four scripts share: this script normalises nothing.
                      "obs_rms": None, "rng": rng_states(rng)}, path)


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
    missing = [key for key in ['args', 'model', 'spaces'] if key not in ckpt]
    if missing:
        raise UserError(f"{path} is an incomplete {SCRIPT} checkpoint (no {', '.join(missing)})")
    return ckpt


def load_checkpoint(path: str, env_id: str, envs) -> dict:
    """A checkpoint of this script whose spaces are `env_id`'s."""
    ckpt = read_checkpoint(path)
    if ckpt["spaces"] != space_signature(envs):
        raise UserError(f"{path} was trained on {ckpt['args']['env_id']}, whose spaces differ from {env_id}'s: "
                        f"pass --env-id {ckpt['args']['env_id']}")
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
    if args.total_timesteps == ckpt["global_step"]:  # a finished run: say why nothing happens
        print(f"{SCRIPT}: the run has taken all {args.total_timesteps} of its --total-timesteps; resume it with more to "
              "train on")
    ckpt["run_dir"] = os.path.dirname(os.path.abspath(path))
    return replace(args, save_model=True), ckpt


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------

def select_device(args: Args) -> torch.device:
    if args.cuda and not torch.cuda.is_available():
        print(f"{SCRIPT}: warning: --cuda given but no GPU is available; running on the CPU", file=sys.stderr)
    return torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")


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
        left = max(self.total - step, 0) / max(sps, 1e-9)
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
    """The env id as part of a folder's name: mypkg:MyEnv-v0 (or a namespaced ns/Env-v0) is no folder name."""
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


def ending(exit_code: Optional[int]) -> str:
    """How training ended, for the save's message. A second Ctrl-C raises KeyboardInterrupt wherever it lands,
    so it leaves no exit code (None, as a crash does) but is the exception still on its way out."""
    return "a second Ctrl-C" if exit_code is None and sys.exc_info()[0] is KeyboardInterrupt else ENDINGS[exit_code]


def report_end(exit_code: int, global_step: int) -> None:
    """Say how training ended and exit with its code: 0, 1 (NaN), 130 (Ctrl-C), 143 (SIGTERM)."""
    if exit_code == 1:
        print(f"{SCRIPT}: error: the loss or its gradient became NaN or infinite at step {global_step}; "
              "stopped before applying it", file=sys.stderr)
    elif exit_code:
        print(f"{SCRIPT}: stopped by {ENDINGS[exit_code]} at step {global_step}")
    if exit_code:
        sys.exit(exit_code)


def train(args: Args, resume: Optional[dict] = None) -> None:
    """Train from scratch, or from the checkpoint `resume` on (see `resumed_args`)."""
    render_offscreen(args.capture_video)  # a resumed run's --capture-video is the checkpoint's
    check_args(args)
    run_name = f"{folder_name(args.env_id)}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = resume["run_dir"] if resume else make_run_dir(run_name, args.capture_video)
    device = select_device(args)
    seed_everything(args)

    envs = make_envs(args.env_id, args.num_envs, args.seed, args.capture_video, run_name)
    policy = Policy(envs.single_observation_space.shape[0], envs.single_action_space).to(device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate, fused=device.type in ("cpu", "cuda"))
    rng = np.random.default_rng(args.seed)
    global_step = 0
    if resume:  # where the checkpoint left off (a batch's end: every batch starts new episodes anyway)
        policy.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        restore_rng_states(resume["rng"], rng)
        global_step = resume["global_step"]

    tracker = start_tracking(args, run_dir) if args.track else None
    from torch.utils.tensorboard import SummaryWriter  # slow to import; evaluation needs none
    # Resumed, what was logged after the checkpoint is dropped: no step is logged twice.
    writer = SummaryWriter(run_dir, purge_step=global_step + 1 if resume else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                    "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    print(f"{SCRIPT}: logs in {run_dir}/" + (f", videos in videos/{run_name}/" if args.capture_video else ""))

    status = StatusLine(args.total_timesteps, global_step)
    recent_returns = collections.deque(maxlen=100)  # the batches' episodes, for the status line
    batch_episodes = []  # logged at the step count the batch ends on, as its losses are

    def on_episode(returns, lengths):
        recent_returns.extend(returns)
        batch_episodes.extend(zip(returns, lengths))

    start_time = time.time()
    next_checkpoint = start_time + args.checkpoint_every
    first_batch = True
    stop = StopRequest()
    exit_code = None  # stays None if anything but the ends below leaves the loop (a crash)
    try:
        while global_step < args.total_timesteps:
            if stop.requested:  # Ctrl-C or SIGTERM: stop here, between two batches
                break
            # 1. Sample N complete episodes from π_θ (an env's first reset is seeded).
            batch = collect_episodes(envs, NumpyPolicy(policy, rng),
                                     args.episodes_per_update // args.num_envs,
                                     seed=args.seed if first_batch else None, on_episode=on_episode,
                                     max_steps=args.total_timesteps - global_step)
            first_batch = False
            global_step += batch.mask.size
            if not batch.complete:  # --total-timesteps ran out before the batch's episodes ended
                if global_step - batch.mask.size == status.first_step:  # this process's first batch: say so
                    print(f"{SCRIPT}: --total-timesteps ran out before {args.episodes_per_update} episodes ended: "
                          "nothing was learned; give it more steps")
                break
            for r, l in batch_episodes:
                writer.add_scalar("charts/episodic_return", r, global_step)
                writer.add_scalar("charts/episodic_length", l, global_step)
            batch_episodes.clear()

            # 2. Rewards-to-go G_t, normalised over the batch's steps.
            returns = discounted_returns(batch.rewards, batch.dones, args.gamma)[batch.mask]
            returns = torch.from_numpy(returns).to(device)
            if args.normalize_returns:
                returns = normalize_returns(returns)

            # 3. One gradient step on L(θ) = -1/N Σ_i Σ_t log π_θ(a_t|s_t) Ĝ_t.
            obs = torch.from_numpy(batch.obs[batch.mask]).to(device)
            actions = torch.from_numpy(batch.actions[batch.mask]).to(device)
            log_probs, entropy = policy.log_prob_and_entropy(obs, actions)
            loss = reinforce_loss(log_probs, returns, batch.num_episodes)
            if not torch.isfinite(loss):
                raise NonFiniteLoss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            writer.add_scalar("losses/policy_loss", loss.item(), global_step)
            writer.add_scalar("losses/entropy", entropy.mean().item(), global_step)
            writer.add_scalar("charts/SPS", int((global_step - status.first_step) / (time.time() - start_time)),
                              global_step)
            status.update(global_step, recent_returns)
            if args.save_model and time.time() >= next_checkpoint:  # nothing learned is lost to a kill
                writer.flush()  # the logs up to the checkpoint reach the disk with it
                save_checkpoint(f"{run_dir}/model.pt", args, global_step, policy, optimizer, envs, rng)
                next_checkpoint = time.time() + args.checkpoint_every
        exit_code = stop.exit_code  # 0, or 130 after Ctrl-C, 143 after SIGTERM
    except NonFiniteLoss:
        exit_code = 1
    finally:  # every way out, a crash included: keep what was learned, close the logs
        stop.restore()
        status.update(global_step, recent_returns, force=True)
        status.close()
        writer.flush()  # the logs up to the final checkpoint reach the disk before it, as at every save
        if args.save_model:
            save_checkpoint(f"{run_dir}/model.pt", args, global_step, policy, optimizer, envs, rng)
            print(f"{SCRIPT}: model saved to {run_dir}/model.pt ({ending(exit_code)})")
        writer.close()
        envs.close()
        if tracker:
            finish_tracking(tracker, f"videos/{run_name}", exit_code)
    report_end(exit_code, global_step)


def evaluate(args: Args) -> None:
    """Run the deterministic policy of a saved model for `eval_episodes` episodes; train nothing."""
    args = replace(args, eval_checkpoint=checkpoint_file(args.eval_checkpoint))
    render_offscreen(args.capture_video)
    check_args(args)
    device = select_device(args)
    seed_everything(args)
    run_name = f"{folder_name(args.env_id)}__{args.exp_name}-eval__{args.seed}__{int(time.time())}"
    if args.capture_video:  # the videos' folder must be writable before the episodes are played
        make_run_dir(run_name, True)
    # One env per episode, so short episodes are not over-represented in the mean.
    envs = make_envs(args.env_id, args.eval_episodes, args.seed, args.capture_video, run_name, record_every_env=True)
    ckpt = load_checkpoint(args.eval_checkpoint, args.env_id, envs)
    policy = Policy(envs.single_observation_space.shape[0], envs.single_action_space).to(device)
    try:
        policy.load_state_dict(ckpt["model"])
    except RuntimeError:  # same script and spaces, other layer shapes (another version of it)
        raise UserError(f"{args.eval_checkpoint}'s weights do not fit this {SCRIPT}'s network") from None
    space = envs.single_action_space

    returns = np.full(args.eval_episodes, np.nan)
    obs, _ = envs.reset(seed=args.seed)
    with torch.inference_mode():
        while np.isnan(returns).any():
            action = policy.act_deterministic(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()
            if isinstance(space, gym.spaces.Box):
                action = np.clip(action, space.low, space.high)
            obs, _, _, _, info = envs.step(action)
            if "_episode" in info:
                first = info["_episode"] & np.isnan(returns)
                returns[first] = info["episode"]["r"][first]
    envs.close()

    print(f"eval: {args.eval_episodes} episode{'s' * (args.eval_episodes != 1)} of {args.env_id}: "
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
        if args.resume:
            train(*resumed_args(argv, args.resume))
        else:
            evaluate(trained_env(args, argv)) if args.eval_checkpoint else train(args)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per process
            print(f"{SCRIPT}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before training started, or during an evaluation: nothing to save
        print(f"{SCRIPT}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
