#!/usr/bin/env bash
# The README's GIFs: each headline env's trained agent, one evaluation episode (deterministic policy,
# seed 1) of a saved model, filmed by the script itself (--eval-checkpoint --capture-video), the
# episode's start made a small GIF by benchmarks/gif.py. Needs moviepy.
#
#   benchmarks/videos.sh
#
# The models are those the README's benchmark commands save (their runs/ folders stay out of git):
# a2c.py's CartPole-v1 run, ppo_continuous.py's MuJoCo runs with the default objective (the `clip`
# setting of kl_penalty.sh, or mujoco/), a2c.py's Atari runs (atari.sh). Where none is on disk, as
# in a fresh clone, the script trains one with its defaults and --seed 1 first: minutes for CartPole
# and each MuJoCo env, about an hour of one core for Breakout's 2M steps.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd) out=benchmarks/results/videos work=$(mktemp -d)
mkdir -p "$out"
model() {  # SCRIPT ENV_ID TRAIN_FLAGS GLOB...: the first saved model the globs find, else a new one
  local script=$1 env_id=$2 train=$3
  shift 3
  local found
  found=$(ls "$@" 2>/dev/null | head -1 || true)
  if [ -z "$found" ]; then
    echo "$env_id: no saved model; training one ($script --seed 1 $train)" >&2
    (cd "$work" && python "$root/$script" --env-id "$env_id" --seed 1 --save-model $train >&2)
    found=$(ls "$work"/runs/"$env_id"__*/model.pt | head -1)
  fi
  echo "$found"
}
film() {  # SCRIPT ENV_ID MODEL [gif.py flags]
  local script=$1 env_id=$2 model=$3
  shift 3
  (cd "$work" && python "$root/$script" --env-id "$env_id" --eval-checkpoint "$model" --eval-episodes 1 --capture-video)
  python benchmarks/gif.py "$(ls "$work"/videos/"$env_id"__*-eval__*/*.mp4 | head -1)" "$out/$env_id.gif" "$@"
}
film a2c.py CartPole-v1 "$(model a2c.py CartPole-v1 "" benchmarks/results/a2c/CartPole-v1/runs/CartPole-v1__a2c__1__*/model.pt)" \
    --width 240 --seconds 6
for env_id in HalfCheetah-v5 Hopper-v5 Walker2d-v5; do
  film ppo_continuous.py $env_id "$(model ppo_continuous.py $env_id "" \
      benchmarks/results/ppo_continuous/objectives/clip/$env_id/runs/${env_id}__clip__1__*/model.pt \
      benchmarks/results/ppo_continuous/mujoco/runs/${env_id}__ppo_continuous__1__*/model.pt)" --width 200 --seconds 6
done
film a2c.py BreakoutNoFrameskip-v4 "$(model a2c.py BreakoutNoFrameskip-v4 "--total-timesteps 2000000" \
    benchmarks/results/a2c/atari-*/runs/BreakoutNoFrameskip-v4__a2c__*/model.pt \
    benchmarks/results/a2c/atari-*/ours/runs/BreakoutNoFrameskip-v4__a2c__*/model.pt)" --width 168 --seconds 20
rm -rf "$work"
