#!/bin/bash
# Device-run driver: one stage per call of the lent GPU (bash tools/gpu_session.sh STAGE [ARGS]); writes under $OUT.
stage=$1
export TRITON_CACHE_DIR=/tmp/tc
CFGS="sdpa sdpa_cudnn hash16w128 none dense hash16w0 qk0.3"
# One line a row of a probe's JSON file (tools/_rows.py): D, N, variant, ms, TFLOP/s, its checks, its error.
probe_rows() {
  python -c "import json, sys; [print(r['D'], r['N'], r['variant'], round(r.get('ms', 0), 4), round(r.get('tflops', 0)), *(r[k] for k in ('max_diff', 'lse_diff') if k in r), r.get('error', '')[:300]) for r in json.load(open(sys.argv[1]))['rows']]" "$1"
}
# The Gluon forward (sparseflash/hopper.py) once at D 64 and 128 against SDPA, before a stage's probe: a hang
# or a failure to compile ends the stage here, not after the probe's timeout. Args: seconds; the launch
# settings (a Python dict, or None for the defaults).
hopper_smoke() {
  timeout $1 python -c "
import torch, sparseflash.hopper as h
for D in (64, 128):
    q = torch.randn(1, 2, 300, D, device='cuda', dtype=torch.bfloat16)
    o, l = h.hopper_forward(q, q, q, True, D ** -0.5, $2); torch.cuda.synchronize()
    w = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    print('smoke D', D, 'max diff', (o.float() - w.float()).abs().max().item())
" > $OUT/hopper_smoke.log 2>&1
  local rc=$?
  tail -5 $OUT/hopper_smoke.log
  [ $rc = 0 ] || echo "smoke rc=$rc"
  return $rc
}
if [ "$stage" = 1 ]; then
  nvidia-smi -L
  timeout 170 python -m pytest -m gpu -q tests/test_train.py -k reduce_overhead -p no:cacheprovider > $OUT/gpu_test.log 2>&1; echo "rc=$?" >> $OUT/gpu_test.log
  tail -3 $OUT/gpu_test.log
  MODE=reduce-overhead; grep -q "2 passed" $OUT/gpu_test.log || MODE=default
  echo MODE=$MODE
  timeout 400 python -m sparseflash.train.experiment --phase speed --compile --compile-mode $MODE \
    --speed-configs $CFGS --speed-seq-lens 8192 16384 --speed-train-steps 100 \
    --out $OUT/train_h200.json --time-budget 320 --no-progress > $OUT/train.log 2>&1
  tail -30 $OUT/train.log
elif [ "$stage" = 2 ]; then
  MODE=$2
  cp results/train_h200.json $OUT/train_h200.json
  timeout 570 python -m sparseflash.train.experiment --phase speed --compile --compile-mode $MODE --resume \
    --speed-configs $CFGS --speed-seq-lens 8192 16384 --speed-train-steps 100 \
    --out $OUT/train_h200.json --time-budget 480 --no-progress > $OUT/train2.log 2>&1
  tail -30 $OUT/train2.log
elif [ "$stage" = 3 ]; then
  timeout 200 python -m sparseflash.bench.decode --contexts 8192 32768 65536 131072 --batches 1 8 --out $OUT/decode_$KIND.json > $OUT/decode.log 2>&1
  tail -40 $OUT/decode.log
  PYTHONPATH=. timeout 170 python tools/step_profile.py --configs sdpa hash16w128 none --modes default reduce-overhead --seq-len 8192 --out $OUT/step_profile_h200.json > $OUT/profile.log 2>&1
  tail -30 $OUT/profile.log
fi
if [ "$stage" = 4 ]; then
  nvidia-smi -L
  PYTHONPATH=. timeout 200 python tools/step_profile.py --configs hash16w128 none sdpa --modes reduce-overhead --seq-len 8192 --out $OUT/step_profile_rotary_table_h200.json > $OUT/profile.log 2>&1
  grep -v Warn $OUT/profile.log | tail -40
  timeout 130 python -m pytest -m gpu -q -x tests/test_train.py tests/test_generate.py tests/test_decode.py -p no:cacheprovider > $OUT/gpu_tests.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests.log
  tail -4 $OUT/gpu_tests.log
  PYTHONPATH=. timeout 230 python tools/dense_sweep.py --head-dims 64 128 --seq-lens 16384 4096 --time-budget 210 --out $OUT/dense_sweep_h200.json > $OUT/sweep.log 2>&1
  tail -40 $OUT/sweep.log
fi
if [ "$stage" = 5 ]; then
  nvidia-smi -L
  timeout 150 python -m pytest -m gpu -q tests/test_generate.py tests/test_decode.py -p no:cacheprovider > $OUT/gpu_tests.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests.log
  tail -4 $OUT/gpu_tests.log
  timeout 420 python -m sparseflash.train.experiment --phase speed --compile --compile-mode reduce-overhead \
    --speed-configs $CFGS --speed-seq-lens 8192 16384 --speed-train-steps 100 \
    --out $OUT/train_h200.json --time-budget 340 --no-progress > $OUT/train.log 2>&1
  tail -20 $OUT/train.log
fi
if [ "$stage" = 6 ]; then
  cp results/train_h200.json $OUT/train_h200.json
  timeout $2 python -m sparseflash.train.experiment --phase speed --compile --compile-mode reduce-overhead --resume \
    --speed-configs $CFGS --speed-seq-lens 8192 16384 --speed-train-steps 100 \
    --out $OUT/train_h200.json --time-budget $3 --no-progress > $OUT/train2.log 2>&1
  tail -20 $OUT/train2.log
fi
if [ "$stage" = 7 ]; then
  PYTHONPATH=. timeout 200 python tools/step_profile.py --configs hash16w128 none sdpa_cudnn --modes reduce-overhead --seq-len 16384 --out $OUT/step_profile_16k_h200.json > $OUT/profile16k.log 2>&1
  grep -v Warn $OUT/profile16k.log | tail -20
  PYTHONPATH=. timeout 200 python tools/dense_sweep.py --head-dims 64 128 --seq-lens 16384 4096 --passes bwd --bwd 64x64x4x2 64x64x4x3 64x64x4x4 64x64x8x3 128x64x8x2 128x64x8x3 --time-budget 180 --out $OUT/dense_sweep_bwd_stages_h200.json > $OUT/sweep_bwd.log 2>&1
  tail -30 $OUT/sweep_bwd.log
fi
if [ "$stage" = 8 ]; then
  nvidia-smi -L
  timeout 240 python -m pytest -m gpu -q tests/test_window.py tests/test_hash_sparse.py tests/test_qk_sparse.py tests/test_flash.py tests/test_layout.py tests/test_gqa.py -p no:cacheprovider > $OUT/gpu_tests_launch_defaults_h200.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests_launch_defaults_h200.log
  tail -4 $OUT/gpu_tests_launch_defaults_h200.log
  for W in 256 512 1024; do
    PYTHONPATH=. timeout 100 python tools/layout_sweep.py --head-dims 64 --seq-lens 16384 --window $W --fwd --bwd \
      --band-fwd 128x64x8x3 64x64x4x2 64x64x4x3 --band-bwd 64x64x4x4 64x64x4x2 --time-budget 80 --out $OUT/band_sweep_w${W}_h200.json > $OUT/band_w$W.log 2>&1
    grep -o '"kind": "band_[a-z]*", "config": "[0-9x]*".*"ms": [0-9.]*' $OUT/band_w$W.log | sed "s/^/W=$W /"
  done
fi
if [ "$stage" = 9 ]; then
  timeout 560 python -m sparseflash.train.experiment --phase speed --compile --compile-mode reduce-overhead \
    --speed-configs sdpa sdpa_cudnn hash16w128 hash16w0 --speed-seq-lens 8192 16384 --speed-train-steps 100 \
    --out $OUT/train_h200_launch_defaults.json --time-budget 480 --no-progress > $OUT/train_launch_defaults.log 2>&1
  grep -v Warn $OUT/train_launch_defaults.log | tail -12
fi
if [ "$stage" = 10 ]; then
  # $2: seconds this stage may take in all. Trains dense and hash16 ∪ w128 (6x512, T=8192, 1000 steps)
  # side by side for the samples, runs the GPU tests meanwhile, then writes the samples.
  END=$((SECONDS + $2))
  left() { echo $((END - SECONDS - $1)); }
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  export SPARSEFLASH_DATA=$PWD/data
  TB=$(( $2 * 55 / 100 ))
  T="--seq-len 8192 --batch-size 4 --max-steps 1000 --eval-every 250 --compile --no-progress --time-budget $TB"
  python -m sparseflash.train --attention dense $T --out-dir runs/dense > $OUT/train_dense.log 2>&1 &
  P1=$!
  python -m sparseflash.train --attention hash --n-buckets 16 --window 128 $T --out-dir runs/hash16w128 > $OUT/train_hash.log 2>&1 &
  P2=$!
  timeout $((TB + 10)) python -m pytest -m gpu -q tests/test_decode_graph.py tests/test_decode.py tests/test_generate.py tests/test_window.py tests/test_hash_sparse.py tests/test_launch_config.py tests/test_qk_sparse.py tests/test_flash.py tests/test_layout.py tests/test_gqa.py -p no:cacheprovider > $OUT/gpu_tests_$KIND.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests_$KIND.log
  tail -3 $OUT/gpu_tests_$KIND.log
  wait $P1 $P2
  grep -v Warn $OUT/train_dense.log | tail -3; grep -v Warn $OUT/train_hash.log | tail -3
  PYTHONPATH=. timeout $(left 5) python tools/samples.py --tokens 200 --ckpt dense=runs/dense/ckpt.pt --ckpt hash16w128=runs/hash16w128/ckpt.pt --out $OUT/samples_$KIND.json > $OUT/samples.log 2>&1
  echo "samples rc=$?"; grep -- "^---" $OUT/samples.log | head; tail -3 $OUT/samples.log
  for C in dense hash16w128; do
    { time timeout 60 python -m sparseflash.train sample --ckpt runs/$C/ckpt.pt --prompt "Fellow-Citizens of the Senate" --tokens 300 --temperature 0.8 --top-k 40 --seed 0 ; } > $OUT/sample_cli_$C.log 2>&1
    echo "sample $C rc=$?"; tail -c 600 $OUT/sample_cli_$C.log
  done
fi
if [ "$stage" = 11 ]; then
  timeout $2 python -m sparseflash.train.experiment --phase speed --compile --compile-mode reduce-overhead \
    --speed-configs hash16w128 sdpa --speed-seq-lens 8192 16384 --speed-train-steps 100 \
    --out $OUT/train_h200_launch_defaults.json --time-budget $3 --no-progress > $OUT/train_launch_defaults.log 2>&1
  grep -v Warn $OUT/train_launch_defaults.log | tail -8
fi
if [ "$stage" = 12 ]; then
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  timeout 130 python -m pytest -m gpu -q tests/test_decode_graph.py tests/test_decode.py tests/test_generate.py -p no:cacheprovider > $OUT/gpu_tests.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests.log
  tail -3 $OUT/gpu_tests.log
  timeout $2 python -m sparseflash.bench.decode --contexts 65536 131072 8192 --batches 1 8 --no-flex --out $OUT/decode_$KIND.json --no-progress > $OUT/decode.log 2>&1
  tail -12 $OUT/decode.log
fi
if [ "$stage" = 13 ]; then
  # Probes, baselines in the same run: tensor-descriptor (TMA) loads in the dense forward and in dense
  # decoding; a five-product backward (dQ by atomics). Args: the three timeouts.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  PYTHONPATH=. timeout $2 python tools/dense_tma_probe.py --out $OUT/dense_tma_probe_$KIND.json > $OUT/dense_tma_probe.log 2>&1
  grep -v Warn $OUT/dense_tma_probe.log | tail -8
  PYTHONPATH=. timeout $3 python tools/decode_tma_probe.py --out $OUT/decode_tma_probe_$KIND.json > $OUT/decode_tma_probe.log 2>&1
  grep -v Warn $OUT/decode_tma_probe.log | tail -6
  PYTHONPATH=. timeout $4 python tools/dense_bwd_probe.py --out $OUT/dense_bwd_probe_$KIND.json > $OUT/dense_bwd_probe.log 2>&1
  grep -v Warn $OUT/dense_bwd_probe.log | tail -8
fi
if [ "$stage" = 14 ]; then
  # GPU tests of the kernels; decode with and without tensor-descriptor loads (same run); then training rows.
  # Args: test timeout, decode timeout (each of two runs), training timeout, training budget.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  timeout $2 python -m pytest -m gpu -q -n 6 tests/test_decode.py tests/test_decode_graph.py tests/test_generate.py tests/test_window.py tests/test_hash_sparse.py tests/test_launch_config.py tests/test_qk_sparse.py tests/test_flash.py tests/test_layout.py tests/test_gqa.py -p no:cacheprovider > $OUT/gpu_tests_$KIND.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests_$KIND.log
  tail -3 $OUT/gpu_tests_$KIND.log
  D="--contexts 65536 131072 8192 32768 --batches 1 8 --scopes layer --no-flex --no-progress"
  timeout $3 python -m sparseflash.bench.decode $D --out $OUT/decode_$KIND.json > $OUT/decode.log 2>&1
  tail -12 $OUT/decode.log
  timeout $3 python -c "import sys, sparseflash.decode as d; d.TMA = False; from sparseflash.bench.decode import main; sys.exit(main(sys.argv[1:]))" $D --out $OUT/decode_pointers_$KIND.json > $OUT/decode_pointers.log 2>&1
  tail -12 $OUT/decode_pointers.log
  export SPARSEFLASH_DATA=$PWD/data
  timeout $4 python -m sparseflash.train.experiment --phase speed --compile --compile-mode reduce-overhead \
    --speed-configs hash16w128 sdpa --speed-seq-lens 8192 16384 --speed-train-steps 100 \
    --out $OUT/train_${KIND}_launch_defaults.json --time-budget $5 --no-progress > $OUT/train_launch_defaults.log 2>&1
  grep -v Warn $OUT/train_launch_defaults.log | tail -8
fi
if [ "$stage" = 15 ]; then
  # Every GPU test (6 xdist workers: Triton compiles in parallel), then the full decode bench with
  # FlexAttention's rows under graph timing. Args: test timeout, bench timeout.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  timeout $2 python -m pytest -m gpu -q -n 6 tests -p no:cacheprovider > $OUT/gpu_tests_all_$KIND.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests_all_$KIND.log
  grep -v "Warn\|warn" $OUT/gpu_tests_all_$KIND.log | tail -5
  timeout $3 python -m sparseflash.bench.decode --contexts 65536 131072 8192 32768 --batches 1 8 --no-progress --out $OUT/decode_$KIND.json > $OUT/decode.log 2>&1
  grep -E "^(layer|model) ctx=[0-9]* *B=[18] *[|]|COMPLETE" $OUT/decode.log
fi
if [ "$stage" = 16 ]; then
  # Decode launch settings: block, warps, stages, keys per split, split cap, descriptors, the fold as products.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  PYTHONPATH=. timeout $2 python tools/decode_sweep.py --contexts 65536 --batches 1 8 --out $OUT/decode_sweep_tma_$KIND.json > $OUT/decode_sweep.log 2>&1
  grep -v "Warn\|warn" $OUT/decode_sweep.log | tail -8
  # GQA (8 query heads on 2 kv heads): the products fold reads a kv head once for its group.
  G="--contexts 65536 131072 --batches 1 8 --scopes layer --no-flex --no-progress --kv-heads 2 --attentions sdpa dense"
  for M in False True; do
    timeout $3 python -c "import sys, sparseflash.decode as d; d.MMA_FOLD = $M; from sparseflash.bench.decode import main; sys.exit(main(sys.argv[1:]))" $G --out $OUT/decode_gqa_mma${M}_$KIND.json 2>&1 | grep -E "^layer ctx=[0-9]* *B=[18] *[|]"
  done
fi
if [ "$stage" = 17 ]; then
  # Decode loads: descriptors on/off x the evict-first hint on/off (same warm machine, one after the other),
  # then GQA with the default fold (products where grouped). Arg: timeout of each bench run.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  D="--contexts 65536 131072 8192 --batches 1 8 --scopes layer --no-flex --no-progress"
  for T in True False; do for E in False True; do
    timeout $2 python -c "import sys, sparseflash.decode as d; d.TMA = $T; d.EVICT_FIRST = $E; from sparseflash.bench.decode import main; sys.exit(main(sys.argv[1:]))" $D --out $OUT/decode_tma${T}_evict${E}_$KIND.json 2>&1 | grep -E "^layer ctx=[0-9]* *B=[18] *[|]" | sed "s/^/tma=$T evict=$E /"
  done; done
  timeout $2 python -m sparseflash.bench.decode --contexts 65536 131072 --batches 1 8 --scopes layer --no-flex --no-progress --kv-heads 2 --attentions sdpa dense hash --out $OUT/decode_gqa_default_$KIND.json 2>&1 | grep -E "^layer ctx=[0-9]* *B=[18] *[|]"
  timeout 120 python -m pytest -m gpu -q -n 4 tests/test_decode.py tests/test_generate.py tests/test_decode_graph.py -p no:cacheprovider 2>&1 | tail -2
fi
if [ "$stage" = 18 ]; then
  # The decode defaults (descriptors only for long walks, evict-first pointer loads, products where grouped):
  # GPU tests, the full decode bench, GQA with descriptors forced beside it, the products fold forced without
  # groups. Arg: bench timeout.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  timeout 120 python -m pytest -m gpu -q -n 4 tests/test_decode.py tests/test_generate.py tests/test_decode_graph.py -p no:cacheprovider 2>&1 | tail -1
  timeout $2 python -m sparseflash.bench.decode --contexts 65536 131072 8192 32768 --batches 1 8 --no-progress --out $OUT/decode_$KIND.json > $OUT/decode.log 2>&1
  grep -E "^(layer|model) ctx=[0-9]* *B=[18] *[|]|COMPLETE" $OUT/decode.log
  G="--contexts 65536 131072 --batches 1 8 --scopes layer --no-flex --no-progress --kv-heads 2 --attentions sdpa dense hash"
  for M in 16 0; do
    timeout 100 python -c "import sys, sparseflash.decode as d; d.DESC_MIN_BLOCKS = $M; from sparseflash.bench.decode import main; sys.exit(main(sys.argv[1:]))" $G --out /tmp/decode_gqa_desc$M.json 2>&1 | grep -E "^layer ctx=[0-9]* *B=[18] *[|]" | sed "s/^/gqa desc_min=$M /"
    cp /tmp/decode_gqa_desc$M.json $OUT/decode_gqa_desc${M}_$KIND.json
  done
  timeout 100 python -c "import sys, sparseflash.decode as d; d.MMA_FOLD = True; from sparseflash.bench.decode import main; sys.exit(main(sys.argv[1:]))" --contexts 65536 131072 8192 --batches 1 8 --scopes layer --no-flex --no-progress --out /tmp/decode_mma.json 2>&1 | grep -E "^layer ctx=[0-9]* *B=[18] *[|]" | sed "s/^/mma=True /"
  cp /tmp/decode_mma.json $OUT/decode_mma_$KIND.json
fi
if [ "$stage" = 19 ]; then
  # Stage 18, then (on an H200 only) the training rows with the sparse launch defaults. Args: bench timeout,
  # training timeout, training budget.
  bash tools/gpu_session.sh 18 $2
  if nvidia-smi -L | grep -q H200; then
    export SPARSEFLASH_DATA=$PWD/data
    timeout $3 python -m sparseflash.train.experiment --phase speed --compile --compile-mode reduce-overhead \
      --speed-configs hash16w128 sdpa --speed-seq-lens 8192 16384 --speed-train-steps 100 \
      --out $OUT/train_h200_launch_defaults.json --time-budget $4 --no-progress > $OUT/train_launch_defaults.log 2>&1
    grep -v Warn $OUT/train_launch_defaults.log | tail -8
  fi
fi
if [ "$stage" = 20 ]; then
  # One layer at a context one past a multiple of the splits' blocks (the model rows' case), beside the
  # round contexts; where a model's decode step goes (kernels and their count); the full decode bench.
  # Arg: bench timeout. (Training rows on an H200: stage 11, a call of its own.)
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  timeout 120 python -m sparseflash.bench.decode --contexts 65536 65537 131072 131073 --batches 1 8 --scopes layer --no-flex --no-progress --out /tmp/decode_plus1.json 2>&1 | grep -E "^layer ctx=[0-9]* *B=[18] *[|]"
  cp /tmp/decode_plus1.json $OUT/decode_plus1_$KIND.json
  PYTHONPATH=. timeout 150 python tools/decode_profile.py --scope model --contexts 8192 65536 --batches 1 8 --out $OUT/decode_profile_model_$KIND.json 2>&1 | grep "^model"
  timeout $2 python -m sparseflash.bench.decode --contexts 65536 131072 8192 32768 --batches 1 8 --no-progress --out $OUT/decode_$KIND.json > $OUT/decode.log 2>&1
  grep -E "^(layer|model) ctx=[0-9]* *B=[18] *[|]|COMPLETE" $OUT/decode.log
fi
if [ "$stage" = 21 ]; then
  # Host cost of an eager sparse call's pieces (tools/launch_cost.py); every GPU test; then on an H200 the
  # decode bench, on an H100 the A/B of the decode splits. Args: test timeout, decode bench timeout.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  PYTHONPATH=. timeout 150 python tools/launch_cost.py --out $OUT/launch_cost_$KIND.json > $OUT/launch_cost.log 2>&1
  grep " us$" $OUT/launch_cost.log
  timeout $2 python -m pytest -m gpu -q -n 6 tests --ignore tests/test_notebooks.py --ignore tests/test_notebook_outputs.py -p no:cacheprovider > $OUT/gpu_tests_all_$KIND.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests_all_$KIND.log
  grep -v "Warn\|warn" $OUT/gpu_tests_all_$KIND.log | tail -4
  if [ $KIND = h200 ]; then
    timeout $3 python -m sparseflash.bench.decode --contexts 65536 131072 8192 32768 --batches 1 8 --no-progress --out $OUT/decode_$KIND.json > $OUT/decode.log 2>&1
    grep -E "^(layer|model) ctx=[0-9]* *B=[18] *[|]|COMPLETE" $OUT/decode.log
  else
    bash tools/ab_decode_splits.sh > $OUT/ab_decode_splits_$KIND.log 2>&1; cat $OUT/ab_decode_splits_$KIND.log
  fi
fi
if [ "$stage" = 22 ]; then
  # The decode kernel with cdiv blocks per split again: its GPU tests, then the full decode bench. Arg: bench timeout.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  timeout 150 python -m pytest -m gpu -q -n 6 tests/test_decode.py tests/test_decode_graph.py tests/test_generate.py tests/test_decode_append.py -p no:cacheprovider > $OUT/gpu_tests_decode_$KIND.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests_decode_$KIND.log
  grep -v "Warn\|warn" $OUT/gpu_tests_decode_$KIND.log | tail -3
  timeout $2 python -m sparseflash.bench.decode --contexts 65536 131072 8192 32768 --batches 1 8 --no-progress --out $OUT/decode_$KIND.json > $OUT/decode.log 2>&1
  grep -E "^(layer|model) ctx=[0-9]* *B=[18] *[|]|COMPLETE" $OUT/decode.log
fi
if [ "$stage" = 23 ]; then
  # Every GPU test; the host cost of an eager call and the host-bound bench rows with the package of 27e042d
  # (copied to tools/_old_pkg, untracked) and with this tree, ABAB; then the full decode bench. Arg: bench timeout.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  timeout 200 python -m pytest -m gpu -q -n 8 tests --ignore tests/test_notebooks.py --ignore tests/test_notebook_outputs.py -p no:cacheprovider > $OUT/gpu_tests_all_$KIND.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests_all_$KIND.log
  grep -v "Warn\|warn" $OUT/gpu_tests_all_$KIND.log | tail -3
  B="--seq-lens 4096 8192 --head-dim 64 --buckets 16 --keep-rates 0.3 --windows 256 --modes fwd fwd+bwd --variants sdpa_flash ours_dense ours_hash_16 ours_hash_16_default ours_hash_16_w256 ours_qk_0.3 --no-kernel-time --no-check --no-progress --force"
  for v in old new old new; do
    P=.; [ $v = old ] && P=tools/_old_pkg:.
    PYTHONPATH=$P timeout 60 python tools/launch_cost.py --out $OUT/launch_cost_${v}_$KIND.json 2>&1 | grep -E "(layouts|plan|layout_|delta|hash_|dense_|qk_).* us$" | sed "s/^/$v /"
    PYTHONPATH=$P timeout 90 python -m sparseflash.bench $B --out /tmp/bench_$v.json > /tmp/bench_$v.log 2>&1
    python -c "import json; [print('$v', r['variant'], r['mode'], r['seq_len'], round(r['ms'], 3), round(r['speedup_vs_sdpa_flash'] or 0, 2)) for r in json.load(open('/tmp/bench_$v.json'))['rows'] if r['status'] == 'ok']"
  done
  cp /tmp/bench_old.json $OUT/bench_host_old_$KIND.json; cp /tmp/bench_new.json $OUT/bench_host_new_$KIND.json
  timeout $2 python -m sparseflash.bench.decode --contexts 65536 131072 8192 32768 --batches 1 8 --no-progress --out $OUT/decode_$KIND.json > $OUT/decode.log 2>&1
  grep -E "^(layer|model) ctx=[0-9]* *B=[18] *[|]|COMPLETE" $OUT/decode.log
fi
if [ "$stage" = 24 ]; then
  # One layer at a context one block past a multiple with cdiv blocks per split; on an H200 also the decode
  # GPU tests and the full decode bench. Arg: bench timeout.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  timeout 120 python -m sparseflash.bench.decode --contexts 65536 65537 131072 131073 --batches 1 8 --scopes layer --no-flex --no-progress --out /tmp/decode_plus1.json 2>&1 | grep -E "^layer ctx=[0-9]* *B=[18] *[|]"
  cp /tmp/decode_plus1.json $OUT/decode_plus1_$KIND.json
  if [ $KIND = h200 ]; then bash tools/gpu_session.sh 22 $2; fi  # the decode GPU tests and the full bench
fi
if [ "$stage" = 25 ]; then
  # The fused LSH kernel's launch settings and a variant without tl.dot beside PyTorch's path (tools/lsh_probe.py);
  # on an H200 then the decode GPU tests and the full decode bench (stage 22). Arg: bench timeout.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  PYTHONPATH=. timeout 150 python tools/lsh_probe.py --out $OUT/lsh_probe_$KIND.json > $OUT/lsh_probe.log 2>&1
  grep -o '"input".*' $OUT/lsh_probe.log
  if [ $KIND = h200 ]; then bash tools/gpu_session.sh 22 $2; fi
fi
if [ "$stage" = 26 ]; then
  # A session's first call: the GPU tests of the LSH kernel, decode and generation; on an H200 the full decode
  # bench and the kernel bench (resumable: a partial results/h200_partial.json is carried in and extended); on
  # an H100 the LSH probe. Arg: seconds this stage may take in all.
  END=$((SECONDS + $2)); left() { echo $((END - SECONDS - $1)); }
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  timeout 150 python -m pytest -m gpu -q -n 8 tests/test_hashing.py tests/test_decode_append.py tests/test_generate.py tests/test_decode.py tests/test_decode_graph.py -p no:cacheprovider > $OUT/gpu_tests_lsh_decode_$KIND.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests_lsh_decode_$KIND.log
  grep -v "Warn\|warn" $OUT/gpu_tests_lsh_decode_$KIND.log | tail -3
  if [ $KIND = h200 ]; then
    timeout 200 python -m sparseflash.bench.decode --contexts 65536 131072 8192 32768 --batches 1 8 --no-progress --out $OUT/decode_$KIND.json > $OUT/decode.log 2>&1
    grep -E "^(layer|model) ctx=[0-9]* *B=[18] *[|]|COMPLETE" $OUT/decode.log
    bash tools/gpu_session.sh 27 $(left 10)
  else
    PYTHONPATH=. timeout 150 python tools/lsh_probe.py --out $OUT/lsh_probe_$KIND.json > $OUT/lsh_probe.log 2>&1
    grep -o '"input".*' $OUT/lsh_probe.log
  fi
fi
if [ "$stage" = 27 ]; then
  # The kernel bench on this GPU, resumable (results/<kind>_partial.json carried in, if any). Arg: seconds.
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  [ -f results/${KIND}_partial.json ] && cp results/${KIND}_partial.json $OUT/$KIND.json
  timeout $(($2 + 60)) python -m sparseflash.bench --seq-lens 4096 8192 16384 1024 2048 --shapes 1x4x65536 1x4x131072 --head-dim 64 128 \
    --buckets 16 --keep-rates 0.3 --windows 256 --variants sdpa_flash sdpa_cudnn ours_dense ours_hash_16 ours_hash_16_default ours_hash_16_w256 ours_qk_0.3 \
    --kernel-time --out $OUT/$KIND.json --resume --time-budget $2 --no-progress > $OUT/bench_$KIND.log 2>&1
  echo "bench rc=$?"; grep -iE "budget|complete|error" $OUT/bench_$KIND.log | tail -5
  python -c "import json; d=json.load(open('$OUT/$KIND.json')); print(d['meta'].get('complete'), d['meta'].get('completed_configs')); [print(r['variant'], r['mode'], r['D'], r['seq_len'], round(r['ms'], 3), round(r['speedup_vs_sdpa_flash'] or 0, 2)) for r in d['rows'] if r['status'] == 'ok' and r['mode'] == 'fwd+bwd']"
fi
if [ "$stage" = 28 ]; then
  # Training steps on this GPU with the trainer users run, resumable (results/train_<kind>_partial.json carried
  # in, if any). Args: timeout, budget.
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  export SPARSEFLASH_DATA=$PWD/data
  [ -f results/train_${KIND}_partial.json ] && cp results/train_${KIND}_partial.json $OUT/train_$KIND.json
  timeout $2 python -m sparseflash.train.experiment --phase speed --compile --compile-mode reduce-overhead --resume \
    --speed-configs hash16w128 sdpa sdpa_cudnn none hash16w0 dense qk0.3 --speed-seq-lens 8192 16384 --speed-train-steps 100 \
    --out $OUT/train_$KIND.json --time-budget $3 --no-progress > $OUT/train_$KIND.log 2>&1
  grep -v Warn $OUT/train_$KIND.log | tail -16
fi
if [ "$stage" = 30 ]; then
  # Eager host time, A/B: the bench's rows with the package in ab_base/ (the tree before the change,
  # untracked: git archive <commit> | tar -x -C ab_base) against this tree's, ABAB on one machine.
  # Args: seconds per run; the modes (default fwd, the no_grad forward; "fwd+bwd" the training call's);
  # the lengths (default "2048 4096 8192"); the trees (default "base new"; "off" is this tree with
  # SPARSEFLASH_FAST_LAUNCH=0, every launch through kernel[grid]: "off new" isolates the direct launch).
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  A="--seq-lens ${4:-2048 4096 8192} --head-dim 64 128 --modes ${3:-fwd} --buckets 16 --keep-rates 0.3 --windows 256 --no-check"
  A="$A --variants sdpa_flash sdpa_cudnn ours_dense ours_hash_16 ours_hash_16_w256 ours_qk_0.3 --kernel-time --no-progress"
  for r in 1 2; do
    for t in ${5:-base new}; do
      P=.; [ $t = base ] && P=ab_base
      FAST=1; [ $t = off ] && FAST=0
      SPARSEFLASH_FAST_LAUNCH=$FAST PYTHONPATH=$P timeout $2 python -m sparseflash.bench $A --out $OUT/host_ab_${t}_${r}_$KIND.json > $OUT/host_ab_${t}_${r}.log 2>&1
      echo "$t round $r rc=$?"
    done
  done
  python - $OUT $KIND <<'PY'
import json, sys, glob
out, kind = sys.argv[1:]
rows = {}
for f in sorted(glob.glob(f"{out}/host_ab_*_{kind}.json")):
    t = f.split("host_ab_")[1].split("_")[0]
    for r in json.load(open(f))["rows"]:
        if r["status"] == "ok":
            rows.setdefault((r["variant"], r["mode"], r["D"], r["seq_len"]), {}).setdefault(t, []).append((r["ms"], r["kernel_ms"]))
for key, d in sorted(rows.items()):
    print(*key, *(f"{t} " + " ".join(f"{ms:.3f}" for ms, _ in d.get(t, [])) for t in ("base", "off", "new") if t in d),
          "kernel", " ".join(f"{k:.3f}" for _, k in d.get("new", [])))
PY
fi
if [ "$stage" = 31 ]; then
  # Every GPU test (the notebook modules apart: the device has no nbformat), 8 workers. Arg: seconds.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  timeout $2 python -m pytest -m gpu -q -n 8 tests --ignore=tests/test_notebooks.py --ignore=tests/test_notebook_outputs.py -p no:cacheprovider > $OUT/gpu_tests_all_$KIND.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests_all_$KIND.log
  grep -v "Warn\|warn" $OUT/gpu_tests_all_$KIND.log | tail -4
fi
if [ "$stage" = 32 ]; then
  # The Gluon forward probe (tools/gluon_fwd_probe.py): two hand-scheduled Hopper forwards against
  # SDPA cuDNN / flash and our Triton kernel, D 64/128, N 4k-16k, values checked. Arg: seconds.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  # Warp-specialised kernels in a process of their own (a barrier bug hangs, and the timeout ends it). Args: seconds
  # for the plain kernels, for the warp-specialised ones.
  for K in plain ws; do
    T=$2; [ $K = ws ] && T=${3:-120}
    PYTHONPATH=. timeout $T python tools/gluon_fwd_probe.py --kernels $K --out $OUT/gluon_fwd_probe_${K}_$KIND.json > $OUT/gluon_fwd_probe_$K.log 2>&1
    echo "$K rc=$?"
    probe_rows $OUT/gluon_fwd_probe_${K}_$KIND.json
  done
fi
if [ "$stage" = 33 ]; then
  # FlashAttention-3's forward schedule in Gluon (tools/gluon_fa3_probe.py): producer warp, two consumer
  # warpgroups with intra- and inter-warpgroup overlap, against SDPA cuDNN / flash and our kernels. Arg: seconds.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  # Then the kernel's GPU tests (sparseflash/hopper.py). Args: seconds for the probe, for the tests.
  # A smoke call first: a hang or a failure to compile stops the stage here, not after the probe's timeout.
  hopper_smoke 90 None || exit 0
  PYTHONPATH=. timeout $2 python tools/gluon_fa3_probe.py --out $OUT/gluon_fa3_probe_$KIND.json > $OUT/gluon_fa3_probe.log 2>&1
  echo "rc=$?"
  probe_rows $OUT/gluon_fa3_probe_$KIND.json
  timeout ${3:-150} python -m pytest -m gpu -q -n 8 tests/test_hopper.py -p no:cacheprovider > $OUT/gpu_tests_hopper_$KIND.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests_hopper_$KIND.log
  grep -v "Warn\|warn" $OUT/gpu_tests_hopper_$KIND.log | grep -E "FAILED|Error|passed|failed|rc=" | head -20
fi
if [ "$stage" = 34 ]; then
  # The Gluon forward in the package: the probe at 1k-16k, the dense bench rows (fwd, fwd+bwd) against SDPA
  # cuDNN / flash, and the dense GPU tests (the backward reads the Gluon forward's lse). Args: probe s, bench s.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  PYTHONPATH=. timeout $2 python tools/gluon_fa3_probe.py --seq-lens 1024 2048 4096 8192 16384 --out $OUT/gluon_fa3_probe_$KIND.json > $OUT/gluon_fa3_probe.log 2>&1
  echo "probe rc=$?"
  probe_rows $OUT/gluon_fa3_probe_$KIND.json
  timeout $3 python -m sparseflash.bench --seq-lens 4096 8192 16384 --head-dim 64 128 --modes fwd fwd+bwd --no-check --variants sdpa_flash sdpa_cudnn ours_dense --kernel-time --no-progress --out $OUT/dense_gluon_$KIND.json > $OUT/dense_gluon.log 2>&1
  echo "bench rc=$?"
  python -c "import json; d=json.load(open('$OUT/dense_gluon_$KIND.json')); [print(r['variant'], r['mode'], r['D'], r['seq_len'], round(r['ms'], 4), round(r.get('kernel_ms') or 0, 4), round(r.get('speedup_vs_sdpa_flash') or 0, 3)) for r in d['rows'] if r['status'] == 'ok']"
  timeout 150 python -m pytest -m gpu -q -n 8 tests/test_flash.py tests/test_hopper.py -p no:cacheprovider > $OUT/gpu_tests_flash_hopper_$KIND.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests_flash_hopper_$KIND.log
  grep -v "Warn\|warn" $OUT/gpu_tests_flash_hopper_$KIND.log | grep -E "FAILED|Error|passed|failed|rc=" | head -20
fi
if [ "$stage" = 35 ]; then
  # Three consumer warpgroups in the Gluon forward: a smoke call, the probe at 4k-16k, the kernel's GPU tests.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  hopper_smoke 60 "dict(BLOCK_N=64, STAGES=4, WARPGROUPS=3)" || exit 0
  PYTHONPATH=. timeout $2 python tools/gluon_fa3_probe.py --out $OUT/gluon_fa3_wg3_probe_$KIND.json > $OUT/gluon_fa3_probe.log 2>&1
  echo "probe rc=$?"
  probe_rows $OUT/gluon_fa3_wg3_probe_$KIND.json
  timeout $3 python -m pytest -m gpu -q -n 8 tests/test_hopper.py -p no:cacheprovider > $OUT/gpu_tests_hopper_$KIND.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests_hopper_$KIND.log
  grep -v "Warn\|warn" $OUT/gpu_tests_hopper_$KIND.log | grep -E "FAILED|Error|passed|failed|rc=" | head -20
fi
if [ "$stage" = 36 ]; then
  # The Gluon backward probe (tools/gluon_bwd_probe.py): dK/dV and dQ kernels with the forward's structure,
  # against our Triton backward and SDPA cuDNN / flash's. A smoke call first. Arg: seconds for the probe.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  PYTHONPATH=. timeout 90 python tools/gluon_bwd_probe.py --seq-lens 256 --out $OUT/gluon_bwd_smoke_$KIND.json > $OUT/gluon_bwd_smoke.log 2>&1; rc=$?
  python -c "import json; [print(r['D'], r['N'], r['variant'], r.get('max_diff'), r.get('error', '')[:300]) for r in json.load(open('$OUT/gluon_bwd_smoke_$KIND.json'))['rows'] if 'gluon_s' in r['variant']]"
  [ $rc = 0 ] || { echo "smoke rc=$rc"; exit 0; }
  PYTHONPATH=. timeout $2 python tools/gluon_bwd_probe.py --out $OUT/gluon_bwd_probe_$KIND.json > $OUT/gluon_bwd_probe.log 2>&1
  echo "probe rc=$?"
  probe_rows $OUT/gluon_bwd_probe_$KIND.json
fi
if [ "$stage" = 37 ]; then
  # One call for the Gluon work left: the Gluon kernel's GPU tests (three consumers and the hopper switch
  # included), the host cost of a call, then the backward probe (stage 36) and the three-consumer forward
  # probe (stage 35's probe). Args: seconds for the backward probe, for the forward probe.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  timeout 150 python -m pytest -m gpu -q -n 8 tests/test_hopper.py -p no:cacheprovider > $OUT/gpu_tests_hopper_$KIND.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests_hopper_$KIND.log
  grep -v "Warn\|warn" $OUT/gpu_tests_hopper_$KIND.log | grep -E "FAILED|Error|passed|failed|rc=" | head -20
  PYTHONPATH=. timeout 60 python tools/hopper_host_cost.py > $OUT/hopper_host_cost_$KIND.log 2>&1; cat $OUT/hopper_host_cost_$KIND.log
  bash tools/gpu_session.sh 36 ${2:-200} | grep -v "^GPU"
  PYTHONPATH=. timeout ${3:-130} python tools/gluon_fa3_probe.py --out $OUT/gluon_fa3_wg3_probe_$KIND.json > $OUT/gluon_fa3_probe.log 2>&1
  echo "fwd probe rc=$?"
  probe_rows $OUT/gluon_fa3_wg3_probe_$KIND.json
fi
if [ "$stage" = 38 ]; then
  # The 4k/8k kernel rows three ways: eager wall time, GPU busy time (--kernel-time) and CUDA-graph
  # replays (--graph-time), baselines in the same run. Arg: seconds.
  nvidia-smi -L
  KIND=h100; nvidia-smi -L | grep -q H200 && KIND=h200
  timeout ${2:-240} python -m sparseflash.bench --seq-lens 4096 8192 --head-dim 64 128 --modes fwd fwd+bwd \
    --buckets 16 --keep-rates 0.3 --windows 256 --no-check --kernel-time --graph-time --no-progress \
    --variants sdpa_flash sdpa_cudnn ours_dense ours_hash_16 ours_hash_16_default ours_hash_16_w256 ours_qk_0.3 \
    --out $OUT/bench_graph_$KIND.json > $OUT/bench_graph.log 2>&1; echo "rc=$?"
  grep -v "Warn\|warn" $OUT/bench_graph.log | tail -60
fi
