# A/B on one machine: the decode kernel of d93b8cb (cdiv(n, SPLITS) blocks per split) against the
# current one (floor or floor + 1), layer rows, ABAB.  First, on a machine with the git history:
#   git show d93b8cb:sparseflash/decode.py > tools/decode_old_d93b8cb.py   (untracked; travels to the device)
# then on the device: bash tools/ab_decode_splits.sh > $OUT/ab_decode_splits.log
export TRITON_CACHE_DIR=/tmp/tc
cp sparseflash/decode.py /tmp/decode_new.py
for v in new old new old; do
  if [ $v = old ]; then cp tools/decode_old_d93b8cb.py sparseflash/decode.py; else cp /tmp/decode_new.py sparseflash/decode.py; fi
  timeout 100 python -m sparseflash.bench.decode --contexts 65536 131072 --batches 1 8 --scopes layer \
    --attentions sdpa hash dense --no-flex --no-progress --out /tmp/ab_$v.json 2>&1 | grep -E "^layer ctx" | sed "s/^/$v /"
done
cp /tmp/decode_new.py sparseflash/decode.py
