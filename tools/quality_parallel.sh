#!/bin/bash
# Several tools/quality_ablation.py processes on one GPU at once (a small model does not fill an
# H200, so four processes finish about twice as many runs an hour as one); one JSON per process
# and one merged log in $OUT.  Step times of such runs are not speed measures.
#
#   SEEDS="0 1" bash tools/quality_parallel.sh SEQ_LEN BATCH TIME_LIMIT_S "configs of process 0" "configs of 1" ...
#   e.g. bash tools/quality_parallel.sh 8192 4 575 "dense window128" "hash16 hash32 window256" \
#            "hash16w128 hash32w128" "hash16w256 hash32w256"
#
# tools/quality_merge.py then gathers the files into results/quality_<device>.json.
T=$1; B=$2; L=$3; shift 3
OUT=${OUT:-runs/quality-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used --format=csv > "$OUT/gpu.txt" 2>/dev/null
i=0
for cfgs in "$@"; do
  # shellcheck disable=SC2086  # $cfgs and $SEEDS are word lists
  (PYTHONPATH=. timeout "$L" python3 tools/quality_ablation.py --out "$OUT/q${T}_$i.json" --seq-len "$T" \
     --batch "$B" --configs $cfgs --seeds ${SEEDS:-0 1} --work-dir /tmp/quality \
     --note "$# training processes shared one GPU at once: median_step_ms is not a speed measure" 2>&1 \
     | sed "s/^/[p$i] /" >> "$OUT/log_$T.txt") &
  i=$((i+1))
done
wait
tail -50 "$OUT/log_$T.txt"
