#!/usr/bin/env bash
# The synthetic long-tailed protocol (examples/synthetic_lt.py) with its student runs in parallel, one process
# per (method, seed), each pinned to one CPU core: for a machine with one GPU and many cores, where one run
# leaves the GPU mostly idle. The same commands as synthetic_lt.py, so the output folder is the same and a
# later plain `python examples/synthetic_lt.py --out OUT ...` skips every finished step.
#
#   examples/synthetic_lt_parallel.sh OUT METHODS SEEDS [synthetic_lt.py options...]
#   examples/synthetic_lt_parallel.sh /tmp/lt none,ekd,fopro 0,1,2 --device cuda
#
# 1. data, teacher and probe (and the first student run) by one synthetic_lt.py process;
# 2. every other (method, seed) as its own synthetic_lt.py process, all at once, one core each;
# 3. one synthetic_lt.py process over all methods and seeds: skips the runs, writes results.md/json/png.
# DEADLINE (seconds, default none) stops the runs still going at that time and skips step 3 (a stopped run resumes
# on the next call). PYTHON (default python3) is the interpreter that has fopro's dependencies.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 OUT METHODS SEEDS [synthetic_lt.py options...]   (e.g. $0 /tmp/lt none,ekd 0,1,2 --device cuda)" >&2
  exit 2
fi
out=$1 methods=$2 seeds=$3
shift 3
here=$(cd "$(dirname "$0")" && pwd)
cores=$(nproc)
started=$(date +%s)
left() { if [ -n "${DEADLINE:-}" ]; then echo $((DEADLINE - ($(date +%s) - started))); else echo 1000000; fi; }

IFS=, read -r -a method_list <<<"$methods"
IFS=, read -r -a seed_list <<<"$seeds"
configs=()
for method in "${method_list[@]}"; do
  config="$here/configs/synthetic_lt/$method.yaml"
  [ -f "$config" ] || { echo "error: unknown method '$method' in METHODS: there is no $config" >&2; exit 2; }
  configs+=("$config")
done
mkdir -p "$out/configs" "$out/logs"
cp "${configs[@]}" "$out/configs/"  # copied once here, so that parallel processes never write them

first_method=${method_list[0]} first_seed=${seed_list[0]}
OMP_NUM_THREADS=1 setsid "${PYTHON:-python3}" "$here/synthetic_lt.py" --out "$out" --methods "$first_method" --seeds "$first_seed" "$@" \
  >"$out/logs/$first_method-seed$first_seed.log" 2>&1 &
first=$!
declare -A run_of=(["$first"]="$first_method-seed$first_seed")
while [ ! -f "$out/probe/probe.json" ]; do  # the others start once data, teacher and probe exist
  if ! kill -0 "$first" 2>/dev/null; then
    code=0
    wait "$first" || code=$?
    [ -f "$out/probe/probe.json" ] && break
    tail -20 "$out/logs/$first_method-seed$first_seed.log" >&2
    echo "error: the first process (exit code $code) ended before $out/probe/probe.json existed; its log: $out/logs/$first_method-seed$first_seed.log" >&2
    exit 1
  fi
  sleep 2
done

pids=() slot=0
for method in "${method_list[@]}"; do
  for seed in "${seed_list[@]}"; do
    [ "$method-$seed" = "$first_method-$first_seed" ] && continue
    slot=$(((slot + 1) % cores))
    OMP_NUM_THREADS=1 setsid taskset -c "$slot" "${PYTHON:-python3}" "$here/synthetic_lt.py" --out "$out" --methods "$method" --seeds "$seed" "$@" \
      >"$out/logs/$method-seed$seed.log" 2>&1 &
    pids+=($!)
    run_of[$!]="$method-seed$seed"
  done
done
status=0
for pid in "$first" "${pids[@]}"; do
  budget=$(left)
  while kill -0 "$pid" 2>/dev/null && [ "$budget" -gt 0 ]; do sleep 2; budget=$(left); done
  if kill -0 "$pid" 2>/dev/null; then
    echo "deadline: stopping the runs still going" >&2
    for other in "$first" "${pids[@]}"; do kill -- "-$other" 2>/dev/null || true; done  # each its own group (setsid)
    status=1
    break
  fi
  if ! wait "$pid"; then
    echo "error: run ${run_of[$pid]} failed; its log: $out/logs/${run_of[$pid]}.log" >&2
    status=1
  fi
done

finished=()
for method in "${method_list[@]}"; do
  for seed in "${seed_list[@]}"; do
    [ -f "$out/runs/$method-seed$seed/eval_test.json" ] && finished+=("$method-seed$seed")
  done
done
echo "finished runs: ${finished[*]:-none}"
[ "$status" = 0 ] && OMP_NUM_THREADS=$cores "${PYTHON:-python3}" "$here/synthetic_lt.py" --out "$out" --methods "$methods" --seeds "$seeds" "$@"
exit "$status"
