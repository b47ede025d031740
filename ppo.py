"""Proximal Policy Optimization (PPO) for discrete action spaces, in one file.

The clipped-surrogate PPO of Schulman et al. (2017), as the seed tutorial derives it:
run the old policy π_θold in N synchronous envs for T steps, estimate advantages with GAE,
then optimise the clipped surrogate for K epochs over shuffled minibatches, and set θold ← θ.

    python ppo.py --env-id CartPole-v1
    python ppo.py --env-id LunarLander-v3 --seed 2 --save-model
    python ppo.py --env-id LunarLander-v3 --eval-checkpoint runs/RUN/model.pt
    python ppo.py --env-id ALE/Breakout-v5

Game frames (Atari) get the standard preprocessing and the Nature-DQN CNN, one body with two
heads; the observation kind picks the network and the defaults that differ (see `DEFAULTS`).
Gymnasium 1.x: a truncated episode (time limit) bootstraps from V(final observation); a
terminated one does not; and no transition that crosses an episode boundary is learned from,
whichever autoreset mode the vector env uses (see `collect_rollout`).
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

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
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
    """with --save-model, also write the checkpoint every this many seconds (at an iteration's end)"""
    resume: Optional[str] = None
    """continue this run (its directory or its model.pt) where its checkpoint left it, with its flags;
    given again, only --total-timesteps, --checkpoint-every, --save-model, --cuda and the --track flags may differ"""

    env_id: str = "CartPole-v1"
    """the id of the environment (a Discrete action space)"""
    total_timesteps: Optional[int] = None
    """total env steps of the experiment (unset: 1M for vectors; 10M for frames, the Atari literature's budget)"""
    learning_rate: Optional[float] = None
    """the learning rate of the optimizer (unset: 1e-3 for vectors, 2.5e-4 for frames)"""
    num_envs: int = 8
    """the number of parallel game environments"""
    num_steps: Optional[int] = None
    """the steps to run in each environment per policy rollout, T (unset: 256 for vectors, 128 for frames)"""
    anneal_lr: bool = True
    """toggle learning-rate annealing (linear, to zero at the end of training)"""
    gamma: Optional[float] = None
    """the discount factor gamma (unset: 0.995 for vectors, 0.99 for frames)"""
    gae_lambda: Optional[float] = None
    """the lambda of the general advantage estimation (unset: 0.98 for vectors, 0.95 for frames)"""
    num_minibatches: Optional[int] = None
    """the number of minibatches per epoch (unset: 32 of 64 samples for vectors, 4 of 256 for frames)"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """toggles advantage normalisation (per minibatch)"""
    clip_coef: Optional[float] = None
    """the surrogate clipping coefficient epsilon (unset: 0.2 for vectors, 0.1 for frames); given as None: no
    clipping, the plain surrogate r_t A_t (the PPO paper's L^CPI)"""
    clip_vloss: bool = False
    """toggles whether or not to use a clipped loss for the value function"""
    ent_coef: float = 0.01
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

    cnn_precision: Literal["auto", "bfloat16", "float32"] = "auto"
    """frames: the CNN trunk's arithmetic (the heads and losses stay float32); auto is bfloat16 where the
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
# on the suite of README "Defaults"; the frame settings are those of the Atari PPO literature
# (CleanRL's ppo_atari.py, but for its clipped value loss: off here, as for vectors).
DEFAULTS = {"total_timesteps": (1_000_000, 10_000_000), "learning_rate": (1e-3, 2.5e-4), "num_steps": (256, 128),
            "gamma": (0.995, 0.99), "gae_lambda": (0.98, 0.95), "num_minibatches": (32, 4), "clip_coef": (0.2, 0.1)}


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


# --clip-coef None: ε = ∞, and clip(r, 1 - ε, 1 + ε) = r, so L^CLIP is the plain surrogate L^CPI.
NO_CLIPPING = math.inf


def clipping_as_given(args: Args, argv: Optional[list[str]]) -> Args:
    """`args` with --clip-coef None, when given, read as no clipping (NO_CLIPPING). Left unset, --clip-coef is
    also None, and then the observation kind picks ε (DEFAULTS): a second parse with a marker default tells
    the two apart."""
    probe = tyro.cli(Args, args=argv, default=replace(args, clip_coef=-1.0))
    return replace(args, clip_coef=NO_CLIPPING) if probe.clip_coef is None else args


def check_args(args: Args) -> None:
    for flag, path in (("--resume", args.resume), ("--eval-checkpoint", args.eval_checkpoint)):
        if path == "":  # "$RUN" with RUN unset: read as not given, it would start a new run
            raise UserError(f"{flag} was given an empty path")
    for name, value in asdict(args).items():  # NaN slips through every comparison below
        if isinstance(value, float) and not math.isfinite(value) and not (name == "clip_coef" and value == NO_CLIPPING):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if not 0 <= args.seed < 2**32:  # numpy's global seed takes no more
        raise UserError(f"--seed must lie in [0, 2^32), got {args.seed}")
    counts = dict(total_timesteps=args.total_timesteps, num_envs=args.num_envs, num_steps=args.num_steps,
                  num_minibatches=args.num_minibatches, update_epochs=args.update_epochs,
                  eval_episodes=args.eval_episodes, atari_frame_skip=args.atari_frame_skip,
                  atari_frame_stack=args.atari_frame_stack)
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
    if not 0.0 < args.gamma <= 1.0 or not 0.0 <= args.gae_lambda <= 1.0:
        raise UserError("--gamma must lie in (0, 1] and --gae-lambda in [0, 1]")
    positive = dict(learning_rate=args.learning_rate, clip_coef=args.clip_coef, max_grad_norm=args.max_grad_norm,
                    target_kl=args.target_kl)  # None: no early stop
    for name, value in positive.items():
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.clip_coef == NO_CLIPPING and args.clip_vloss:
        raise UserError("--clip-vloss clips by --clip-coef, which is None: give a --clip-coef or --no-clip-vloss")
    if args.kl_beta < 0 or (args.kl_dtarg is not None and args.kl_dtarg <= 0):
        raise UserError("--kl-beta must be 0 or more, and --kl-dtarg positive")


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
    envs in one numpy call, several times faster than a loop); it autoresets NEXT_STEP.
    Otherwise a SyncVectorEnv autoresets SAME_STEP, which wastes no step on resets.
    Atari ids get ale-py's vector env (`make_atari_envs`). With --capture-video, env 0 is filmed, or with
    `record_every_env` (evaluation) each env's first episode.
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
                                            autoreset_mode=AutoresetMode.SAME_STEP)
    except gym.error.Error as e:
        raise UserError(f"cannot make {env_id!r}: {e}") from None
    if not isinstance(envs.single_action_space, gym.spaces.Discrete):
        envs.close()
        raise UserError(f"{env_id} has a {type(envs.single_action_space).__name__} action space; "
                        f"{SCRIPT} needs a Discrete one (use ppo_continuous.py for Box actions)")
    obs_space = envs.single_observation_space
    if not (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1 or is_image(obs_space)):
        envs.close()
        raise UserError(f"{env_id} has observation space {obs_space}; {SCRIPT} needs a flat Box "
                        "or a (channels, height, width) image of uint8")
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


# ---------------------------------------------------------------------------------------------
# The policy network π_θ(a|s) and the critic V(s)
# ---------------------------------------------------------------------------------------------

def categorical_entropy(logp: torch.Tensor) -> torch.Tensor:
    """H(π(·|s)) = -Σ_a π(a|s) log π(a|s), from log-probabilities over the last dimension."""
    return -(logp.exp() * logp).sum(-1)


def layer_init(layer: nn.Module, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    """Orthogonal weights with gain `std`, constant bias (the PPO implementations' init)."""
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


class Agent(nn.Module):
    """The actor gives logits of π_θ(·|s), the critic V(s).

    Vectors: separate 64-64 tanh MLPs (no trunk). Frames: the seed's one body with two heads,
    a shared CNN trunk under a linear actor head and a linear critic head.
    """

    bf16 = False  # run the trunk in bfloat16 (set by `use_bf16`; not part of the saved weights)

    def __init__(self, obs_shape: tuple, n_actions: int):
        super().__init__()
        if len(obs_shape) == 3:
            self.trunk = nature_cnn(obs_shape)
            self.critic = layer_init(nn.Linear(512, 1), std=1.0)
            self.actor = layer_init(nn.Linear(512, n_actions), std=0.01)
            return
        self.trunk = nn.Identity()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_shape[0], 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        # A small last layer starts the policy near uniform, so early actions explore.
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_shape[0], 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, n_actions), std=0.01),
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.trunk(x).float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.actor(self.features(x))

    def get_value(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(self.features(x)).squeeze(-1)

    def evaluate_actions(self, x: torch.Tensor, action: torch.Tensor):
        """(log π_θ(a|s), entropy of π_θ(·|s), V(s), log π_θ(·|s)) for given states and actions."""
        h = self.features(x)  # once: for frames, the CNN is most of the cost
        logp = torch.log_softmax(self.actor(h), dim=-1)
        value = self.critic(h).squeeze(-1)
        return logp.gather(-1, action.unsqueeze(-1)).squeeze(-1), categorical_entropy(logp), value, logp

    def act_deterministic(self, x: torch.Tensor) -> torch.Tensor:
        """argmax_a π_θ(a|s), the policy used to evaluate a saved model."""
        return self.logits(x).argmax(-1)


def use_bf16(precision: str, frames: bool, device: torch.device) -> bool:
    """Whether the CNN trunk runs in bfloat16: measured on a CPU with AMX, a gradient step on 256
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
    if frames:
        used["cnn_precision"] = "bfloat16" if use_bf16(args.cnn_precision, frames, device) else "float32"
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
    """a ~ π_θ(·|s) for the rollout: the actor's forward pass in numpy, on a copy of its weights.

    Acting is most of a rollout step's cost beyond the env: for a handful of envs torch spends
    ~10 µs of overhead per layer, numpy ~1 µs (measured for 8 envs: 12 µs a step to sample an
    action here, 58 µs in torch). Made anew from the actor (Linear, Tanh, Linear, Tanh, Linear)
    each rollout.
    """

    def __init__(self, actor: nn.Sequential, rng: np.random.Generator):
        self.layers = [(m.weight.detach().cpu().numpy().T.copy(), m.bias.detach().cpu().numpy().copy())
                       for m in actor if isinstance(m, nn.Linear)]
        self.rng = rng

    def logits(self, obs: np.ndarray) -> np.ndarray:
        x = obs
        for i, (weight, bias) in enumerate(self.layers):
            x = x @ weight + bias
            if i < len(self.layers) - 1:
                x = np.tanh(x)
        return x

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return sample_categorical(self.logits(obs), self.rng)


class TorchPolicy:
    """a ~ π_θ(·|s) for the rollout from the torch network, for frames: the uint8 frames go to the CNN
    as they are. It keeps log π_θold(a|s) and V(s) of every step: the CNN's pass that acts computes
    them anyway, and a second pass over the whole batch afterwards would cost as much again."""

    def __init__(self, agent: Agent, rng: np.random.Generator, device: torch.device):
        self.agent, self.rng, self.device = agent, rng, device
        self.logprobs, self.values, self.policies = [], [], []  # log π_θold(a|s), V(s), log π_θold(·|s)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            hidden = self.agent.features(torch.from_numpy(obs).to(self.device))
            logp = torch.log_softmax(self.agent.actor(hidden), dim=-1)
            self.values.append(self.agent.critic(hidden).squeeze(-1))
            self.policies.append(logp)
        action = sample_categorical(logp.cpu().numpy(), self.rng)  # softmax(log π) = π: the same draw
        self.logprobs.append(logp.gather(-1, torch.from_numpy(action).to(self.device).unsqueeze(-1)).squeeze(-1))
        return action


# ---------------------------------------------------------------------------------------------
# Rollout: run π_θold for T steps in N envs
# ---------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """One batch of experience, each field shaped (T, N, ...), as numpy arrays.

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
    def empty(cls, num_steps: int, num_envs: int, obs_shape: tuple, obs_dtype=np.float32) -> "Rollout":
        """Frames are stored as the env gives them, uint8 (8 envs x 128 steps of 4x84x84: 29 MB, not 116)."""
        steps = (num_steps, num_envs)
        return cls(obs=np.zeros(steps + tuple(obs_shape), obs_dtype), actions=np.zeros(steps, np.int64),
                   rewards=np.zeros(steps, np.float32), terminations=np.zeros(steps, bool),
                   truncations=np.zeros(steps, bool), next_obs=np.zeros(steps + tuple(obs_shape), obs_dtype),
                   valid=np.ones(steps, bool))


def collect_rollout(envs, policy, rollout: Rollout, obs: np.ndarray, after_done: np.ndarray,
                    on_episode=None) -> tuple[np.ndarray, np.ndarray]:
    """Fill `rollout` with T steps of `policy` (observations -> actions) in `envs`, from `obs`.

    `after_done[i]` says env i ended an episode on the step before (in NEXT_STEP mode the
    next step is then a reset step). Returns the (obs, after_done) to continue from. An env
    that ends the learner's episode without ending its own (Atari's lost life) says where its
    own episodes end in `info["atari_game_over"]`: only those are followed by a reset step.
    `on_episode(returns, lengths)` is called with the stats of the episodes that end.
    Only the actions are sampled here; for vectors log π_θold(a|s) and V(s) are computed afterwards
    for the whole batch at once, since θ_old does not change during the rollout (for frames the
    CNN's acting pass keeps them: `TorchPolicy`).
    """
    next_step_mode = envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    for t in range(rollout.obs.shape[0]):
        rollout.obs[t] = obs
        if next_step_mode:  # the step after an episode's end only resets the env: no transition
            rollout.valid[t] = ~after_done
        action = policy(rollout.obs[t])
        rollout.actions[t] = action

        obs, reward, terminated, truncated, info = envs.step(action)
        rollout.rewards[t] = reward
        rollout.terminations[t] = terminated
        rollout.truncations[t] = truncated
        rollout.next_obs[t] = obs
        if not next_step_mode and "_final_obs" in info:
            # SAME_STEP: `obs` is already the first observation of the next episode.
            ended = info["_final_obs"]
            rollout.next_obs[t, ended] = np.stack(info["final_obs"][ended])
        if on_episode is not None and "_episode" in info:
            ended = info["_episode"]
            on_episode(info["episode"]["r"][ended], info["episode"]["l"][ended])
        after_done = info.get("atari_game_over", terminated | truncated)
    return obs, after_done


def next_state_values(agent: Agent, rollout: Rollout, values: np.ndarray, device: torch.device) -> np.ndarray:
    """V(s') of the state each step led to: the next step's V(s_{t+1}) where it starts from that state
    (every step but the last, in NEXT_STEP mode), the critic run only on the rest (the last step, and a
    SAME_STEP episode's final observation). For frames a pass of the CNN over the batch is saved."""
    T, N = values.shape
    fresh = np.ones((T, N), bool)
    moved = rollout.next_obs[:-1] != rollout.obs[1:]  # (T - 1, N, *obs_shape), empty when T = 1
    fresh[:-1] = moved.any(axis=tuple(range(2, moved.ndim)))
    next_values = np.empty_like(values)
    next_values[:-1] = values[1:]
    next_values[fresh] = agent.get_value(torch.from_numpy(rollout.next_obs[fresh]).to(device)).cpu().numpy()
    return next_values


# ---------------------------------------------------------------------------------------------
# The math: advantages and losses, as pure functions of tensors
# ---------------------------------------------------------------------------------------------

def gae(rewards: np.ndarray, values: np.ndarray, next_values: np.ndarray, terminations: np.ndarray,
        truncations: np.ndarray, gamma: float, gae_lambda: float) -> tuple[np.ndarray, np.ndarray]:
    """Â_t = δ_t + γλ(1-done_t)Â_{t+1}, δ_t = r_t + γ(1-term_t)V(s_{t+1}) - V(s_t); returns (Â, Â+V).

    Arrays (T, N). `next_values[t]` is V of the state step t led to (the final observation
    when the episode ended at t), so a truncated step bootstraps and a terminated one does
    not; either way the sum stops at the episode's end. After step T-1 nothing is summed.
    In numpy: the backward loop over T steps of tiny arrays costs several times less than in torch.
    """
    deltas = rewards + gamma * (1.0 - terminations) * next_values - values
    discounts = gamma * gae_lambda * (1.0 - (terminations | truncations))
    advantages = np.zeros_like(deltas)
    last = np.zeros_like(deltas[0])
    for t in reversed(range(len(deltas))):
        last = advantages[t] = deltas[t] + discounts[t] * last
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


def categorical_kl(old_logp: torch.Tensor, new_logp: torch.Tensor) -> torch.Tensor:
    """KL(π_old(·|s), π(·|s)) = Σ_a π_old(a|s) (log π_old(a|s) - log π(a|s)), exact, from log-probabilities."""
    return (old_logp.exp() * (old_logp - new_logp)).sum(-1)


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

    `valid` holds the indices of the real transitions: NEXT_STEP reset steps are never sampled.
    """
    obs: torch.Tensor
    actions: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    valid: torch.Tensor
    policies: Optional[torch.Tensor] = None  # log π_θold(·|s) at each state, for the exact KL


def shuffled_minibatches(transitions: torch.Tensor, advantages: torch.Tensor, num_minibatches: int, epochs: int,
                         ranks: "Ranks", norm_adv: bool = True):
    """Each epoch a new shuffle of the transitions' indices into minibatches: (indices, mean Â, std Â) for each,
    the mean and std those of the minibatch's advantages together with the other ranks' same-numbered
    minibatches (None without `norm_adv`). One all-reduce per epoch brings every minibatch's moments."""
    for _ in range(epochs):
        minibatches = torch.tensor_split(transitions[torch.randperm(len(transitions), device=transitions.device)],
                                         num_minibatches)
        moments = (union_mean_std([advantages[mb] for mb in minibatches], ranks) if norm_adv
                   else [(None, None)] * len(minibatches))
        yield from ((mb, mean, std) for mb, (mean, std) in zip(minibatches, moments))


def ppo_update(agent: Agent, optimizer: torch.optim.Optimizer, batch: Batch, args: Args, ranks: "Ranks",
               kl_beta: float = 0.0) -> dict:
    """Optimise L for K epochs over shuffled minibatches of the real transitions; θ changes, θ_old does not.

    The policy's objective is L^CLIP, or with --clip-coef None the unclipped L^CPI; with a penalty
    coefficient β > 0 it also subtracts β times the exact KL(π_θold(·|s), π_θ(·|s)) (L^KLPEN).
    Returns the last minibatch's losses (the policy's with the penalty in it) and KL estimates, the
    clip fraction over all of them, and how many minibatch steps were taken (fewer when the KL
    passed --target-kl). Under torchrun a minibatch is the union of the ranks' minibatches: its
    advantages are normalised together, its gradient is the mean of theirs, and its KL estimate
    (approx_kl, which may stop the epochs) theirs.
    """
    clipfracs = []
    for mb, adv_mean, adv_std in shuffled_minibatches(batch.valid, batch.advantages, args.num_minibatches,
                                                      args.update_epochs, ranks, args.norm_adv):
        newlogprob, entropy, newvalue, new_policy = agent.evaluate_actions(batch.obs[mb], batch.actions[mb])
        logratio = newlogprob - batch.logprobs[mb]
        ratio = logratio.exp()
        with torch.no_grad():
            old_kl, kl = approx_kl(logratio)
            clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean())

        mb_advantages = batch.advantages[mb]
        if args.norm_adv:
            mb_advantages = normalize_advantages(mb_advantages, adv_mean, adv_std)
        if args.clip_coef == NO_CLIPPING:
            pg_loss = surrogate_loss(ratio, mb_advantages)
        else:
            pg_loss = clipped_surrogate_loss(ratio, mb_advantages, args.clip_coef)
        if kl_beta > 0:
            pg_loss = pg_loss + kl_penalty(categorical_kl(batch.policies[mb], new_policy), kl_beta)
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
    """d = E_t[KL(π_θold(·|s_t), π_θ(·|s_t))] over the batch's real transitions (every rank's), exact: what adapts β."""
    with torch.no_grad():
        *_, policy = agent.evaluate_actions(batch.obs[batch.valid], batch.actions[batch.valid])
        ((d, _),) = union_mean_std([categorical_kl(batch.policies[batch.valid], policy)], ranks)
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

def save_checkpoint(path: str, args: Args, global_step: int, agent: Agent, optimizer, envs,
                    rng: np.random.Generator, kl_beta: float = 0.0) -> None:
    # Plain tensors and Python scalars only, so `torch.load(weights_only=True)` can read it.
    write_atomically({
        "script": SCRIPT,
        "args": asdict(args),
        "global_step": global_step,
        "iteration": global_step // (args.num_envs * args.num_steps),  # completed: where the LR schedule is
        "model": agent.state_dict(),
        "optimizer": optimizer.state_dict(),
        "obs_shape": list(envs.single_observation_space.shape),
        "n_actions": int(envs.single_action_space.n),
        "rng": rng_states(rng),
        "kl_beta": kl_beta,
    }, path)


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
    if "obs_dim" in ckpt:  # written before frames, when every observation was a vector
        ckpt["obs_shape"] = [ckpt.pop("obs_dim")]
    missing = [key for key in ['args', 'model', 'obs_shape', 'n_actions'] if key not in ckpt]
    if missing:
        raise UserError(f"{path} is an incomplete {SCRIPT} checkpoint (no {', '.join(missing)})")
    return ckpt


def load_checkpoint(path: str, env_id: str, obs_shape: tuple, n_actions: int) -> dict:
    """A checkpoint of this script whose spaces are `env_id`'s."""
    ckpt = read_checkpoint(path)
    if (tuple(ckpt["obs_shape"]), ckpt["n_actions"]) != (tuple(obs_shape), n_actions):
        raise UserError(f"{path} was trained on {ckpt['args']['env_id']} (obs {tuple(ckpt['obs_shape'])}, "
                        f"{ckpt['n_actions']} actions), but {env_id} has obs {tuple(obs_shape)}, {n_actions} "
                        f"actions: pass --env-id {ckpt['args']['env_id']}")
    return ckpt


def restore_rng_states(states: dict, rng: np.random.Generator) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["random"])
    rng.bit_generator.state = states["acting"]


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
    args = clipping_as_given(tyro.cli(Args, args=argv, default=saved, description=__doc__.split("\n\n")[0]), argv)
    for name, value in asdict(args).items():
        if name not in RESUMABLE and value != getattr(saved, name):
            if name in ATARI_ONLY + FRAMES_ONLY:  # one that would do nothing on this env says that instead
                check_flags_apply(replace(Args(env_id=saved.env_id), **{name: value}), observes_frames(saved.env_id))
            given = [None if name == "clip_coef" and v == NO_CLIPPING else v for v in (getattr(saved, name), value)]
            raise UserError(f"--{name.replace('_', '-')} cannot change when resuming: the run has "
                            f"{given[0]!r}, given {given[1]!r}")  # --clip-coef None as typed, not inf
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
    # One thread is fastest for 64-unit MLPs (measured: a minibatch step of 1024 takes 3.4 ms
    # on one thread, 4.5 ms on two), and it keeps a run's numbers independent of core count.
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
        envs = make_envs(replace(args, capture_video=args.capture_video and ranks.rank == 0), args.num_envs, run_name)
        tracker = start_tracking(args, run_dir, hyperparameters) if args.track and ranks.rank == 0 else None

    obs_shape, n_actions = envs.single_observation_space.shape, int(envs.single_action_space.n)
    agent = Agent(obs_shape, n_actions).to(device)
    agent.bf16 = use_bf16(args.cnn_precision, frames, device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5,
                                 fused=device.type in ("cpu", "cuda"))

    rng = np.random.default_rng(seed)
    global_step = 0
    kl_beta = args.kl_beta or (1.0 if args.kl_dtarg is not None else 0.0)  # β of L^KLPEN; adapted, it is state
    if resume:  # where the checkpoint left off; the envs start new episodes
        agent.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        global_step = resume["global_step"]
        kl_beta = resume.get("kl_beta", kl_beta)
        restore_rng_states(resume["rng"], rng)
        if ranks.rank > 0:  # the checkpoint holds rank 0's acting draws; the others draw their own
            rng = np.random.default_rng([seed, global_step])

    start_alike(agent, global_step, ranks)

    from torch.utils.tensorboard import SummaryWriter  # slow to import; evaluation needs none
    # Resumed, what was logged after the checkpoint is dropped: no step is logged twice.
    writer = SummaryWriter(run_dir, purge_step=global_step + 1 if resume else None) if ranks.rank == 0 else Silent()
    note_run_dir(run_dir, ranks)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                    "\n".join(f"|{k}|{v}|" for k, v in hyperparameters.items()))
    if ranks.rank == 0:  # where to point TensorBoard
        print(f"{SCRIPT}: logs in {run_dir}/" + (f", videos in videos/{run_name}/" if args.capture_video else ""))

    batch_size = args.num_envs * args.num_steps  # this rank's; an iteration takes every rank's
    num_iterations = args.total_timesteps // (batch_size * ranks.size)
    if resume and global_step // (batch_size * ranks.size) >= num_iterations and ranks.rank == 0:  # why nothing happens
        print(f"{SCRIPT}: the run has done all {num_iterations} iterations of its --total-timesteps "
              f"{args.total_timesteps}; resume it with more to train on")
    rollout = Rollout.empty(args.num_steps, args.num_envs, obs_shape, np.uint8 if frames else np.float32)
    first_step = global_step
    status = StatusLine(num_iterations * batch_size * ranks.size, first_step) if ranks.rank == 0 else Silent()
    recent_returns = deque(maxlen=100)

    obs, _ = envs.reset(seed=seed)
    after_done = np.zeros(args.num_envs, bool)
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
            policy = TorchPolicy(agent, rng, device) if frames else NumpyPolicy(agent.actor, rng)
            episodes = []
            obs, after_done = collect_rollout(envs, policy, rollout, obs, after_done,
                                              lambda returns, lengths: episodes.extend(zip(returns, lengths)))
            global_step += batch_size * ranks.size
            for episodic_return, length in gather_episodes(episodes, ranks):  # every rank's, at the step count
                writer.add_scalar("charts/episodic_return", episodic_return, global_step)  # the rollout ended on
                writer.add_scalar("charts/episodic_length", length, global_step)
                recent_returns.append(episodic_return)
            with torch.inference_mode():
                b_obs = torch.from_numpy(rollout.obs.reshape((-1,) + obs_shape)).to(device)
                b_actions = torch.from_numpy(rollout.actions.reshape(-1)).to(device)
                if frames:  # the CNN pass that acted computed them (TorchPolicy); a second costs as much again
                    b_logprobs, b_values, b_policies = (torch.cat(x) for x in (policy.logprobs, policy.values,
                                                                               policy.policies))
                else:
                    b_logprobs, _, b_values, b_policies = agent.evaluate_actions(b_obs, b_actions)
                values = b_values.cpu().numpy().reshape(args.num_steps, args.num_envs)
                next_values = next_state_values(agent, rollout, values, device)

            # 2. The advantage estimate Â_t.
            advantages, returns = gae(rollout.rewards, values, next_values, rollout.terminations,
                                      rollout.truncations, args.gamma, args.gae_lambda)

            # 3. Optimise the surrogate for K epochs over shuffled minibatches of the real transitions.
            batch = Batch(b_obs, b_actions, b_logprobs, b_values,
                          torch.from_numpy(advantages.reshape(-1)).to(device),
                          torch.from_numpy(returns.reshape(-1)).to(device),
                          valid=torch.from_numpy(np.flatnonzero(rollout.valid.reshape(-1))).to(device),
                          policies=b_policies)
            stats = ppo_update(agent, optimizer, batch, args, ranks, kl_beta)
            if args.kl_dtarg is not None:  # the paper's adaptive β: from the KL this update reached
                kl_beta = adapt_kl_beta(kl_beta, mean_exact_kl(agent, batch, ranks), args.kl_dtarg)

            # 4. Log what the update did (under torchrun, on rank 0's minibatches; approx_kl is the ranks' mean).
            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            for name, value in stats.items():
                writer.add_scalar(f"losses/{name}", value, global_step)
            writer.add_scalar("losses/explained_variance",
                              explained_variance(batch.values[batch.valid], batch.returns[batch.valid]), global_step)
            writer.add_scalar("charts/SPS", int((global_step - first_step) / (time.time() - start_time)), global_step)
            status.update(global_step, recent_returns)
            if args.save_model and ranks.rank == 0 and time.time() >= next_checkpoint:  # nothing learned is lost to a kill
                writer.flush()  # the logs up to the checkpoint reach the disk with it
                save_checkpoint(f"{run_dir}/model.pt", args, global_step, agent, optimizer, envs, rng, kl_beta)
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
            save_checkpoint(f"{run_dir}/model.pt", args, global_step, agent, optimizer, envs, rng, kl_beta)
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
    obs_shape, n_actions = envs.single_observation_space.shape, int(envs.single_action_space.n)
    ckpt = load_checkpoint(args.eval_checkpoint, args.env_id, obs_shape, n_actions)
    agent = Agent(obs_shape, n_actions).to(device)
    agent.bf16 = use_bf16(args.cnn_precision, frames, device)
    try:
        agent.load_state_dict(ckpt["model"])
    except RuntimeError:  # same script and spaces, other layer shapes (another version of it)
        raise UserError(f"{args.eval_checkpoint}'s weights do not fit this {SCRIPT}'s network") from None

    returns = np.full(args.eval_episodes, np.nan)
    obs, _ = envs.reset(seed=args.seed)
    with torch.inference_mode():
        while np.isnan(returns).any():
            action = agent.act_deterministic(torch.as_tensor(obs if frames else obs.astype(np.float32), device=device))
            obs, _, _, _, info = envs.step(action.cpu().numpy())
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
    args = clipping_as_given(tyro.cli(Args, args=argv, description=__doc__.split("\n\n")[0]), argv)
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
