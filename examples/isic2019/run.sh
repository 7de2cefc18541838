#!/usr/bin/env bash
# FoPro-KD's ISIC-2019 long-tailed protocol with fopro: 5 folds x the chosen methods, one frozen teacher.
# See examples/isic2019/README.md. Needs the ISIC 2019 training images and a GPU.
#
#   examples/isic2019/run.sh IMAGES_DIR CSV_DIR TEACHER TEACHER_WEIGHTS [IMBALANCE]
#
# Each step is a plain fopro command (printed before it runs). Finished runs (eval_test.json present)
# are skipped and interrupted ones resumed, so the same command continues an interrupted protocol.
set -euo pipefail

usage() {
    cat >&2 <<'EOF'
usage: examples/isic2019/run.sh IMAGES_DIR CSV_DIR TEACHER TEACHER_WEIGHTS [IMBALANCE]

  IMAGES_DIR       ISIC_2019_Training_Input (the <image id>.jpg files)
  CSV_DIR          the split files {train,val,test}_skin{FOLD}_{IMBALANCE}.csv (e.g. ../shared/data/isic2019-lt)
  TEACHER          moco     MoCo v2 ResNet-50   (moco_v2_800ep_pretrain.pth.tar)
                   dinov2   DINOv2 ViT-S/14     (dinov2_vits14_pretrain.pth, original or timm layout)
                   imagenet ImageNet ResNet-50  (a timm .safetensors or torchvision .pth file)
  TEACHER_WEIGHTS  the local weight file of that teacher
  IMBALANCE        0.01 (default), 0.005 or 0.002

The arguments can also come from the environment: IMAGES, CSV_DIR, TEACHER, TEACHER_WEIGHTS, IMBALANCE.
Other settings (environment, defaults in brackets): METHODS ["none ekd fopro"; also kd, fopro-no-akd],
FOLDS ["1 2 3 4 5"], EPOCHS [100], BATCH_SIZE [32], LR [3e-4], EKD_WEIGHT [3], IMAGE_SIZE [224],
SEED [0], DEVICE [cuda], AMP [none], WORKERS [fopro's default], HEAD_THRESHOLD [1000],
TAIL_THRESHOLD [200], PROBE [0; 1: probe the teacher on each fold's val split and start the FPG from it],
OUT [runs/isic2019], FOPRO [fopro], PYTHON [python3].
EOF
}

IMAGES="${1:-${IMAGES:-}}"
CSV_DIR="${2:-${CSV_DIR:-}}"
TEACHER="${3:-${TEACHER:-}}"
TEACHER_WEIGHTS="${4:-${TEACHER_WEIGHTS:-}}"
IMBALANCE="${5:-${IMBALANCE:-0.01}}"

if [[ -z "$IMAGES" || -z "$CSV_DIR" || -z "$TEACHER" || -z "$TEACHER_WEIGHTS" ]]; then
    usage
    exit 2
fi

METHODS="${METHODS:-none ekd fopro}"
FOLDS="${FOLDS:-1 2 3 4 5}"
EPOCHS="${EPOCHS:-100}"
BATCH_SIZE="${BATCH_SIZE:-32}"
LR="${LR:-3e-4}"
EKD_WEIGHT="${EKD_WEIGHT:-3}"
IMAGE_SIZE="${IMAGE_SIZE:-224}"
SEED="${SEED:-0}"
DEVICE="${DEVICE:-cuda}"
AMP="${AMP:-none}"
WORKERS="${WORKERS:-}"
HEAD_THRESHOLD="${HEAD_THRESHOLD:-1000}"
TAIL_THRESHOLD="${TAIL_THRESHOLD:-200}"
PROBE="${PROBE:-0}"
OUT="${OUT:-runs/isic2019}"
FOPRO="${FOPRO:-fopro}"
PYTHON="${PYTHON:-python3}"

die() { echo "error: $*" >&2; exit 2; }

[[ -d "$IMAGES" ]] || die "IMAGES_DIR $IMAGES is not a folder: give the ISIC_2019_Training_Input folder"
[[ -d "$CSV_DIR" ]] || die "CSV_DIR $CSV_DIR is not a folder: give the folder of {train,val,test}_skin{FOLD}_{IMBALANCE}.csv"
[[ -f "$TEACHER_WEIGHTS" ]] || die "TEACHER_WEIGHTS $TEACHER_WEIGHTS is not a file"
case "$IMBALANCE" in
    0.01 | 0.005 | 0.002) ;;
    *) die "IMBALANCE $IMBALANCE: the splits exist for 0.01, 0.005 and 0.002" ;;
esac

# The frozen teacher, as fopro distill / probe options.
case "$TEACHER" in
    moco) teacher_args=(--teacher resnet50 --teacher-weights "$TEACHER_WEIGHTS") ;;
    dinov2) teacher_args=(--teacher vit_small_patch14_dinov2 --teacher-weights "$TEACHER_WEIGHTS" --teacher-image-size 224) ;;
    imagenet) teacher_args=(--teacher resnet50 --teacher-weights "$TEACHER_WEIGHTS") ;;
    *) die "TEACHER $TEACHER: choose moco, dinov2 or imagenet" ;;
esac

# The student methods, as fopro distill options.
method_args() {
    case "$1" in
        none) echo "--method none" ;;
        kd) echo "--method kd" ;;
        ekd) echo "--method ekd" ;;
        fopro) echo "--method fopro" ;;
        fopro-no-akd) echo "--method fopro --adv-weight 0" ;;
        *) die "METHODS: unknown method $1 (none, kd, ekd, fopro, fopro-no-akd)" ;;
    esac
}
for method in $METHODS; do method_args "$method" >/dev/null; done

run() {  # print a command, then run it; set -e stops the script when it fails
    printf '+ %s\n' "$*" >&2
    "$@"
}

optional=()
if [[ -n "$WORKERS" ]]; then optional=(--workers "$WORKERS"); fi
groups=(--head-threshold "$HEAD_THRESHOLD" --tail-threshold "$TAIL_THRESHOLD")
root="$OUT/$TEACHER-$IMBALANCE"
mkdir -p "$root"
started=$SECONDS

for fold in $FOLDS; do
    data=(--images "$IMAGES")
    for split in train val test; do
        csv="$CSV_DIR/${split}_skin${fold}_${IMBALANCE}.csv"
        [[ -f "$csv" ]] || die "$csv is missing (fold $fold, imbalance $IMBALANCE)"
        data+=("--$split-csv" "$csv")
    done

    probe_args=()
    if [[ "$PROBE" == 1 ]]; then
        probe_dir="$root/probe/fold$fold"
        if [[ ! -f "$probe_dir/probe.json" ]]; then
            run "$FOPRO" probe "${teacher_args[@]}" "${data[@]}" --split val --device "$DEVICE" "${groups[@]}" --out "$probe_dir"
        fi
        probe_args=(--probe-init "$probe_dir/probe.json")
    fi

    for method in $METHODS; do
        dir="$root/$method/fold$fold"
        echo "== [$(( (SECONDS - started) / 60 )) min] fold $fold, $method ($TEACHER teacher, imbalance $IMBALANCE): $dir" >&2
        if [[ -f "$dir/eval_test.json" ]]; then
            echo "   done already (eval_test.json)" >&2
            continue
        fi
        # shellcheck disable=SC2207
        margs=($(method_args "$method"))
        targs=()
        if [[ "$method" != none ]]; then
            targs=("${teacher_args[@]}")
            if [[ "$method" == fopro* && ${#probe_args[@]} -gt 0 ]]; then targs+=("${probe_args[@]}"); fi
        fi
        if [[ -f "$dir/best.safetensors" && -f "$dir/metrics.jsonl" ]] \
            && "$PYTHON" -c 'import json,sys; lines=open(sys.argv[1]).read().splitlines(); sys.exit(0 if lines and json.loads(lines[-1])["epoch"] == int(sys.argv[2]) else 1)' \
                "$dir/metrics.jsonl" "$EPOCHS"; then
            echo "   training finished already" >&2
        elif [[ -f "$dir/resume.safetensors" ]]; then
            run "$FOPRO" distill --resume "$dir" --device "$DEVICE"
        else
            overwrite=()
            if [[ -f "$dir/config.json" ]]; then overwrite=(--overwrite); fi  # started, but no epoch saved
            run "$FOPRO" distill "${data[@]}" ${targs[@]+"${targs[@]}"} --student resnet18 --image-size "$IMAGE_SIZE" "${margs[@]}" \
                --ekd-weight "$EKD_WEIGHT" --epochs "$EPOCHS" --batch-size "$BATCH_SIZE" --optimizer adam --lr "$LR" --augment dermoscopy \
                --seed "$SEED" --device "$DEVICE" --amp "$AMP" "${groups[@]}" ${optional[@]+"${optional[@]}"} --out "$dir" ${overwrite[@]+"${overwrite[@]}"}
        fi
        # model selection is on val (best.safetensors = best val balanced accuracy); test only here
        run "$FOPRO" eval "$dir/best.safetensors" "${data[@]}" --split test --device "$DEVICE" "${groups[@]}" --json > "$dir/eval_test.json.tmp"
        mv "$dir/eval_test.json.tmp" "$dir/eval_test.json"
    done
done

# Mean (and std) over the folds of the test balanced accuracy and the rest, per method.
# shellcheck disable=SC2086
"$PYTHON" - "$root" $METHODS <<'PY'
import json, statistics, sys
from pathlib import Path

root, methods = Path(sys.argv[1]), sys.argv[2:]
keys = ("balanced_accuracy", "tail_recall", "macro_f1", "accuracy")
table, lines = {}, ["| method | folds | " + " | ".join(f"test {k}" for k in keys) + " |", "| --- | ---: |" + " ---: |" * len(keys)]
for method in methods:
    reports = [json.loads(p.read_text()) for p in sorted((root / method).glob("fold*/eval_test.json"))]
    table[method] = {"folds": len(reports)}
    cells = []
    for key in keys:
        values = [r[key] for r in reports if r.get(key) is not None]
        mean = statistics.fmean(values) if values else None
        std = statistics.stdev(values) if len(values) > 1 else None
        table[method][key] = {"mean": mean, "std": std, "values": values}
        cells.append("n/a" if mean is None else f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}"))
    lines.append(f"| {method} | {len(reports)} | " + " | ".join(cells) + " |")
(root / "summary.json").write_text(json.dumps(table, indent=2) + "\n")
(root / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"\nwrote {root / 'summary.md'} and summary.json (percent, mean ± std over folds)")
PY
