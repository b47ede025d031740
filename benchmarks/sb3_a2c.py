"""Stable-Baselines3's A2C with rl-baselines3-zoo's tuned CartPole-v1 (or Atari) hyperparameters,
logging the same TensorBoard tags as this project's scripts, so benchmarks/benchmark.py measures both:

    python benchmarks/benchmark.py --script benchmarks/sb3_a2c.py --env-ids CartPole-v1
    python benchmarks/benchmark.py --script benchmarks/sb3_a2c.py --env-ids BreakoutNoFrameskip-v4 --extra "--total-timesteps 2000000"

rl-zoo (hyperparams/a2c.yml): CartPole-v1: n_envs 8, n_timesteps 5e5, MlpPolicy, ent_coef 0.0;
atari: AtariWrapper, frame_stack 4, CnnPolicy, n_envs 16, ent_coef 0.01, vf_coef 0.25, RMSpropTFLike
(eps 1e-5); everything else SB3's defaults (RMSprop, lr 7e-4, n_steps 5, gamma 0.99, MSE value loss).
For Atari its Monitor sits under the AtariWrapper, so the logged return is the whole game's, unclipped.
Needs `pip install stable-baselines3` (benchmarks/requirements.txt); a comparison only.
"""

import argparse
import time
from collections import deque

import numpy as np

from stable_baselines3 import A2C
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_atari_env, make_vec_env
from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike
from stable_baselines3.common.vec_env import VecFrameStack
from torch.utils.tensorboard import SummaryWriter


class LogEpisodes(BaseCallback):
    """charts/episodic_return and charts/SPS, as this project's scripts log them; stops training
    once the mean of the last 100 returns reaches `threshold` (all the comparison measures)."""

    def __init__(self, writer, threshold):
        super().__init__()
        self.writer, self.start, self.last_sps = writer, time.time(), 0
        self.threshold, self.recent = threshold, deque(maxlen=100)

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "episode" in info:
                self.writer.add_scalar("charts/episodic_return", info["episode"]["r"], self.num_timesteps)
                self.recent.append(info["episode"]["r"])
        if len(self.recent) == 100 and np.mean(self.recent) >= self.threshold:
            self.writer.add_scalar("charts/SPS", int(self.num_timesteps / (time.time() - self.start)),
                                   self.num_timesteps)
            return False
        if self.num_timesteps - self.last_sps >= 2000:
            self.last_sps = self.num_timesteps
            sps = int(self.num_timesteps / (time.time() - self.start))
            self.writer.add_scalar("charts/SPS", sps, self.num_timesteps)
            print(f"global_step={self.num_timesteps} SPS: {sps}", flush=True)  # for benchmarks/side_by_side.py
        return True


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--env-id", default="CartPole-v1")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--total-timesteps", type=int, default=500_000)
    p.add_argument("--stop-at", type=float, default=475.0, help="stop once the 100-episode mean reaches it")
    a = p.parse_args()
    writer = SummaryWriter(f"runs/{a.env_id.replace('/', '-')}__sb3_a2c__{a.seed}__{int(time.time())}")
    if "NoFrameskip" in a.env_id or a.env_id.startswith("ALE/"):
        import ale_py, gymnasium
        gymnasium.register_envs(ale_py)
        a.stop_at = float("inf")
        env = VecFrameStack(make_atari_env(a.env_id, n_envs=16, seed=a.seed), n_stack=4)
        model = A2C("CnnPolicy", env, ent_coef=0.01, vf_coef=0.25, seed=a.seed, device="cpu",
                    policy_kwargs=dict(optimizer_class=RMSpropTFLike, optimizer_kwargs=dict(eps=1e-5)))
    else:
        env = make_vec_env(a.env_id, n_envs=8, seed=a.seed)
        model = A2C("MlpPolicy", env, ent_coef=0.0, seed=a.seed, device="cpu")
    model.learn(a.total_timesteps, callback=LogEpisodes(writer, a.stop_at))
    writer.close()


if __name__ == "__main__":
    main()
