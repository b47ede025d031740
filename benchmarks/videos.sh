#!/usr/bin/env bash
# The README's GIFs: each headline env's trained agent, one evaluation episode (deterministic policy,
# seed 1) of a benchmark's seed-1 model, filmed by the script itself (--eval-checkpoint --capture-video),
# the episode's start made a small GIF by benchmarks/gif.py. Needs moviepy.
#
#   benchmarks/videos.sh
#
# The models are those the README's benchmark commands save (their runs/ folders stay out of git):
# a2c.py's CartPole-v1 suite run, ppo_continuous.py's MuJoCo runs, a2c.py's Atari run (atari.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd) out=benchmarks/results/videos work=$(mktemp -d)
mkdir -p "$out"
film() {  # SCRIPT ENV_ID MODEL_GLOB [gif.py flags]
  local script=$1 env_id=$2 model
  model=$(ls $3 | head -1)
  shift 3
  (cd "$work" && python "$root/$script" --env-id "$env_id" --eval-checkpoint "$root/$model" --eval-episodes 1 --capture-video)
  python benchmarks/gif.py "$(ls "$work"/videos/"$env_id"__*-eval__*/*.mp4 | head -1)" "$out/$env_id.gif" "$@"
}
film a2c.py CartPole-v1 "benchmarks/results/a2c/CartPole-v1/runs/CartPole-v1__a2c__1__*/model.pt" --width 240 --seconds 6
for env_id in HalfCheetah-v5 Hopper-v5 Walker2d-v5; do
  film ppo_continuous.py $env_id "benchmarks/results/ppo_continuous/mujoco/runs/${env_id}__ppo_continuous__1__*/model.pt" \
      --width 200 --seconds 6
done
film a2c.py BreakoutNoFrameskip-v4 "benchmarks/results/a2c/atari-s1/runs/BreakoutNoFrameskip-v4__a2c__1__*/model.pt" \
    --width 168 --seconds 20
rm -rf "$work"
