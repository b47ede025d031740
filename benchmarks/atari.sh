#!/usr/bin/env bash
# Atari (issue 12): ppo.py and a2c.py on Breakout and Pong, and the peers side by side, at 2M env
# steps by default (STEPS=10000000 for the published 10M budget). Each part is one or two runs at a
# time on the two cores; with OMP_NUM_THREADS=1 each run keeps to one torch thread, so two runs
# share the machine evenly. Hours of CPU: an hour or more per 2M-step run on this machine.
#
# The games are the NoFrameskip-v4 ids, as CleanRL's and rl-zoo's benchmarks: the peers run the same
# game, and the id's own sticky-action default (0; v5 ids: 0.25) is the one every run uses.
#
#   SEEDS="2" benchmarks/atari.sh ppo     # ppo.py, Breakout and Pong, the seeds given (default 1 2 3)
#   SEEDS="1" benchmarks/atari.sh a2c     # a2c.py, the same (default 1 2)
#   CLEANRL=DIR GAME=Pong benchmarks/atari.sh cleanrl   # ppo.py seed 1 beside CleanRL's ppo_atari.py
#   GAME=Pong benchmarks/atari.sh sb3     # a2c.py seed 1 beside SB3's A2C (rl-zoo's Atari settings)
#
# One invocation per seed keeps each pair's results once it ends (benchmark.py writes at the end).
#
# CLEANRL is a folder holding CleanRL's ppo_atari.py and cleanrl_utils/, with a virtual environment
# .venv of its own (gymnasium 0.29.1, ale-py 0.9.1, numpy<2, opencv-python-headless, tyro,
# tensorboard, torch) and a sitecustomize.py that imports ale_py, so its NoFrameskip-v4 ids exist.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
STEPS=${STEPS:-2000000}
GAME=${GAME:-Breakout}
GAMES="BreakoutNoFrameskip-v4 PongNoFrameskip-v4"
bench() { python benchmarks/benchmark.py --ratio-runs 0 --extra "--total-timesteps $STEPS" "$@"; }
case "${1:-}" in
  ppo) for seed in ${SEEDS:-1 2 3}; do
         bench --script ppo.py --env-ids $GAMES --seeds $seed --parallel 2 --eval --out benchmarks/results/ppo/atari-s$seed
       done ;;
  a2c) for seed in ${SEEDS:-1 2}; do
         bench --script a2c.py --env-ids $GAMES --seeds $seed --parallel 2 --eval --out benchmarks/results/a2c/atari-s$seed
       done ;;
  cleanrl)
    bench --script ppo.py --env-ids ${GAME}NoFrameskip-v4 --seeds 1 --eval --out benchmarks/results/ppo/atari-vs-cleanrl-${GAME}NoFrameskip-v4/ours &
    python benchmarks/benchmark.py --ratio-runs 0 --script "$CLEANRL/ppo_atari.py" --python "$CLEANRL/.venv/bin/python" \
        --env-ids ${GAME}NoFrameskip-v4 --seeds 1 --extra "--total-timesteps $STEPS --no-cuda" \
        --out benchmarks/results/ppo/atari-vs-cleanrl-${GAME}NoFrameskip-v4/cleanrl
    wait ;;
  sb3)
    bench --script a2c.py --env-ids ${GAME}NoFrameskip-v4 --seeds 1 --eval --out benchmarks/results/a2c/atari-vs-sb3-${GAME}NoFrameskip-v4/ours &
    bench --script benchmarks/sb3_a2c.py --env-ids ${GAME}NoFrameskip-v4 --seeds 1 --out benchmarks/results/a2c/atari-vs-sb3-${GAME}NoFrameskip-v4/sb3
    wait ;;
  *) echo "usage: $0 ppo|a2c|cleanrl|sb3" >&2; exit 2 ;;
esac
