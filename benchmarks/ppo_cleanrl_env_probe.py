"""A probe, not a product: ppo.py learning from CleanRL's Atari env instead of ale-py's vector env, all else ppo.py's.

On Pong, ppo.py's first four seeds fell behind CleanRL's first three from about 850k steps (README, Atari; with more
seeds, the gap is gone). ppo.py's update is CleanRL's to rounding (benchmarks/update_vs_plain_loop.py) and its
frames are CleanRL's to a few grey levels (benchmarks/atari_frames.py), but not every env detail is: ale-py fills a
game's first frame stack with zeros (CleanRL repeats the first frame), presses FIRE only when a game starts
(CleanRL: after every reset, and then action 2), and counts its no-op starts its own way. This runs ppo.py unchanged
but for `make_atari_envs`, which builds CleanRL's `make_env` chain in a SyncVectorEnv (same-step autoreset, as
gymnasium 0.29's):

    RecordEpisodeStatistics, NoopReset(30), MaxAndSkip(4), EpisodicLife, FireReset, ClipReward,
    Resize(84x84, cv2 INTER_AREA), grey (cv2's weights, as gymnasium 0.29's wrapper), FrameStack(4, first frame repeated)

with Stable-Baselines3's wrappers (CleanRL's cleanrl_utils/atari_wrappers.py are a copy of them). Under them is
this project's ale-py and gymnasium 1.x, not CleanRL's ale-py 0.9.1 and gymnasium 0.29.1. The lost life
and the clipped reward are then the wrappers' (ppo.py's AtariLearnerView is not used); the logged return is still
the whole game's, recorded under them.

    pip install -r benchmarks/requirements.txt   # stable-baselines3, opencv
    python benchmarks/ppo_cleanrl_env_probe.py --env-id PongNoFrameskip-v4 --seed 1 --total-timesteps 2000000 \\
        --exp-name ppo-cleanrl-env

Every ppo.py flag works but the --atari-* ones, which this env ignores.
"""
import os
import sys

import cv2
import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.atari_wrappers import (ClipRewardEnv, EpisodicLifeEnv, FireResetEnv, MaxAndSkipEnv,
                                                     NoopResetEnv)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo  # noqa: E402


class CvGrey(gym.ObservationWrapper):
    """RGB to grey with cv2's weights (0.299, 0.587, 0.114), as gymnasium 0.29's GrayScaleObservation, which
    CleanRL's runs used (gymnasium 1.x's uses other weights)."""

    def __init__(self, env):
        super().__init__(env)
        self.observation_space = gym.spaces.Box(0, 255, env.observation_space.shape[:2], np.uint8)

    def observation(self, obs):
        return cv2.cvtColor(obs, cv2.COLOR_RGB2GRAY)


def cleanrl_env(env_id: str) -> gym.Env:
    env = gym.make(env_id)
    env = gym.wrappers.RecordEpisodeStatistics(env)  # innermost: the whole game's unclipped score
    env = NoopResetEnv(env, noop_max=30)
    env = MaxAndSkipEnv(env, skip=4)
    env = EpisodicLifeEnv(env)
    if "FIRE" in env.unwrapped.get_action_meanings():
        env = FireResetEnv(env)
    env = ClipRewardEnv(env)
    env = gym.wrappers.ResizeObservation(env, (84, 84))
    env = CvGrey(env)
    return gym.wrappers.FrameStackObservation(env, 4, padding_type="reset")


class GameScores(gym.vector.VectorWrapper):
    """The games' scores where ppo.py reads them (info["episode"], info["_episode"]): a same-step autoreset puts the
    ending step's info, with the innermost RecordEpisodeStatistics's, under info["final_info"]."""

    def step(self, actions):
        obs, rewards, terminations, truncations, info = self.env.step(actions)
        final = info.get("final_info", {})
        if "_episode" in final:
            info["episode"], info["_episode"] = final["episode"], final["_episode"]
        return obs, rewards, terminations, truncations, info


def make_atari_envs(args, spec, num_envs):
    return GameScores(gym.vector.SyncVectorEnv([lambda: cleanrl_env(args.env_id) for _ in range(num_envs)],
                                               autoreset_mode=AutoresetMode.SAME_STEP))


if __name__ == "__main__":
    ppo.make_atari_envs = make_atari_envs
    ppo.main()
