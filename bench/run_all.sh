#!/usr/bin/env bash
# Run every lrft benchmark in sequence; each prints a table and writes bench/results/<name>.json.
# Takes about 1 h 45 min on 2 CPU cores (vs_trainer alone ~55 min). Run it on a machine you
# are not using for anything else: the benchmarks time each other otherwise.
#   bash bench/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for script in startup padding loop_overhead fixes optimizer_memory scaling vs_trainer; do
  echo "=== bench/${script}.py ($(date +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))"
  python "bench/${script}.py"
done
