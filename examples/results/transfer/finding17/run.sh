#!/bin/bash
# Finding 17's distillation runs: EKD + the unlabelled pool (the protocol's ekd-unl.yaml), the 30-epoch teacher (lt30) or
# the protocol's 6-epoch teacher (lt6), 15 epochs, VAL only: /tmp/lt30tv holds links to data/target/train and val, so
# no test image is read while training. Test was read afterwards, once, for the configuration chosen on val:
#   fopro eval RUN/best.safetensors --data /tmp/lt30/data/target --split test --device cpu --json > RUN/eval_test.json
# run.sh TEACHER_TAG NAME SEED [options], e.g. run.sh lt30 f2 0 --align-focus 2; two runs at a time, one thread each.
tag=$1; name=$2; seed=$3; shift 3
mkdir -p runs_$tag logs_$tag
OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m fopro distill \
  --config examples/configs/synthetic_lt/ekd-unl.yaml --data /tmp/lt30tv --unlabeled /tmp/lt30/data/target/unlabeled \
  --student resnet18 --image-size 64 --teacher /tmp/$tag/teacher/best.safetensors --epochs 15 --batch-size 32 \
  --augment reference --device cpu --seed $seed "$@" --out runs_$tag/$name-seed$seed --json > logs_$tag/$name-seed$seed.json
