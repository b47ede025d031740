"""Synchronous Advantage Actor-Critic (A2C), in one file.

The actor-critic the seed tutorial derives, in its synchronous, parallel form: one network
with a shared body and two heads, the policy π_θ(a|s) and the value V(s). N actors step
together; every n steps the n-step returns R_t are bootstrapped from V(s_{t+n}), and one
gradient step is taken on

    L = L^A + c_v L^C - c_e H,   L^A = -E[log π_θ(a_t|s_t) A_t],  A_t = R_t - V(s_t),
    L^C = E[Huber(R_t - V(s_t))],  H = the entropy of π_θ(·|s_t).

    python a2c.py --env-id CartPole-v1
    python a2c.py --env-id Pendulum-v1           # a Gaussian head for Box actions
    python a2c.py --eval-checkpoint runs/RUN/model.pt
    python a2c.py --env-id ALE/Breakout-v5       # game frames: the Nature-DQN CNN as the body

Two corrections to the seed: its combined loss L^A - L^C - L^S subtracts the critic loss,
which would maximise the critic's error, and it says "we'd prefer lower entropy" where it
means higher: the entropy bonus is there to keep the policy from collapsing too early.
Gymnasium 1.x: no n-step return runs across an episode's end; a truncated episode (time
limit) bootstraps from V(final observation), a terminated one does not.
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
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal, Optional

# Read once, when torch loads its OpenMP runtime (libgomp): after each operation torch's threads busy-wait
# 300,000 spins for the next one, on the very cores the Atari emulator's threads then need to step the envs.
# 30,000 spins still bridge the gaps inside one pass of the network. Breakout on 2 cores, 60 s runs in turn:
# 1,218 and 1,227 SPS against 1,073 and 1,110 (passive waiting, 0 spins: 1,048 and 1,152). A user's own
# setting of either variable wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from gymnasium.vector import AutoresetMode

try:  # registers the Atari ids (ALE/Breakout-v5, BreakoutNoFrameskip-v4) when ale-py is installed
    import ale_py
    gym.register_envs(ale_py)
except (ImportError, OSError):  # not installed, or its library cannot load (Windows without the VC++ runtime)
    ale_py = None

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
    (episodes 0, 1, 8, 27, ..., then every 1000th); with --eval-checkpoint, of every evaluated episode
    (Atari: the 84x84 frames the agent sees)"""
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
    total_timesteps: Optional[int] = None
    """total env steps of the experiment (unset: 1M for vectors; 10M for frames, the Atari literature's budget)"""
    learning_rate: Optional[float] = None
    """the learning rate of the optimizer (unset: 3e-3 for vectors, 7e-4 for frames)"""
    num_envs: Optional[int] = None
    """the number of synchronous actors, parallel envs (unset: 8 for vectors, 16 for frames)"""
    num_steps: Optional[int] = None
    """n: each actor's steps between updates, the n-step return's horizon (unset: 16 vectors, 5 frames)"""
    anneal_lr: bool = True
    """toggle learning-rate annealing (linear, to zero at the end of training)"""
    gamma: Optional[float] = None
    """the discount factor gamma (unset: 0.999 for vectors, 0.99 for frames)"""
    norm_adv: tyro.conf.DisallowNone[Optional[bool]] = None  # --norm-adv/--no-norm-adv; unset: by kind
    """toggles normalising the advantages over each batch, mean 0 and std 1 (unset: on for vectors, off for frames)"""
    norm_obs: bool = True
    """toggles standardising vector observations by their running mean and variance (saved with the
    model); frames never are: the network scales them to [0, 1]"""
    norm_reward: bool = True
    """toggles dividing rewards by the running std of the discounted return, for vector observations;
    never for frames (Atari clips rewards to their sign: --atari-clip-reward)"""
    optimizer: Literal["rmsprop", "adam"] = "rmsprop"
    """RMSprop (alpha 0.99, eps 1e-5) as in the A2C/A3C paper, or Adam (eps 1e-5)"""
    vf_loss: Literal["huber", "mse"] = "huber"
    """the critic's loss of R_t - V(s_t): Huber (δ = 1), as the seed says, or squared error"""
    ent_coef: Optional[float] = None
    """c_e, coefficient of the entropy bonus (unset: 0 for vectors, 0.01 for frames)"""
    vf_coef: Optional[float] = None
    """c_v, coefficient of the critic loss (unset: 0.5 for vectors, 0.25 for frames)"""
    max_grad_norm: float = 0.5
    """the maximum norm for the global gradient clipping"""

    cnn_precision: Literal["auto", "bfloat16", "float32"] = "auto"
    """frames: the CNN body's arithmetic (the heads and losses stay float32); auto is bfloat16 where the
    device does it natively (a CPU with AMX or AVX512-BF16, a GPU with bf16), else float32"""
    atari_noop_max: int = 30
    """Atari: at most this many no-op actions at the start of a game, so starts differ"""
    atari_frame_skip: int = 4
    """Atari: each action repeats for this many frames; the last two are max-pooled (flicker)"""
    atari_frame_stack: int = 4
    """Atari: the observation is this many 84x84 greyscale frames, newest last"""
    atari_fire_reset: bool = True
    """Atari: press FIRE at the start of a game where the game needs it to begin"""
    atari_episodic_life: bool = True
    """Atari: a lost life ends the learner's episode (the game goes on; the logged score is the whole game's)"""
    atari_clip_reward: bool = True
    """Atari: the learner sees each reward's sign, -1, 0 or 1 (the logged score is unclipped)"""
    atari_sticky_actions: Optional[float] = None
    """Atari: the probability the previous action repeats (unset: the id's, 0.25 for v5, 0 for NoFrameskip-v4)"""

    eval_checkpoint: Optional[str] = None
    """evaluate this saved model (its model.pt or its run's folder; deterministic policy) instead of training"""
    eval_episodes: int = 10
    """the number of episodes to evaluate a saved model for"""


# What an unset flag becomes, by observation kind: (vectors, frames). The vector settings were chosen
# on the suite of README "Defaults"; the frame settings are rl-baselines3-zoo's for A2C on Atari
# (the A2C paper's n = 5 steps, 16 actors), but for our Huber critic loss. Frames keep the advantages
# as they are, as the A2C paper and rl-zoo do: normalised over 80 transitions of sparse clipped
# rewards, their noise drove Breakout's policy to one action (entropy 1.39 -> 0.001 by 270k steps, measured).
DEFAULTS = {"total_timesteps": (1_000_000, 10_000_000), "learning_rate": (3e-3, 7e-4), "num_envs": (8, 16),
            "num_steps": (16, 5), "gamma": (0.999, 0.99), "ent_coef": (0.0, 0.01), "vf_coef": (0.5, 0.25),
            "norm_adv": (True, False)}


def with_defaults(args: Args, frames: bool) -> Args:
    """`args` with every unset flag of DEFAULTS set for the observation kind; a flag given always wins."""
    return replace(args, **{name: kinds[frames] for name, kinds in DEFAULTS.items() if getattr(args, name) is None})


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit code 2."""


class NonFiniteGradient(Exception):
    """The loss or its gradient became NaN or infinite: training stops before applying it, exit code 1."""


def looks_atari(env_id: str) -> bool:
    """An Atari id by its name (ALE/Breakout-v5, BreakoutNoFrameskip-v4), known before the env is looked up."""
    name = env_id.split(":")[-1]  # ale_py:ALE/Breakout-v5 too
    return name.startswith("ALE/") or "NoFrameskip" in name


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
                  eval_episodes=args.eval_episodes, atari_frame_skip=args.atari_frame_skip,
                  atari_frame_stack=args.atari_frame_stack)
    for name, value in counts.items():
        if value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.eval_checkpoint is None:  # training's batches: an evaluation plays --eval-episodes episodes
        batch_size = args.num_envs * args.num_steps
        world_size = int(os.environ.get("WORLD_SIZE", 1))  # under torchrun an update takes every rank's steps
        if args.total_timesteps < batch_size * world_size:
            raise UserError(f"--total-timesteps {args.total_timesteps} is less than one update's steps "
                            f"(--num-envs {args.num_envs} x --num-steps {args.num_steps} = {batch_size}"
                            + (f", x {world_size} ranks" if world_size > 1 else "") + ")")
    if looks_atari(args.env_id):  # ale-py's vector env
        if args.seed + max(args.num_envs, args.eval_episodes) >= 2**31:  # one int32 seed per env
            raise UserError(f"--seed must be less than 2^31 - {max(args.num_envs, args.eval_episodes)} for Atari ids")
    if args.capture_video and importlib.util.find_spec("moviepy") is None:
        raise UserError("--capture-video needs moviepy: pip install moviepy")
    if args.track and importlib.util.find_spec("wandb") is None:
        raise UserError("--track needs Weights & Biases: pip install wandb")
    if args.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be 0 or more seconds, got {args.checkpoint_every}")
    if args.atari_noop_max < 0:
        raise UserError(f"--atari-noop-max must be 0 or more, got {args.atari_noop_max}")
    if args.atari_sticky_actions is not None and not 0.0 <= args.atari_sticky_actions <= 1.0:
        raise UserError(f"--atari-sticky-actions must lie in [0, 1], got {args.atari_sticky_actions}")
    if not 0.0 < args.gamma <= 1.0:
        raise UserError("--gamma must lie in (0, 1]")
    for name, value in dict(learning_rate=args.learning_rate, max_grad_norm=args.max_grad_norm).items():
        if value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")


# ---------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------

ATARI_ONLY = tuple(field.name for field in fields(Args) if field.name.startswith("atari_"))
FRAMES_ONLY = ("cnn_precision",)


def as_flag(name: str, value) -> str:
    """A flag as the command line writes it: --atari-noop-max 3, --no-atari-fire-reset."""
    if isinstance(value, bool):
        return f"--{'no-' * (not value)}{name.replace('_', '-')}"
    return f"--{name.replace('_', '-')} {value}"


def check_flags_apply(args: Args, frames: bool) -> None:
    """An --atari-* flag for an env that is no Atari game, or --cnn-precision for an env without frames, would do
    nothing: one line, not silence. (A flag given as its default cannot be told from one left unset.)"""
    atari = frames and is_atari(env_spec(args.env_id))
    for names, applies, why_not in ((ATARI_ONLY, atari, "Atari ids only, and {} is not one"),
                                    (FRAMES_ONLY, frames, "frames only (uint8 images, channels first), and {} "
                                                          "does not give them")):
        given = [as_flag(name, getattr(args, name)) for name in names if getattr(args, name) != getattr(Args, name)]
        if given and not applies:
            raise UserError(f"{', '.join(given)}: for {why_not.format(args.env_id)}")


def env_spec(env_id: str) -> gym.envs.registration.EnvSpec:
    """The registered spec of `env_id`; `module:EnvId-v0` imports `module` first, as gym.make does."""
    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UserError(f"cannot import {module!r} for --env-id {env_id} ({e})") from None
    try:
        return gym.spec(name)
    except gym.error.Error as e:
        hint = " (Atari ids need ale-py: pip install ale-py)" if ale_py is None and looks_atari(env_id) else ""
        raise UserError(f"unknown env id {env_id!r} ({e}){hint}") from None


def is_atari(spec: gym.envs.registration.EnvSpec) -> bool:
    return spec.entry_point == "ale_py.env:AtariEnv"


def is_image(space: gym.Space) -> bool:
    """An image observation: a (channels, height, width) Box of uint8, as Atari's frame stack, with fewer
    channels than pixels a side and at least 36 pixels a side (the least the Nature CNN takes)."""
    if not (isinstance(space, gym.spaces.Box) and len(space.shape) == 3 and space.dtype == np.uint8):
        return False
    channels, height, width = space.shape
    return channels < min(height, width) and min(height, width) >= 36


def observes_frames(env_id: str) -> bool:
    """Whether `env_id` gives image observations: they pick the CNN and the frame defaults."""
    spec = env_spec(env_id)
    if is_atari(spec):
        return True
    try:
        probe = gym.make(env_id)
    except gym.error.Error:  # make_envs says what is wrong (or makes it as a vector env only)
        return False
    probe.close()
    return is_image(probe.observation_space)


def render_offscreen(capture_video: bool) -> None:
    """With no display, record videos off screen: MuJoCo through EGL, SDL (classic control) to no window and
    no noise. Set before either is imported (the first gym.make); a user's own setting wins."""
    if capture_video and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("MUJOCO_GL", "egl")
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


def make_envs(args: Args, num_envs: int, run_name: str = "", record_every_env: bool = False) -> gym.vector.VectorEnv:
    """N copies of `args.env_id` stepping together, with episode statistics recorded.

    The env's own vectorised implementation is used where it has one (CartPole's steps all
    envs in one numpy call), otherwise a SyncVectorEnv; both autoreset NEXT_STEP, which
    Gymnasium's vector-level normalisation wrappers (`add_normalization`) require.
    Atari ids get ale-py's vector env (`make_atari_envs`), NEXT_STEP too. With --capture-video,
    env 0 is filmed, or with `record_every_env` (evaluation) each env's first episode.
    """
    env_id, capture_video = args.env_id, args.capture_video
    spec = env_spec(env_id)
    if is_atari(spec):
        envs = make_atari_envs(args, spec, num_envs)
        fps = 60 / args.atari_frame_skip  # the games run at 60 frames a second
        return RecordGames(envs, f"videos/{run_name}", record_every_env, fps) if capture_video else envs
    if capture_video:  # rendering needs a package of its own (pygame), or OpenGL (MuJoCo)
        try:
            probe = gym.make(env_id, render_mode="rgb_array")
            probe.reset(seed=args.seed)
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
                                            autoreset_mode=AutoresetMode.NEXT_STEP)
    except gym.error.Error as e:
        raise UserError(f"cannot make {env_id!r}: {e}") from None
    action_space = envs.single_action_space
    if not isinstance(action_space, (gym.spaces.Discrete, gym.spaces.Box)) or (
            isinstance(action_space, gym.spaces.Box) and len(action_space.shape) != 1):
        envs.close()
        raise UserError(f"{env_id} has action space {action_space}; {SCRIPT} needs Discrete or a flat Box")
    obs_space = envs.single_observation_space
    if not (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1 or is_image(obs_space)):
        envs.close()
        raise UserError(f"{env_id} has observation space {obs_space}; {SCRIPT} needs a flat Box "
                        "or a (channels, height, width) image of uint8")
    if is_image(obs_space) and not isinstance(action_space, gym.spaces.Discrete):
        envs.close()
        raise UserError(f"{env_id} has image observations and {action_space} actions; {SCRIPT} learns "
                        "from frames with Discrete actions only")
    return gym.wrappers.vector.RecordEpisodeStatistics(envs, buffer_length=100)


def sticky_actions(args: Args, spec: gym.envs.registration.EnvSpec) -> float:
    """The probability an Atari game repeats the previous action instead of the one taken: --atari-sticky-actions,
    or the id's (v5: 0.25, NoFrameskip-v4: 0)."""
    given = args.atari_sticky_actions
    return spec.kwargs.get("repeat_action_probability", 0.0) if given is None else given


def make_atari_envs(args: Args, spec: gym.envs.registration.EnvSpec, num_envs: int) -> gym.vector.VectorEnv:
    """ale-py's vector env (C++ threads) with the standard preprocessing, as the learner sees it.

    Inside: no-op starts, frame skip with max-pooling, 84x84 greyscale, a frame stack, FIRE at
    the start; sticky actions as the id sets them (v5: 0.25, NoFrameskip-v4: 0) unless
    --atari-sticky-actions. It autoresets NEXT_STEP. Rewards reach RecordEpisodeStatistics
    unclipped and games end only at game over, so the logged return is the game's score;
    `AtariLearnerView` then clips rewards and ends the learner's episode at each lost life.
    """
    envs = ale_py.vector_env.AtariVectorEnv(
        spec.kwargs["game"], num_envs, repeat_action_probability=sticky_actions(args, spec),
        max_num_frames_per_episode=spec.kwargs.get("max_num_frames_per_episode", 108_000),
        frameskip=args.atari_frame_skip, stack_num=args.atari_frame_stack, noop_max=args.atari_noop_max,
        use_fire_reset=args.atari_fire_reset, reward_clipping=False, episodic_life=False)
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs, buffer_length=100)
    return AtariLearnerView(envs, args.atari_episodic_life, args.atari_clip_reward)


class AtariLearnerView(gym.vector.VectorWrapper):
    """What the learner sees of an Atari game: each reward's sign, and a lost life as an episode's end.

    A lost life ends the learner's episode (no bootstrapping past it) but not the game: no reset
    follows, so `info["atari_game_over"]` keeps the env's own end for the rollout's reset bookkeeping.
    """

    def __init__(self, envs: gym.vector.VectorEnv, episodic_life: bool, clip_reward: bool):
        super().__init__(envs)
        self.episodic_life, self.clip_reward = episodic_life, clip_reward
        self.return_queue = envs.return_queue

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.lives = info["lives"]
        return obs, info

    def step(self, actions):
        obs, rewards, terminations, truncations, info = self.env.step(actions)
        info["atari_game_over"] = terminations | truncations
        rewards, terminations, self.lives = learner_signal(rewards, terminations, info["lives"], self.lives,
                                                           self.episodic_life, self.clip_reward)
        return obs, rewards, terminations, truncations, info


def filmed_game(n: int) -> bool:
    """Whether training films env 0's game n (from 0): RecordVideo's schedule, cubes below 1000, then every 1000th."""
    return round(n ** (1 / 3)) ** 3 == n if n < 1000 else n % 1000 == 0


class RecordGames(gym.vector.VectorWrapper):
    """Videos of Atari games as the agent sees them, the newest 84x84 frame of each observation shown twice
    the size (ale-py's vector env renders nothing). Evaluating (`every_env`): each env's first game,
    `FOLDER/eval-I.mp4`. Training: env 0's games on RecordVideo's schedule (game 0, 1, 8, 27, ..., 729, 1000,
    then every 1000th), `FOLDER/rl-video-episode-N.mp4`. A video is written when its game ends, or as far as
    it got when the envs close."""

    def __init__(self, envs: gym.vector.VectorEnv, folder: str, every_env: bool, fps: float):
        super().__init__(envs)
        self.folder, self.every_env, self.fps = folder, every_env, fps
        self.games = [[] for _ in range(envs.num_envs)]
        self.filming = np.full(envs.num_envs, every_env)
        self.filming[0] = True
        self.env_0_games = 0

    def film(self, obs: np.ndarray) -> None:
        for i in np.flatnonzero(self.filming):
            self.games[i].append(obs[i, -1].copy())

    def write(self, i: int) -> None:
        """Env i's game so far as a video: eval-I.mp4, or in training rl-video-episode-N.mp4 (env 0's game N)."""
        from moviepy import VideoClip
        name = f"eval-{i}" if self.every_env else f"rl-video-episode-{self.env_0_games}"
        game, self.games[i] = self.games[i], []
        def frame(t):  # made as the video is encoded: a long game's frames, enlarged, would fill the memory
            grey = game[min(round(t * self.fps), len(game) - 1)]
            return np.repeat(np.repeat(grey, 2, 0), 2, 1)[..., None].repeat(3, -1)
        os.makedirs(self.folder, exist_ok=True)
        # moviepy encodes int(duration * fps) frames: half a frame more keeps the last (the game's end) whole
        VideoClip(frame, duration=(len(game) + 0.5) / self.fps).write_videofile(f"{self.folder}/{name}.mp4",
                                                                                fps=self.fps, logger=None)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.film(obs)
        return obs, info

    def step(self, actions):
        obs, rewards, terminations, truncations, info = self.env.step(actions)
        self.film(obs)
        game_over = info.get("_episode", np.zeros(self.num_envs, bool))
        for i in np.flatnonzero(self.filming & game_over):
            self.write(i)
            self.filming[i] = False
        if not self.every_env and game_over[0]:  # the next game's first frame comes with the next (reset) step
            self.env_0_games += 1
            self.filming[0] = filmed_game(self.env_0_games)
        return obs, rewards, terminations, truncations, info

    def close(self, **kwargs):
        """A game being filmed when training stops (at its end, Ctrl-C, SIGTERM) is written as far as it got."""
        for i in np.flatnonzero(self.filming & [len(game) > 1 for game in self.games]):
            self.write(i)
        return super().close(**kwargs)


def learner_signal(rewards: np.ndarray, terminations: np.ndarray, lives: np.ndarray, previous_lives: np.ndarray,
                   episodic_life: bool, clip_reward: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sign(r) if clip_reward, term or a life lost (lives < previous) if episodic_life, lives).

    On a NEXT_STEP reset step the lives jump to the new game's; should they be fewer (a game cut
    by the frame limit with bonus lives), the step is a reset step, masked, and learned from by no one.
    """
    if clip_reward:
        rewards = np.sign(rewards).astype(np.float32)
    if episodic_life:
        terminations = terminations | (lives < previous_lives)
    return rewards, terminations, lives.copy()


def add_normalization(envs, norm_obs: bool, norm_reward: bool, gamma: float):
    """Wrap `envs` so observations are standardised by their running mean and variance over all
    envs, and rewards divided by the running std of the discounted return (Gymnasium's vector
    wrappers, as SB3's VecNormalize). Returns (envs, the observation wrapper, the reward wrapper).

    With a shared body, unscaled inputs and returns let the critic's error swamp the policy:
    without these, A2C does not learn Acrobot (measured: -500 after 500k steps in every seed).
    The final observation of an episode passes through the same wrapper as every other, so a
    truncation's bootstrap value sees it normalised alike.
    """
    obs_norm = reward_norm = None
    if norm_obs:
        envs = obs_norm = gym.wrappers.vector.NormalizeObservation(envs)
    if norm_reward:
        envs = reward_norm = NormalizeReward(envs, gamma=gamma)
    return envs, obs_norm, reward_norm


class NormalizeReward(gym.wrappers.vector.NormalizeReward):
    """Rewards divided by the running std of G_t = r_t + γ G_{t-1}, which restarts at 0 after every
    episode end, a truncation included; NEXT_STEP reset steps take no part.

    The scale estimated is that of an episode's discounted return, and after a time limit the
    next rewards belong to a new episode: ppo_continuous.py and SB3's VecNormalize restart there
    too. Gymnasium 1.4's wrapper, in NEXT_STEP mode, carries a truncated episode's return (and
    the last reward of a terminated one) into the next episode.
    """

    def __init__(self, env, gamma: float):
        super().__init__(env, gamma=gamma)
        self.after_done = np.zeros(self.num_envs, bool)

    def reset(self, **kwargs):
        self.after_done[:] = False
        return super().reset(**kwargs)

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        real = ~self.after_done  # in NEXT_STEP mode the step after an episode's end is a reset
        self.accumulated_reward[real] = self.gamma * self.accumulated_reward[real] + reward[real]
        if self.update_running_mean and real.any():
            self.return_rms.update(self.accumulated_reward[real])
        done = terminated | truncated
        self.accumulated_reward[done] = 0.0
        if self.env.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP:
            self.after_done = done
        return obs, reward / np.sqrt(self.return_rms.var + self.epsilon), terminated, truncated, info


def frozen_obs_normalization(envs, stats: dict):
    """`envs` with observations standardised by saved statistics that no longer update."""
    envs, obs_norm, _ = add_normalization(envs, True, False, 1.0)
    obs_norm.obs_rms.mean = stats["mean"].numpy()
    obs_norm.obs_rms.var = stats["var"].numpy()
    obs_norm.obs_rms.count = stats["count"]
    obs_norm.update_running_mean = False
    return envs


def merge_moments(a: tuple, b: tuple) -> tuple:
    """(μ, σ², n) of two sets together: δ = μ_B - μ_A, n = n_A + n_B, μ = μ_A + δ n_B/n, σ² = (n_A σ_A² + n_B σ_B² + δ² n_A n_B/n) / n."""
    (mean_a, var_a, n_a), (mean_b, var_b, n_b) = a, b
    delta, n = mean_b - mean_a, n_a + n_b
    return mean_a + delta * n_b / n, (var_a * n_a + var_b * n_b + delta ** 2 * n_a * n_b / n) / n, n


def unmerge_moments(total: tuple, a: tuple) -> tuple:
    """(μ_B, σ²_B, n_B) of what `total` = A ∪ B holds beyond A: `merge_moments` solved for B (zeros if n_B = 0)."""
    (mean, var, n), (mean_a, var_a, n_a) = total, a
    n_b = n - n_a
    if n_b <= 0:
        return np.zeros_like(mean), np.zeros_like(var), 0.0
    mean_b = (n * mean - n_a * mean_a) / n_b
    return mean_b, (n * var - n_a * var_a - (mean_b - mean_a) ** 2 * n_a * n_b / n) / n_b, n_b


def running_stats(rms) -> Optional[dict]:
    """A RunningMeanStd as plain tensors and a float, for a weights_only checkpoint."""
    if rms is None:
        return None
    return {"mean": torch.as_tensor(rms.mean), "var": torch.as_tensor(rms.var), "count": float(rms.count)}


# ---------------------------------------------------------------------------------------------
# The network: a shared body, an actor head π_θ(a|s) and a critic head V(s)
# ---------------------------------------------------------------------------------------------

def layer_init(layer: nn.Module, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    """Orthogonal weights with gain `std`, constant bias."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Pixels(nn.Module):
    """uint8 frames to floats in [0, 1], inside the network: the rollout stores a quarter of the bytes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Straight to the dtype the first convolution computes in (bfloat16 under autocast), not float32
        # and then a cast: one pass over the frames. Every uint8 value divides to the same number either way.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
        return x.to(dtype).div_(255.0)


def nature_cnn(obs_shape: tuple) -> nn.Sequential:
    """The Nature-DQN encoder: conv 32 8x8/4, 64 4x4/2, 64 3x3/1, then 512 units; ReLU throughout."""
    convs = nn.Sequential(
        Pixels(),
        layer_init(nn.Conv2d(obs_shape[0], 32, 8, stride=4)), nn.ReLU(),
        layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
        layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(),
        nn.Flatten(),
    )
    with torch.no_grad():  # 3136 for 84x84 frames
        n_flat = convs(torch.zeros((1,) + tuple(obs_shape), dtype=torch.uint8)).shape[1]
    return nn.Sequential(*convs, layer_init(nn.Linear(n_flat, 512)), nn.ReLU())


def categorical_entropy(logp: torch.Tensor) -> torch.Tensor:
    """H(π(·|s)) = -Σ_a π(a|s) log π(a|s), from log-probabilities over the last dimension."""
    return -(logp.exp() * logp).sum(-1)


def gaussian_log_prob(actions: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(a; μ, σ²) summed over action dimensions: Σ_d -(a_d-μ_d)²/(2σ_d²) - log σ_d - ½ log 2π."""
    return (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """H(N(μ, σ²)) summed over action dimensions: Σ_d ½ log(2πe) + log σ_d."""
    return (0.5 * np.log(2 * np.pi * np.e) + log_std).sum()


class ActorCritic(nn.Module):
    """A body shared by two heads: the actor's logits (Discrete) or Gaussian mean with a learned
    log σ per action dimension (Box), and the critic's V(s). The body is a 64-64 tanh MLP for
    vectors and the Nature-DQN CNN for frames."""

    bf16 = False  # run the body in bfloat16 (set by `use_bf16`; not part of the saved weights)

    def __init__(self, obs_shape: tuple, action_space: gym.Space):
        super().__init__()
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        out_dim = int(action_space.n) if self.discrete else action_space.shape[0]
        if len(obs_shape) == 3:
            self.body, width = nature_cnn(obs_shape), 512
        else:
            self.body, width = nn.Sequential(
                layer_init(nn.Linear(obs_shape[0], 64)), nn.Tanh(),
                layer_init(nn.Linear(64, 64)), nn.Tanh(),
            ), 64
        # A small actor head starts the policy near uniform (or near mean 0), so it explores.
        self.actor = layer_init(nn.Linear(width, out_dim), std=0.01)
        self.critic = layer_init(nn.Linear(width, 1), std=1.0)
        self.log_std = None if self.discrete else nn.Parameter(torch.zeros(out_dim))

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(obs.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.body(obs).float()

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.features(obs)).squeeze(-1)

    def evaluate_actions(self, obs: torch.Tensor, actions: torch.Tensor):
        """(log π_θ(a|s), entropy of π_θ(·|s), V(s)) for given states and actions."""
        hidden = self.features(obs)
        out, value = self.actor(hidden), self.critic(hidden).squeeze(-1)
        if self.discrete:
            logp = torch.log_softmax(out, dim=-1)
            return logp.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1), categorical_entropy(logp), value
        entropy = gaussian_entropy(self.log_std).expand(len(obs))
        return gaussian_log_prob(actions, out, self.log_std), entropy, value

    def act_deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """argmax_a π_θ(a|s), or the Gaussian's mean: the policy used to evaluate a saved model."""
        out = self.actor(self.features(obs))
        return out.argmax(-1) if self.discrete else out

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(self.features(obs))


def use_bf16(precision: str, frames: bool, device: torch.device) -> bool:
    """Whether the CNN body runs in bfloat16: measured on a CPU with AMX, a gradient step on 256
    frames takes 86 ms instead of 226; where the hardware lacks it, bfloat16 is emulated and slower."""
    if not frames or precision == "float32":
        return False
    if precision == "bfloat16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    native = [getattr(torch.cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(native)


def as_used(args: Args, frames: bool, device: torch.device) -> dict:
    """The flags as logged (TensorBoard's hyperparameters, W&B's config), with what the run used where a flag
    leaves the choice to the env or the machine. The checkpoint keeps them as given: evaluated elsewhere, a
    model's --cnn-precision auto is that machine's, its unset sticky actions the id's it is evaluated on."""
    used = asdict(args)
    if frames:  # frames are never normalised: the network scales them to [0, 1] (Atari: --atari-clip-reward)
        used["cnn_precision"] = "bfloat16" if use_bf16(args.cnn_precision, frames, device) else "float32"
        used["norm_obs"] = used["norm_reward"] = False
    spec = env_spec(args.env_id)
    if is_atari(spec):
        used["atari_sticky_actions"] = sticky_actions(args, spec)
    return used


def sample_categorical(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """a = argmax_i(logits_i + g_i), g_i = -log e_i ~ Gumbel(0, 1), e_i ~ Exp(1), is a sample of softmax(logits)."""
    e = rng.standard_exponential(logits.shape, dtype=logits.dtype)
    # A float32 draw can be exactly 0, whose log is -inf; the smallest positive float picks the
    # same action (its g = 87 beats any logit gap) without the warning.
    return np.argmax(logits - np.log(np.maximum(e, np.finfo(e.dtype).tiny)), axis=-1)


class NumpyPolicy:
    """a ~ π_θ(·|s) for the rollout: body and actor head in numpy, on a copy of the weights.

    Acting is most of a rollout step's cost: for a handful of envs torch spends ~10 µs of
    overhead per layer, numpy ~1 µs. Made anew from the network before each rollout.
    """

    def __init__(self, agent: ActorCritic, rng: np.random.Generator):
        linears = [m for m in agent.body if isinstance(m, nn.Linear)] + [agent.actor]
        self.layers = [(m.weight.detach().cpu().numpy().T.copy(), m.bias.detach().cpu().numpy().copy())
                       for m in linears]
        self.std = None if agent.discrete else np.exp(agent.log_std.detach().cpu().numpy())
        self.rng = rng

    def forward(self, obs: np.ndarray) -> np.ndarray:
        x = obs
        for i, (weight, bias) in enumerate(self.layers):
            x = x @ weight + bias
            if i < len(self.layers) - 1:
                x = np.tanh(x)
        return x

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        out = self.forward(obs)
        if self.std is None:
            return sample_categorical(out, self.rng)
        return out + self.std * self.rng.standard_normal(out.shape, dtype=out.dtype)


class TorchPolicy:
    """a ~ π_θ(·|s) for the rollout from the torch network: for frames the CNN, not the numpy copy, is
    the cost; the uint8 frames go to it as they are (no float copy outside the network)."""

    def __init__(self, agent: ActorCritic, rng: np.random.Generator, device: torch.device):
        self.agent, self.rng, self.device = agent, rng, device

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = self.agent.logits(torch.from_numpy(obs).to(self.device)).cpu().numpy()
        return sample_categorical(logits, self.rng)


# ---------------------------------------------------------------------------------------------
# Rollout: n steps of N synchronous actors
# ---------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """n steps of N envs, each field shaped (n, N, ...), as numpy arrays.

    `next_obs[t]` is the state the transition at t led to: the final observation when the
    episode ended at t (so a truncated episode can bootstrap from it), else the next one.
    `valid[t]` is False for a NEXT_STEP env's reset step: the env ignores the action taken on
    the step after an episode ends, so that step is no transition to learn from.
    """
    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminations: np.ndarray
    truncations: np.ndarray
    next_obs: np.ndarray
    valid: np.ndarray

    @classmethod
    def empty(cls, num_steps: int, num_envs: int, obs_shape: tuple, action_space: gym.Space,
              obs_dtype=np.float32) -> "Rollout":
        """Frames are stored as the env gives them, uint8: a quarter of float32's bytes."""
        steps = (num_steps, num_envs)
        actions = (np.zeros(steps, np.int64) if isinstance(action_space, gym.spaces.Discrete)
                   else np.zeros(steps + action_space.shape, np.float32))
        return cls(obs=np.zeros(steps + tuple(obs_shape), obs_dtype), actions=actions,
                   rewards=np.zeros(steps, np.float32), terminations=np.zeros(steps, bool),
                   truncations=np.zeros(steps, bool), next_obs=np.zeros(steps + tuple(obs_shape), obs_dtype),
                   valid=np.ones(steps, bool))


def collect_rollout(envs, policy, rollout: Rollout, obs: np.ndarray, after_done: np.ndarray,
                    on_episode=None) -> tuple[np.ndarray, np.ndarray]:
    """Fill `rollout` with n steps of `policy` (observations -> actions) in `envs`, from `obs`.

    `after_done[i]` says env i ended an episode on the step before (in NEXT_STEP mode the
    next step is then a reset step). Returns the (obs, after_done) to continue from.
    Box actions are stored as sampled and clipped to the space only for the env. An env that
    ends the learner's episode without ending its own (Atari's lost life) says where its own
    episodes end in `info["atari_game_over"]`: only those are followed by a reset step.
    """
    next_step_mode = envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    space = envs.single_action_space
    bounds = (space.low, space.high) if isinstance(space, gym.spaces.Box) else None
    for t in range(rollout.obs.shape[0]):
        rollout.obs[t] = obs
        if next_step_mode:  # the step after an episode's end only resets the env: no transition
            rollout.valid[t] = ~after_done
        action = policy(rollout.obs[t])
        rollout.actions[t] = action

        obs, reward, terminated, truncated, info = envs.step(action if bounds is None else np.clip(action, *bounds))
        rollout.rewards[t] = reward
        rollout.terminations[t] = terminated
        rollout.truncations[t] = truncated
        rollout.next_obs[t] = obs
        if not next_step_mode and "_final_obs" in info:
            # SAME_STEP (a vector env built elsewhere; make_envs uses NEXT_STEP): `obs` is
            # already the first observation of the next episode.
            ended = info["_final_obs"]
            rollout.next_obs[t, ended] = np.stack(info["final_obs"][ended])
        if on_episode is not None and "_episode" in info:
            ended = info["_episode"]
            on_episode(info["episode"]["r"][ended], info["episode"]["l"][ended])
        after_done = info.get("atari_game_over", terminated | truncated)
    return obs, after_done


def next_state_values(agent: ActorCritic, rollout: Rollout, values: np.ndarray, device: torch.device) -> np.ndarray:
    """V(s') of the state each step led to, shaped (n, N). `values` is V(s_t) at the valid steps, in
    order, from the loss's forward pass: where step t+1 starts from the state step t led to (every step
    but the last, in NEXT_STEP mode) its value is reused, and the critic runs only on the rest (the last
    step, a reset step, a SAME_STEP episode's final observation). For frames a pass of the CNN is saved."""
    n, N = rollout.valid.shape
    known = np.zeros((n, N), values.dtype)
    known[rollout.valid] = values
    fresh = np.ones((n, N), bool)
    moved = rollout.next_obs[:-1] != rollout.obs[1:]  # (n - 1, N, *obs_shape), empty when n = 1
    fresh[:-1] = ~rollout.valid[1:] | moved.any(axis=tuple(range(2, moved.ndim)))
    next_values = np.empty_like(known)
    next_values[:-1] = known[1:]
    next_values[fresh] = agent.get_value(torch.from_numpy(rollout.next_obs[fresh]).to(device)).cpu().numpy()
    return next_values


# ---------------------------------------------------------------------------------------------
# The math: n-step returns, advantages and the loss terms, as pure functions
# ---------------------------------------------------------------------------------------------

def n_step_returns(rewards: np.ndarray, next_values: np.ndarray, terminations: np.ndarray,
                   truncations: np.ndarray, gamma: float) -> np.ndarray:
    """R_t = r_t + γ(1-term_t)·B_t, B_t = V(s_{t+1}) if the episode ended at t or t = n-1, else R_{t+1}.

    Arrays (n, N). `next_values[t]` is V of the state step t led to (the final observation
    when the episode ended at t). So R_t sums the rewards up to the episode's end or the
    rollout's, whichever comes first, and bootstraps there from V(s_{t+k}) unless the episode
    terminated: a truncated episode (time limit) is bootstrapped, a terminated one is not.
    """
    returns = np.zeros_like(rewards)
    following = next_values[-1]
    for t in reversed(range(len(rewards))):
        ended = terminations[t] | truncations[t]
        bootstrap = np.where(ended, next_values[t], following)
        following = returns[t] = rewards[t] + gamma * (1.0 - terminations[t]) * bootstrap
    return returns


def advantages(returns: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A_t = R_t - V(s_t), as a constant: the actor's loss must not move the critic."""
    return (returns - values).detach()


def normalize_advantages(advantages: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                         eps: float = 1e-8) -> torch.Tensor:
    """(A - mean A) / (std A + ε), the mean and std of one batch (all ranks' together: `union_mean_std`).
    One advantage has no std (NaN): it is left as it is, SB3's rule, not made NaN."""
    return torch.where(std.isnan(), advantages, (advantages - mean) / (std + eps))


def actor_loss(log_probs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """L^A = -E_t[log π_θ(a_t|s_t) A_t]."""
    return -(log_probs * advantages).mean()


def critic_loss(values: torch.Tensor, returns: torch.Tensor, kind: str = "huber") -> torch.Tensor:
    """L^C = E_t[Huber_1(R_t - V(s_t))] (½x² for |x| ≤ 1, |x| - ½ beyond), or E_t[(R_t - V(s_t))²]."""
    if kind == "huber":
        return F.huber_loss(values, returns, delta=1.0)
    return F.mse_loss(values, returns)


def a2c_loss(actor: torch.Tensor, critic: torch.Tensor, entropy: torch.Tensor, vf_coef: float,
             ent_coef: float) -> torch.Tensor:
    """L = L^A + c_v L^C - c_e H: descend the critic's error, ascend the entropy (the seed's L^A - L^C - L^S flips both)."""
    return actor + vf_coef * critic - ent_coef * entropy


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
# The update: one gradient step on L per rollout
# ---------------------------------------------------------------------------------------------

def a2c_update(agent: nn.Module, optimizer: torch.optim.Optimizer, log_probs: torch.Tensor, entropy: torch.Tensor,
               values: torch.Tensor, returns: torch.Tensor, args: Args, ranks: "Ranks") -> dict:
    """One gradient step on L = L^A + c_v L^C - c_e H, from log π_θ(a_t|s_t), its entropy and V(s_t) at the
    batch's transitions (still attached to θ) and their n-step returns R_t. Under torchrun the batch is the
    union of the ranks': its advantages are normalised together, its gradient is the mean of theirs."""
    b_advantages = advantages(returns, values)
    if args.norm_adv:
        b_advantages = normalize_advantages(b_advantages, *union_mean_std(b_advantages, ranks))
    pg_loss = actor_loss(log_probs, b_advantages)
    v_loss = critic_loss(values, returns, args.vf_loss)
    entropy_loss = entropy.mean()
    loss = a2c_loss(pg_loss, v_loss, entropy_loss, args.vf_coef, args.ent_coef)

    optimizer.zero_grad()
    loss.backward()
    average_gradients(agent, ranks)
    clip_gradients(agent, args.max_grad_norm)
    optimizer.step()
    return {"policy_loss": pg_loss.detach(), "value_loss": v_loss.detach(), "entropy": entropy_loss.detach()}


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


def average_gradients(agent: nn.Module, ranks: Ranks) -> None:
    """∇θ ← the mean of the ranks' ∇θ, all parameters in one flat all-reduce: every rank then takes the
    same optimizer step, so the ranks' θ stay identical (and a NaN on one rank is a NaN on all)."""
    if ranks.size > 1:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in agent.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(ranks.device)
        dist.all_reduce(flat)
        flat = (flat / ranks.size).to(grads[0].device)
        for p, g in zip(agent.parameters(), torch.split(flat, [g.numel() for g in grads])):
            p.grad = g.view_as(p)


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


def union_mean_std(x: torch.Tensor, ranks: Ranks) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and (n-1) std of the union of every rank's x: from the ranks' n, Σx, Σx² summed."""
    if ranks.size == 1:  # the std of one value is NaN, as below (torch's own would also warn)
        return x.mean(), x.std() if len(x) > 1 else x.new_tensor(math.nan)
    sums = torch.stack([torch.tensor(float(len(x)), dtype=torch.float64, device=x.device),
                        x.double().sum(), x.double().square().sum()]).to(ranks.device)
    dist.all_reduce(sums)
    n, total, squares = sums.tolist()
    mean = total / n if n else float("nan")  # no valid step on any rank (each a reset step): as torch's mean of none
    var = max(squares - n * mean * mean, 0.0) / (n - 1) if n > 1 else float("nan")  # as torch's std of one
    return x.new_tensor(mean), x.new_tensor(math.sqrt(var))


class RankStatistics:
    """Under torchrun, running statistics (the observations', the returns') of every rank's data. The
    wrappers update them at each step with the rank's own data; after each rollout every rank's
    moments since the last merge (its statistics less the merged ones: `unmerge_moments`) are
    gathered and merged in rank order, so every rank starts the next rollout normalising alike."""

    def __init__(self, running: list, ranks: Ranks):
        self.running, self.ranks = [rms for rms in running if rms is not None], ranks
        self.merged = [(rms.mean.copy(), rms.var.copy(), rms.count) for rms in self.running]

    def merge(self) -> None:
        if self.ranks.size == 1:
            return
        for i, rms in enumerate(self.running):
            mean, var, count = unmerge_moments((rms.mean, rms.var, rms.count), self.merged[i])
            mine = torch.from_numpy(np.concatenate([[count], np.ravel(mean), np.ravel(var)])).to(self.ranks.device)
            gathered = [torch.empty_like(mine) for _ in range(self.ranks.size)]
            dist.all_gather(gathered, mine)
            merged = self.merged[i]
            for m in (g.cpu().numpy() for g in gathered):
                if m[0] > 0:  # a rank that took in nothing adds nothing
                    merged = merge_moments(merged, (m[1:1 + mean.size].reshape(mean.shape),
                                                    m[1 + mean.size:].reshape(mean.shape), float(m[0])))
            rms.mean, rms.var, rms.count = merged
            self.merged[i] = (np.copy(merged[0]), np.copy(merged[1]), merged[2])


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
    action_space = envs.single_action_space
    return {"obs_shape": list(envs.single_observation_space.shape),
            "action_type": type(action_space).__name__,
            "action_dim": int(action_space.n) if isinstance(action_space, gym.spaces.Discrete) else action_space.shape[0]}


def save_checkpoint(path: str, args: Args, global_step: int, agent: ActorCritic, optimizer, envs,
                    obs_norm, reward_norm, rng: np.random.Generator) -> None:
    # Plain tensors and Python scalars only, so `torch.load(weights_only=True)` can read it.
    write_atomically({"script": SCRIPT, "args": asdict(args), "global_step": global_step,
                      "model": agent.state_dict(), "optimizer": optimizer.state_dict(), "spaces": space_signature(envs),
                      "obs_rms": running_stats(obs_norm and obs_norm.obs_rms),
                      "return_rms": running_stats(reward_norm and reward_norm.return_rms), "rng": rng_states(rng)},
                     path)


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


def restore_running_stats(rms, stats: Optional[dict]) -> None:
    if rms is not None and stats is not None:
        rms.mean, rms.var, rms.count = stats["mean"].numpy(), stats["var"].numpy(), stats["count"]


def as_trained(args: Args) -> Args:
    """`args` with the checkpoint's --atari-* flags: a model plays the game it was trained on (frame skip, stack,
    ...), and one given otherwise is one line. Sticky actions are the evaluation's to choose (the game's
    randomness, not what the network sees): --atari-sticky-actions, else the run's, else the evaluated id's.
    A file that is no Atari checkpoint of this script is left to `load_checkpoint` to report."""
    try:
        checkpoint = torch.load(args.eval_checkpoint, map_location="cpu", weights_only=True)
        trained = checkpoint["args"]
        if checkpoint["script"] != SCRIPT or not is_atari(env_spec(trained["env_id"])):
            return args
    except Exception:
        return args
    played = {name: value for name, value in trained.items() if name.startswith("atari_") and hasattr(args, name)}
    if args.atari_sticky_actions is not None:
        played["atari_sticky_actions"] = args.atari_sticky_actions
    differ = [(as_flag(name, getattr(args, name)), as_flag(name, value)) for name, value in played.items()
              if getattr(args, name) not in (getattr(Args, name), value)]
    if differ:
        raise UserError(f"{', '.join(given for given, _ in differ)}: the model was trained with "
                        f"{', '.join(was for _, was in differ)}, and is evaluated on the game as trained")
    return replace(args, **played)


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
    if "obs_dim" in ckpt.get("spaces", {}):  # written before frames, when every observation was a vector
        ckpt["spaces"]["obs_shape"] = [ckpt["spaces"].pop("obs_dim")]
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
            if name in ATARI_ONLY + FRAMES_ONLY:  # one that would do nothing on this env says that instead
                check_flags_apply(replace(Args(env_id=saved.env_id), **{name: value}), observes_frames(saved.env_id))
            raise UserError(f"--{name.replace('_', '-')} cannot change when resuming: the run has "
                            f"{getattr(saved, name)!r}, given {value!r}")
    if args.total_timesteps is None:  # given as None: unset, so the run's own
        args = replace(args, total_timesteps=saved.total_timesteps)
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


def seed_everything(args: Args, frames: bool) -> None:
    # One thread is fastest for 64-unit MLPs, and keeps a run's numbers independent of core count.
    # The CNN's convolutions keep torch's default: every core, or OMP_NUM_THREADS where it is set
    # (forcing two threads beside two other runs on two cores: 145 SPS on Breakout, against 774 alone).
    if not frames:
        torch.set_num_threads(1)
    elif "LOCAL_WORLD_SIZE" in os.environ:  # torchrun: the machine's ranks share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
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


# Losses are logged every this many updates: A2C updates every n·N steps, and a TensorBoard
# write plus a `.item()` per update would cost as much as the update itself.
LOG_EVERY = 100


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


def start_tracking(args: Args, run_dir: str, config: dict):
    """A Weights & Biases run (--track), started before the SummaryWriter: patched, it sends W&B each scalar
    it writes (reading the event files back instead, sync_tensorboard=True, costs ~10 s at the end). The
    run's name is its id, so a resumed run goes on in the same W&B run."""
    import wandb
    wandb.tensorboard.patch(root_logdir=run_dir, pytorch=True, save=False)
    run_name = os.path.basename(run_dir)
    try:
        return wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_name, id=run_name,
                          resume="allow", config=config, save_code=True)
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
    frames = observes_frames(args.env_id)
    args = with_defaults(args, frames)
    check_args(args)
    if not resume:  # a resumed run's flags are its checkpoint's, which may predate this check
        check_flags_apply(args, frames)
    device = select_device(args)
    hyperparameters = as_used(args, frames, device)  # as logged: what auto and unset flags became
    ranks = join_ranks(device)
    run_name = f"{folder_name(args.env_id)}__{args.exp_name}__{args.seed}__{int(time.time())}"
    seed_everything(args, frames)
    seed = rank_seed(args.seed, ranks)
    with fail_together(ranks):  # rank 0 alone writes the run's folder, films and tracks
        if resume:
            run_dir = resume["run_dir"]
        else:
            run_dir = make_run_dir(run_name, args.capture_video) if ranks.rank == 0 else None
        episode_stats = make_envs(replace(args, capture_video=args.capture_video and ranks.rank == 0), args.num_envs,
                                  run_name)
        tracker = start_tracking(args, run_dir, hyperparameters) if args.track and ranks.rank == 0 else None

    envs, obs_norm, reward_norm = add_normalization(episode_stats, args.norm_obs and not frames,
                                                    args.norm_reward and not frames, args.gamma)
    obs_shape = envs.single_observation_space.shape
    agent = ActorCritic(obs_shape, envs.single_action_space).to(device)
    agent.bf16 = use_bf16(args.cnn_precision, frames, device)
    fused = device.type in ("cpu", "cuda")
    if args.optimizer == "rmsprop":  # torch has no fused RMSprop; foreach is the next best, on a CPU too
        optimizer = torch.optim.RMSprop(agent.parameters(), lr=args.learning_rate, alpha=0.99, eps=1e-5, foreach=True)
    else:
        optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=fused)
    rng = np.random.default_rng(seed)
    global_step = 0
    if resume:  # where the checkpoint left off; the envs start new episodes, so the return being
        # scaled (NormalizeReward's accumulator) starts at 0 again, as at any episode's start
        agent.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        restore_running_stats(obs_norm and obs_norm.obs_rms, resume["obs_rms"])
        restore_running_stats(reward_norm and reward_norm.return_rms, resume["return_rms"])
        global_step = resume["global_step"]
        restore_rng_states(resume["rng"], rng)
        if ranks.rank > 0:  # the checkpoint holds rank 0's acting draws; the others draw their own
            rng = np.random.default_rng([seed, global_step])
    start_alike(agent, global_step, ranks)
    statistics = RankStatistics([obs_norm and obs_norm.obs_rms, reward_norm and reward_norm.return_rms], ranks)

    from torch.utils.tensorboard import SummaryWriter  # slow to import; evaluation needs none
    # Resumed, what was logged after the checkpoint is dropped: no step is logged twice.
    writer = SummaryWriter(run_dir, purge_step=global_step + 1 if resume else None) if ranks.rank == 0 else Silent()
    note_run_dir(run_dir, ranks)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                    "\n".join(f"|{k}|{v}|" for k, v in hyperparameters.items()))
    if ranks.rank == 0:  # where to point TensorBoard
        print(f"{SCRIPT}: logs in {run_dir}/" + (f", videos in videos/{run_name}/" if args.capture_video else ""))

    batch_size = args.num_envs * args.num_steps  # this rank's; an update takes every rank's
    num_updates = args.total_timesteps // (batch_size * ranks.size)
    if resume and global_step // (batch_size * ranks.size) >= num_updates and ranks.rank == 0:  # why nothing happens
        print(f"{SCRIPT}: the run has done all {num_updates} updates of its --total-timesteps {args.total_timesteps}; "
              "resume it with more to train on")
    rollout = Rollout.empty(args.num_steps, args.num_envs, obs_shape, envs.single_action_space,
                            np.uint8 if frames else np.float32)
    first_step = global_step
    status = StatusLine(num_updates * batch_size * ranks.size, first_step) if ranks.rank == 0 else Silent()
    recent_returns = deque(maxlen=100)

    obs, _ = envs.reset(seed=seed)
    after_done = np.zeros(args.num_envs, bool)
    start_time = time.time()
    next_checkpoint = start_time + args.checkpoint_every
    stop = StopRequest()
    exit_code = None  # stays None if anything but the ends below leaves the loop (a crash)
    try:
        for update in range(global_step // (batch_size * ranks.size) + 1, num_updates + 1):
            if all_ranks_stop(stop, ranks):  # Ctrl-C or SIGTERM: stop here, between two updates
                break
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = (1.0 - (update - 1.0) / num_updates) * args.learning_rate

            # 1. The N actors take n steps with the current parameters.
            policy = TorchPolicy(agent, rng, device) if frames else NumpyPolicy(agent, rng)
            episodes = []
            obs, after_done = collect_rollout(envs, policy, rollout, obs, after_done,
                                              lambda returns, lengths: episodes.extend(zip(returns, lengths)))
            global_step += batch_size * ranks.size
            for episodic_return, length in gather_episodes(episodes, ranks):  # every rank's, at the step count
                writer.add_scalar("charts/episodic_return", episodic_return, global_step)  # the rollout ended on
                writer.add_scalar("charts/episodic_length", length, global_step)
                recent_returns.append(episodic_return)
            statistics.merge()  # the ranks' normalisation statistics, alike for the next rollout

            # 2. π_θ(a_t|s_t), its entropy and V(s_t) at the real transitions, in one pass of the network.
            valid = rollout.valid.reshape(-1)
            b_obs = torch.from_numpy(rollout.obs.reshape((-1,) + obs_shape)[valid]).to(device)
            b_actions = torch.from_numpy(rollout.actions.reshape((batch_size,) + rollout.actions.shape[2:])[valid])
            log_probs, entropy, values = agent.evaluate_actions(b_obs, b_actions.to(device))

            # 3. n-step returns R_t, bootstrapped from V(s_{t+n}) (or V(final obs) at a truncation).
            with torch.inference_mode():
                next_values = next_state_values(agent, rollout, values.detach().cpu().numpy(), device)
            returns = n_step_returns(rollout.rewards, next_values, rollout.terminations, rollout.truncations,
                                     args.gamma)

            # 4. One gradient step on L = L^A + c_v L^C - c_e H over the batch's real transitions.
            b_returns = torch.from_numpy(returns.reshape(-1)[valid]).to(device)
            losses = a2c_update(agent, optimizer, log_probs, entropy, values, b_returns, args, ranks)

            if update % LOG_EVERY == 0 or update == num_updates:  # under torchrun, rank 0's batch
                writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
                for name, value in losses.items():
                    writer.add_scalar(f"losses/{name}", value.item(), global_step)
                writer.add_scalar("losses/explained_variance", explained_variance(values.detach(), b_returns),
                                  global_step)
                writer.add_scalar("charts/SPS", int((global_step - first_step) / (time.time() - start_time)),
                                  global_step)
                status.update(global_step, recent_returns)
            if args.save_model and ranks.rank == 0 and time.time() >= next_checkpoint:  # nothing learned is lost to a kill
                writer.flush()  # the logs up to the checkpoint reach the disk with it
                save_checkpoint(f"{run_dir}/model.pt", args, global_step, agent, optimizer, envs, obs_norm,
                                reward_norm, rng)
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
            save_checkpoint(f"{run_dir}/model.pt", args, global_step, agent, optimizer, envs, obs_norm, reward_norm,
                            rng)
            print(f"{SCRIPT}: model saved to {run_dir}/model.pt ({ending(exit_code)})")
        writer.close()
        envs.close()
        if tracker:
            finish_tracking(tracker, f"videos/{run_name}", exit_code)
        leave_ranks(ranks, together=exit_code is not None)  # not after a crash: the others may never come
    report_end(exit_code, global_step)


def evaluate(args: Args) -> None:
    """Run the deterministic policy of a saved model for `eval_episodes` episodes; train nothing."""
    args = replace(args, eval_checkpoint=checkpoint_file(args.eval_checkpoint))
    render_offscreen(args.capture_video)
    frames = observes_frames(args.env_id)
    args = with_defaults(args, frames)
    check_args(args)
    check_flags_apply(args, frames)
    args = as_trained(args)
    device = select_device(args)
    seed_everything(args, frames)
    run_name = f"{folder_name(args.env_id)}__{args.exp_name}-eval__{args.seed}__{int(time.time())}"
    if args.capture_video:  # the videos' folder must be writable before the episodes are played
        make_run_dir(run_name, True)
    # One env per episode, so short episodes are not over-represented in the mean.
    envs = make_envs(args, args.eval_episodes, run_name, record_every_env=True)
    ckpt = load_checkpoint(args.eval_checkpoint, args.env_id, envs)
    agent = ActorCritic(envs.single_observation_space.shape, envs.single_action_space).to(device)
    agent.bf16 = use_bf16(args.cnn_precision, frames, device)
    try:
        agent.load_state_dict(ckpt["model"])
    except RuntimeError:  # same script and spaces, other layer shapes (another version of it)
        raise UserError(f"{args.eval_checkpoint}'s weights do not fit this {SCRIPT}'s network") from None
    if ckpt["obs_rms"] is not None:  # the policy acts on observations normalised as in training
        envs = frozen_obs_normalization(envs, ckpt["obs_rms"])
    space = envs.single_action_space

    returns = np.full(args.eval_episodes, np.nan)
    obs, _ = envs.reset(seed=args.seed)
    with torch.inference_mode():
        while np.isnan(returns).any():
            obs = torch.as_tensor(obs if frames else obs.astype(np.float32), device=device)
            action = agent.act_deterministic(obs).cpu().numpy()
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
    tracker = start_tracking(args, run_dir, as_used(args, frames, device)) if args.track else None
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
