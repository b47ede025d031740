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
#   CLEANRL=DIR GAME=Pong benchmarks/atari.sh cleanrl   # ppo.py beside CleanRL's ppo_atari.py
#   SEED=2 GAME=Pong benchmarks/atari.sh sb3     # a2c.py beside SB3's A2C (rl-zoo's Atari settings)
#
# One invocation per seed keeps each pair's results once it ends (benchmark.py writes at the end).
# In a side-by-side pair (cleanrl, sb3; SEED, default 1, seeds both) the peer is stopped when ours
# has run its STEPS (SIGTERM), so both had the same wall time; compare_runs.py then compares them at the env
# steps both reached (benchmark.py summarises the stopped peer as far as it got, marked "stopped").
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
# beside PEER_SCRIPT PEER_BENCH_FLAGS PEER_EXTRA OUR_SCRIPT OUT PEER_NAME: ours and the peer at once,
# the peer stopped (SIGTERM to its training process) once ours is done.
beside() {
  local env_id=${GAME}NoFrameskip-v4 seed=${SEED:-1}
  bench --script "$4" --env-ids $env_id --seeds $seed --eval --out "$5/ours" &
  local ours=$!
  python benchmarks/benchmark.py --ratio-runs 0 --script "$1" $2 --env-ids $env_id --seeds $seed \
      --extra "--total-timesteps $STEPS $3" --out "$5/$6" &
  local peer=$!
  wait $ours
  pkill -TERM -P $peer || true  # not INT: a non-interactive shell starts its background jobs ignoring SIGINT
  wait $peer || true
}
case "${1:-}" in
  ppo) for seed in ${SEEDS:-1 2 3}; do
         bench --script ppo.py --env-ids $GAMES --seeds $seed --parallel 2 --eval --out benchmarks/results/ppo/atari-s$seed
       done ;;
  a2c) for seed in ${SEEDS:-1 2}; do
         bench --script a2c.py --env-ids $GAMES --seeds $seed --parallel 2 --eval --out benchmarks/results/a2c/atari-s$seed
       done ;;
  cleanrl)
    beside "$CLEANRL/ppo_atari.py" "--python $CLEANRL/.venv/bin/python" "--no-cuda" ppo.py \
        benchmarks/results/ppo/atari-vs-cleanrl-${GAME}NoFrameskip-v4 cleanrl ;;
  sb3)
    beside benchmarks/sb3_a2c.py "" "" a2c.py benchmarks/results/a2c/atari-vs-sb3-${GAME}NoFrameskip-v4 sb3 ;;
  *) echo "usage: $0 ppo|a2c|cleanrl|sb3" >&2; exit 2 ;;
esac
