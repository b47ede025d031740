#!/usr/bin/env bash
# The seed's three objectives side by side (issue 15): the PPO paper's Table 1, in small.
# Four settings of the policy's objective, each otherwise the script's defaults:
#   cpi       no clipping, no penalty (L^CPI)        --clip-coef None
#   clip      clipping, epsilon 0.2 (L^CLIP)          (the default)
#   kl-adapt  adaptive KL penalty, d_targ 0.01        --clip-coef None --kl-dtarg 0.01
#   kl-fixed  fixed KL penalty, beta 1                --clip-coef None --kl-beta 1
#
#   benchmarks/kl_penalty.sh mujoco     # ppo_continuous.py, HalfCheetah/Hopper/Walker2d-v5, 3 seeds, 1M steps
#   benchmarks/kl_penalty.sh discrete   # ppo.py, CartPole-v1 and Acrobot-v1, 5 seeds, default budgets
#   python benchmarks/objectives.py benchmarks/results/ppo_continuous/objectives   # the table (normalised scores)
#
# Two runs at a time on the two cores (OMP_NUM_THREADS=1; PARALLEL=1 for one); ENVS="..." for some envs only,
# SETTINGS="..." for some settings only (e.g. two shells each running part of the table). mujoco is hours of CPU: 36 runs of ~4-5 min.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
declare -A FLAGS=([cpi]="--clip-coef None" [clip]="" [kl-adapt]="--clip-coef None --kl-dtarg 0.01"
                  [kl-fixed]="--clip-coef None --kl-beta 1")
run() {  # run SCRIPT OUT ENV_IDS SEEDS: one folder per setting and env, OUT/SETTING/ENV_ID
  for env_id in ${ENVS:-$3}; do
    for setting in ${SETTINGS:-cpi clip kl-adapt kl-fixed}; do
      python benchmarks/benchmark.py --script "$1" --env-ids $env_id --seeds $4 --parallel ${PARALLEL:-2} --ratio-runs 0 \
          --extra "--exp-name $setting --save-model ${FLAGS[$setting]}" --out "$2/$setting/$env_id"
    done
  done
}
case "${1:-}" in
  mujoco)   out=benchmarks/results/ppo_continuous/objectives
            run ppo_continuous.py $out "HalfCheetah-v5 Hopper-v5 Walker2d-v5" "1 2 3" ;;
  discrete) out=benchmarks/results/ppo/objectives
            run ppo.py $out "CartPole-v1 Acrobot-v1" "1 2 3 4 5" ;;
  *) echo "usage: $0 mujoco|discrete" >&2; exit 2 ;;
esac
python benchmarks/objectives.py $out
