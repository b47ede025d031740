#!/usr/bin/env bash
# Many processes (issue 14): the same script alone and as 2 data-parallel ranks under torchrun, at
# equal total env steps (--total-timesteps counts every rank's), each run alone on the machine's two
# cores, so each SPS is clean. The single process uses one core (its MLP runs on one thread); the
# two ranks, one core each.
#
#   benchmarks/torchrun.sh ppo_continuous     # HalfCheetah-v5, 1M steps, seeds 1 2 3
set -euo pipefail
cd "$(dirname "$0")/.."
TORCHRUN="python -m torch.distributed.run --standalone --nproc-per-node 2"
bench() { python benchmarks/benchmark.py --ratio-runs 0 --parallel 1 --eval "$@"; }
case "${1:-}" in
  ppo_continuous)
    out=benchmarks/results/ppo_continuous/torchrun-HalfCheetah-v5
    bench --script ppo_continuous.py --env-ids HalfCheetah-v5 --seeds 1 2 3 --out $out/1-process
    bench --script ppo_continuous.py --env-ids HalfCheetah-v5 --seeds 1 2 3 --launcher "$TORCHRUN" --out $out/2-processes ;;
  *) echo "usage: $0 ppo_continuous" >&2; exit 2 ;;
esac
