#!/bin/bash
# Finding 18: the demo-scale runs (the embedded default's data with a label-free pool of 1,500 images, the shipped
# demo teacher, resnet10t, 64 px, --augment reference), train and val only, 3 seeds, two runs at a time, one thread
# each. fopro 0.8 + the 0.9 changes up to --align-focus's per-method default (every option below is given explicitly).
# run.sh WORK
set -e
WORK=$1; mkdir -p $WORK/runs $WORK/logs $WORK/demotv
python - <<PY
from pathlib import Path
from fopro.data.synth import SynthConfig, generate_synth
generate_synth(Path("$WORK/demo"), SynthConfig(max_per_class=200, imbalance=0.025, public_per_class=1, public_val_per_class=1, unlabeled=1500))
PY
ln -sfn $WORK/demo/target/train $WORK/demotv/train; ln -sfn $WORK/demo/target/val $WORK/demotv/val
T=$(python -c "from fopro.defaults import DEMO_TEACHER; print(DEMO_TEACHER)")
P="--unlabeled $WORK/demo/target/unlabeled"
for e in 5 15; do
  C="--data $WORK/demotv --student resnet10t --epochs $e --augment reference --image-size 64"
  for s in 0 1 2; do
    echo "e$e-none-s$s $C --method none --seed $s"
    echo "e$e-fopro-s$s $C --teacher $T --method fopro --seed $s"
    echo "e$e-ekd-s$s $C --teacher $T --method ekd --align-focus 0 --seed $s"
    echo "e$e-ekdf2-s$s $C --teacher $T --method ekd --align-focus 2 --seed $s"
    echo "e$e-ekdpool-s$s $C $P --teacher $T --method ekd --align-focus 0 --seed $s"
    echo "e$e-ekdpoolf2-s$s $C $P --teacher $T --method ekd --align-focus 2 --seed $s"
    [ $e = 5 ] && echo "e$e-fopropool-s$s $C $P --teacher $T --method fopro --seed $s"
  done
done | xargs -P 2 -L 1 bash -c 'name=$0; OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 fopro distill "$@" --deploy-head fc --out '$WORK'/runs/$name --json > '$WORK'/logs/$name.json 2> '$WORK'/logs/$name.err'
# then: python heads.py heads_val.jsonl WORK/runs/e15-ekd* WORK/runs/e15-fopro-s*  (and the protocol runs of finding 17)
#       python heads.py heads_test.jsonl --test WORK/demo/target WORK/runs/e15-ekdpoolf2-s* WORK/runs/e15-none-s* WORK/runs/e5-fopro-s*
#       python collect.py WORK/logs > runs.txt
