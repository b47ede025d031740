#!/usr/bin/env bash
# Many processes (issue 14): the same script alone and as 2 data-parallel ranks under torchrun, at
# equal total env steps (--total-timesteps counts every rank's), each run alone on the machine's two
# cores, so each SPS is clean. The single process uses one core (its MLP runs on one thread); the
# two ranks, one core each.
#
#   benchmarks/torchrun.sh ppo_continuous     # HalfCheetah-v5, 1M steps, seeds 1 2 3 (SEEDS to choose)
#   benchmarks/torchrun.sh cartpole           # ppo.py and a2c.py on CartPole-v1, their default budgets, seeds 1 2 3
#   benchmarks/torchrun.sh atari              # ppo.py on BreakoutNoFrameskip-v4, STEPS (500k), seed 1; the
#                                             # single process takes both cores (2 torch threads), each rank one
set -euo pipefail
cd "$(dirname "$0")/.."
TORCHRUN="python -m torch.distributed.run --standalone --nproc-per-node 2"
bench() { python benchmarks/benchmark.py --ratio-runs 0 --parallel 1 --eval "$@"; }
case "${1:-}" in
  ppo_continuous)
    out=benchmarks/results/ppo_continuous/torchrun-HalfCheetah-v5
    bench --script ppo_continuous.py --env-ids HalfCheetah-v5 --seeds ${SEEDS:-1 2 3} --out $out/1-process
    bench --script ppo_continuous.py --env-ids HalfCheetah-v5 --seeds ${SEEDS:-1 2 3} --launcher "$TORCHRUN" --out $out/2-processes ;;
  cartpole)
    for algo in ppo a2c; do
      out=benchmarks/results/$algo/torchrun-CartPole-v1
      bench --script $algo.py --env-ids CartPole-v1 --seeds ${SEEDS:-1 2 3} --out $out/1-process
      bench --script $algo.py --env-ids CartPole-v1 --seeds ${SEEDS:-1 2 3} --launcher "$TORCHRUN" --out $out/2-processes
    done ;;
  atari)
    out=benchmarks/results/ppo/torchrun-BreakoutNoFrameskip-v4
    steps="--total-timesteps ${STEPS:-500000}"
    bench --script ppo.py --env-ids BreakoutNoFrameskip-v4 --seeds 1 --extra "$steps" --out $out/1-process
    bench --script ppo.py --env-ids BreakoutNoFrameskip-v4 --seeds 1 --extra "$steps" --launcher "$TORCHRUN" --out $out/2-processes ;;
  *) echo "usage: $0 ppo_continuous|cartpole|atari" >&2; exit 2 ;;
esac
