#!/usr/bin/env bash
# The suite every script's defaults are chosen on: each script with its default flags but
# --env-id and --seed (ppo_continuous.py's Box2D envs: the flags README's Use table gives them),
# 5 seeds (BipedalWalker 3), two runs at a time on two cores. One table
# (results.md) and one plot (curves.png) per script and group, under benchmarks/results/SCRIPT/suite*.
#
#   benchmarks/suite.sh ppo          # one script's suite; or: a2c, reinforce, ppo_continuous, a2c_continuous, sb3
#
# Hours of CPU in all (see README for each part's time); run the parts you need.
set -euo pipefail
cd "$(dirname "$0")/.."
bench() { python benchmarks/benchmark.py --parallel 2 --ratio-runs 0 --eval "$@"; }
discrete="CartPole-v1 Acrobot-v1 LunarLander-v3 MountainCar-v0"
case "${1:-}" in
  ppo)            bench --script ppo.py --env-ids $discrete --out benchmarks/results/ppo/suite ;;
  a2c)            bench --script a2c.py --env-ids $discrete --out benchmarks/results/a2c/suite ;;
  reinforce)      bench --script reinforce.py --env-ids $discrete --extra "--total-timesteps 1000000" \
                        --out benchmarks/results/reinforce/suite ;;
  # ppo_continuous.py's defaults are MuJoCo's; the Box2D envs take their own flags (README, Use).
  ppo_continuous) bench --script ppo_continuous.py --env-ids Pendulum-v1 --out benchmarks/results/ppo_continuous/suite
                  bench --script ppo_continuous.py --env-ids LunarLanderContinuous-v3 \
                        --extra "--gamma 0.999 --gae-lambda 0.98 --num-envs 8 --num-steps 256 --update-epochs 4" \
                        --out benchmarks/results/ppo_continuous/LunarLanderContinuous-v3-8envs
                  bench --script ppo_continuous.py --env-ids BipedalWalker-v3 --seeds 1 2 3 \
                        --extra "--total-timesteps 3000000 --gamma 0.999 --gae-lambda 0.95 --ent-coef 0.001" \
                        --out benchmarks/results/ppo_continuous/BipedalWalker-v3 ;;
  a2c_continuous) bench --script a2c.py --env-ids Pendulum-v1 LunarLanderContinuous-v3 \
                        --out benchmarks/results/a2c/suite-continuous
                  bench --script a2c.py --env-ids BipedalWalker-v3 --seeds 1 2 3 \
                        --extra "--total-timesteps 3000000" --out benchmarks/results/a2c/suite-bipedalwalker ;;
  # Stable-Baselines3's PPO with rl-zoo's hyperparameters, one run at a time beside nothing else:
  # run it at the same time as the `ppo` part so both see the machine at the same speed.
  sb3)            python benchmarks/benchmark.py --script benchmarks/sb3_ppo.py --ratio-runs 0 \
                        --env-ids LunarLander-v3 LunarLanderContinuous-v3 --out benchmarks/results/ppo/sb3-suite ;;
  *) echo "usage: $0 ppo|a2c|reinforce|ppo_continuous|a2c_continuous|sb3" >&2; exit 2 ;;
esac
