#!/usr/bin/env bash
# The README's GIFs: each headline env's trained agent, one evaluation episode (deterministic policy,
# seed 1) of a saved model, filmed by the script itself (--eval-checkpoint --capture-video), the
# episode's start made a small GIF by benchmarks/gif.py. Needs moviepy.
#
#   benchmarks/videos.sh
#
# The models are those the README's benchmark commands save (their runs/ folders stay out of git),
# the first found of: a2c.py's CartPole-v1 run; ppo_continuous.py's MuJoCo runs with the default
# objective (the `clip` setting of kl_penalty.sh, or mujoco/); a2c.py's Atari runs (atari.sh, seed 1,
# else seed 2). Where none is on disk, as in a fresh clone, the script first trains one with its
# defaults and --seed 1 (kept in benchmarks/results/videos/runs/ for the next time): minutes for
# CartPole and each MuJoCo env, about an hour of one core for Breakout's 2M steps.
set -euo pipefail
shopt -s nullglob inherit_errexit
cd "$(dirname "$0")/.."
root=$(pwd) out=$(pwd)/benchmarks/results/videos work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
model() {  # SCRIPT ENV_ID TRAIN_FLAGS GLOB...: the first model.pt the globs find, in their order, else a new one
  local script=$1 env_id=$2 train=$3 pattern paths
  shift 3
  for pattern in "$@"; do
    paths=($pattern)
    if [ ${#paths[@]} -gt 0 ]; then echo "${paths[-1]}"; return; fi  # the newest of a pattern's runs
  done
  echo "$env_id: no saved model; training one ($script --seed 1 $train)" >&2
  (cd "$out" && python "$root/$script" --env-id "$env_id" --seed 1 --save-model $train >&2)
  paths=("$out"/runs/"$env_id"__*__1__*/model.pt)
  echo "${paths[-1]}"
}
film() {  # SCRIPT ENV_ID MODEL [gif.py flags]
  local script=$1 env_id=$2 model=$3 videos
  shift 3
  (cd "$work" && python "$root/$script" --env-id "$env_id" --eval-checkpoint "$model" --eval-episodes 1 --capture-video)
  videos=("$work"/videos/"$env_id"__*-eval__*/*.mp4)
  python benchmarks/gif.py "${videos[0]}" "$out/$env_id.gif" "$@"
}
runs=$root/benchmarks/results
film a2c.py CartPole-v1 "$(model a2c.py CartPole-v1 "" "$runs/a2c/CartPole-v1/runs/CartPole-v1__a2c__1__*/model.pt" \
    "$out/runs/CartPole-v1__*__1__*/model.pt")" --width 240 --seconds 6
for env_id in HalfCheetah-v5 Hopper-v5 Walker2d-v5; do
  film ppo_continuous.py $env_id "$(model ppo_continuous.py $env_id "" \
      "$runs/ppo_continuous/objectives/clip/$env_id/runs/${env_id}__clip__1__*/model.pt" \
      "$runs/ppo_continuous/mujoco/runs/${env_id}__ppo_continuous__1__*/model.pt" \
      "$out/runs/${env_id}__*__1__*/model.pt")" --width 200 --seconds 6
done
film a2c.py BreakoutNoFrameskip-v4 "$(model a2c.py BreakoutNoFrameskip-v4 "--total-timesteps 2000000" \
    "$runs/a2c/atari-s1/runs/BreakoutNoFrameskip-v4__a2c__1__*/model.pt" \
    "$runs/a2c/atari-s2*/runs/BreakoutNoFrameskip-v4__a2c__2__*/model.pt" \
    "$out/runs/BreakoutNoFrameskip-v4__*__1__*/model.pt")" --width 168 --seconds 20
