#!/usr/bin/env bash
# Two versions of a script side by side, one core each, started together seed by seed, so both
# see the machine at the same speed (it drifts by tens of percent over minutes here):
#
#   benchmarks/old_vs_new.sh OLD_COMMIT SCRIPT ENV_ID OUT_DIR     e.g. f703c91 ppo.py CartPole-v1 /tmp/pairs
#
# Each run uses its version's default flags but --env-id and --seed. Writes OUT_DIR/{old,new}/SEED.log
# (ending with the run's start and end times) and the runs' TensorBoard logs under OUT_DIR/{old,new}/runs.
set -euo pipefail
[ $# -eq 4 ] || { echo "usage: $0 OLD_COMMIT SCRIPT ENV_ID OUT_DIR" >&2; exit 2; }
old_commit=$1; script=$2; env_id=$3; out=$(realpath -m "$4")
root=$(cd "$(dirname "$0")/.." && pwd)
old_tree=$(mktemp -d)   # each script is one self-contained file: the old one is all the old version needs
git -C "$root" show "$old_commit:$script" > "$old_tree/$script"
export OMP_NUM_THREADS=1
for seed in 1 2 3 4 5; do
  for version in old new; do
    src=$([ $version = old ] && echo "$old_tree" || echo "$root")
    mkdir -p "$out/$version"
    (cd "$out/$version" && start=$(date +%s.%N) &&
     python "$src/$script" --env-id "$env_id" --seed $seed > $seed.log 2>&1;
     echo "start=$start end=$(date +%s.%N)" >> $seed.log) &
  done
  wait
done
