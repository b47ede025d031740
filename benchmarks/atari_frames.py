"""Are the frames ppo.py and a2c.py learn from the usual ones? ale-py's vector env (what the scripts
use) against a peer's preprocessing, one game each, the same seed and actions, with no no-op starts,
no FIRE at reset, no sticky actions and no frame stack (each of them random or left to a wrapper's
order): the newest 84x84 grey frame after each step, until the game ends.

    pip install -r benchmarks/requirements.txt   # opencv: AtariPreprocessing needs it; the scripts do not
    python benchmarks/atari_frames.py    # against Gymnasium's AtariPreprocessing (cv2 INTER_AREA resize)
    python benchmarks/atari_frames.py --cleanrl CLEANRL_DIR --cleanrl-python CLEANRL_DIR/.venv/bin/python
                                         # against CleanRL's ppo_atari.py wrappers, in CleanRL's environment

Prints, per game, the steps compared, the largest difference of any pixel (0 to 255) before the
game's last frame and at it, and the share of pixels that differ by more than 8.
"""
import argparse
import os
import subprocess
import tempfile

import ale_py
import gymnasium as gym
import numpy as np
from ale_py.vector_env import AtariVectorEnv

GAMES = [("pong", "PongNoFrameskip-v4"), ("breakout", "BreakoutNoFrameskip-v4")]
MAX_STEPS = 1000

# CleanRL's ppo_atari.py makes its env with these wrappers (and others that add no-op starts, lives and
# rewards, left out here); run in CleanRL's own virtual environment (gymnasium 0.29), frames to a .npy file.
CLEANRL_FRAMES = """
import sys; sys.path.insert(0, sys.argv[1])
import numpy as np, gymnasium as gym
from cleanrl_utils.atari_wrappers import MaxAndSkipEnv
env = gym.wrappers.GrayScaleObservation(gym.wrappers.ResizeObservation(MaxAndSkipEnv(gym.make(sys.argv[2]), skip=4), (84, 84)))
env.reset(seed=0)
rng, frames = np.random.default_rng(0), []
for _ in range({max_steps}):
    obs, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
    frames.append(np.asarray(obs))
    if terminated or truncated:
        break
np.save(sys.argv[3], np.array(frames))
"""


def ale_py_frames(game: str, steps: int) -> np.ndarray:
    """The scripts' env with everything random switched off, stepped with the peers' action sequence (the
    same minimal action set, so the same draws give the same actions)."""
    envs = AtariVectorEnv(game, 1, noop_max=0, stack_num=1, use_fire_reset=False, reward_clipping=False,
                          repeat_action_probability=0.0, num_threads=1)
    envs.reset(seed=0)
    rng, frames = np.random.default_rng(0), []
    for _ in range(steps):
        obs, *_ = envs.step(np.array([int(rng.integers(envs.single_action_space.n))]))
        frames.append(obs[0, -1])
    return np.array(frames)


def gymnasium_frames(env_id: str) -> np.ndarray:
    try:
        env = gym.wrappers.AtariPreprocessing(gym.make(env_id), noop_max=0, frame_skip=4, screen_size=84,
                                              grayscale_obs=True)
    except gym.error.DependencyNotInstalled:
        raise SystemExit("Gymnasium's AtariPreprocessing needs opencv: pip install opencv-python-headless") from None
    env.reset(seed=0)
    rng, frames = np.random.default_rng(0), []
    for _ in range(MAX_STEPS):
        obs, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
        frames.append(obs)
        if terminated or truncated:
            break
    return np.array(frames)


def cleanrl_frames(env_id: str, cleanrl_dir: str, python: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "frames.npy")
        done = subprocess.run([python, "-c", CLEANRL_FRAMES.format(max_steps=MAX_STEPS), cleanrl_dir, env_id, path],
                              stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise SystemExit(f"CleanRL's wrappers failed in {python}:\n{done.stderr}")
        return np.load(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cleanrl", help="a CleanRL checkout (with cleanrl_utils/): compare with its wrappers")
    parser.add_argument("--cleanrl-python", help="the Python of CleanRL's virtual environment")
    args = parser.parse_args()
    if bool(args.cleanrl) != bool(args.cleanrl_python):
        parser.error("--cleanrl and --cleanrl-python go together")
    gym.register_envs(ale_py)
    for game, env_id in GAMES:
        peer = (cleanrl_frames(env_id, args.cleanrl, args.cleanrl_python) if args.cleanrl
                else gymnasium_frames(env_id))
        ours = ale_py_frames(game, len(peer))
        diff = np.abs(ours.astype(int) - peer.astype(int))
        print(f"{env_id}: {len(peer)} steps; largest pixel difference {diff[:-1].max()} before the last frame, "
              f"{diff[-1].max()} at it; pixels off by more than 8: {(diff > 8).mean():.3%}")


if __name__ == "__main__":
    main()
