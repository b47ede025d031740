#!/usr/bin/env bash
# Atari (issue 12): ppo.py and a2c.py on Breakout and Pong, and the peers side by side, at 2M env
# steps by default (STEPS=10000000 for the published 10M budget). Each part is one or two runs at a
# time on the two cores; with OMP_NUM_THREADS=1 each run keeps to one torch thread, so two runs
# share the machine evenly. Hours of CPU: an hour or more per 2M-step run on this machine.
#
#   benchmarks/atari.sh ppo          # ppo.py, ALE/Breakout-v5 and ALE/Pong-v5 (sticky actions 0.25), 3 seeds
#   benchmarks/atari.sh a2c          # a2c.py, the same, 2 seeds
#   CLEANRL=DIR benchmarks/atari.sh cleanrl   # ppo.py beside CleanRL's ppo_atari.py, BreakoutNoFrameskip-v4
#   benchmarks/atari.sh sb3          # a2c.py beside SB3's A2C (rl-zoo's Atari settings), BreakoutNoFrameskip-v4
#
# CLEANRL is a folder holding CleanRL's ppo_atari.py and cleanrl_utils/, with a virtual environment
# .venv of its own (gymnasium 0.29.1, ale-py 0.9.1, numpy<2, opencv-python-headless, tyro,
# tensorboard, torch) and a sitecustomize.py that imports ale_py, so its NoFrameskip-v4 ids exist.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
STEPS=${STEPS:-2000000}
bench() { python benchmarks/benchmark.py --ratio-runs 0 --extra "--total-timesteps $STEPS" "$@"; }
case "${1:-}" in
  ppo) bench --script ppo.py --env-ids ALE/Breakout-v5 ALE/Pong-v5 --seeds 1 2 3 --parallel 2 --eval \
             --out benchmarks/results/ppo/atari ;;
  a2c) bench --script a2c.py --env-ids ALE/Breakout-v5 ALE/Pong-v5 --seeds 1 2 --parallel 2 --eval \
             --out benchmarks/results/a2c/atari ;;
  cleanrl)
    bench --script ppo.py --env-ids BreakoutNoFrameskip-v4 --seeds 1 --eval --out benchmarks/results/ppo/atari-vs-cleanrl/ours &
    python benchmarks/benchmark.py --ratio-runs 0 --script "$CLEANRL/ppo_atari.py" --python "$CLEANRL/.venv/bin/python" \
        --env-ids BreakoutNoFrameskip-v4 --seeds 1 --extra "--total-timesteps $STEPS --no-cuda" \
        --out benchmarks/results/ppo/atari-vs-cleanrl/cleanrl
    wait ;;
  sb3)
    bench --script a2c.py --env-ids BreakoutNoFrameskip-v4 --seeds 1 --eval --out benchmarks/results/a2c/atari-vs-sb3/ours &
    bench --script benchmarks/sb3_a2c.py --env-ids BreakoutNoFrameskip-v4 --seeds 1 --out benchmarks/results/a2c/atari-vs-sb3/sb3
    wait ;;
  *) echo "usage: $0 ppo|a2c|cleanrl|sb3" >&2; exit 2 ;;
esac
