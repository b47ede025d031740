"""Stable-Baselines3's PPO with rl-baselines3-zoo's tuned LunarLander hyperparameters, logging
the same TensorBoard tags as this project's scripts, so benchmarks/benchmark.py measures both:

    python benchmarks/benchmark.py --script benchmarks/sb3_ppo.py --env-ids LunarLander-v3 --ratio-runs 0

rl-zoo (hyperparams/ppo.yml), the same for LunarLander and LunarLanderContinuous: n_envs 16,
n_timesteps 1e6, MlpPolicy, n_steps 1024, batch_size 64, n_epochs 4, gae_lambda 0.98,
gamma 0.999, ent_coef 0.01; everything else SB3's defaults (Adam, lr 3e-4, clip 0.2, no value
clipping, 64-64 tanh actor and critic). Runs all 1M steps: the comparison wants the time to a
100-episode mean of 200 and the return at the end.
Needs `pip install stable-baselines3` (benchmarks/requirements.txt); a comparison only.
"""

import argparse
import time

from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from torch.utils.tensorboard import SummaryWriter

from sb3_a2c import LogEpisodes

RL_ZOO = {env_id: dict(n_steps=1024, batch_size=64, n_epochs=4, gae_lambda=0.98, gamma=0.999, ent_coef=0.01)
          for env_id in ["LunarLander-v3", "LunarLanderContinuous-v3"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--env-id", default="LunarLander-v3", choices=sorted(RL_ZOO))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--total-timesteps", type=int, default=1_000_000)
    a = p.parse_args()
    writer = SummaryWriter(f"runs/{a.env_id}__sb3_ppo__{a.seed}__{int(time.time())}")
    env = make_vec_env(a.env_id, n_envs=16, seed=a.seed)
    model = PPO("MlpPolicy", env, seed=a.seed, device="cpu", **RL_ZOO[a.env_id])
    model.learn(a.total_timesteps, callback=LogEpisodes(writer, threshold=float("inf")))
    writer.close()


if __name__ == "__main__":
    main()
