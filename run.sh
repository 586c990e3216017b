#!/usr/bin/env bash
# The main job in one command, on a rented GPU or Colab, once the three competition files are in data/:
#
#     bash run.sh            # environment, prep, train (defaults), checkpoint table on dev, submission.json
#     bash run.sh --smoke    # the same chain on a tiny model built here, CPU only, a few minutes: check the
#                            # install (and your data files) before paying for GPU time
#     PYTHON=python bash run.sh     # use this interpreter as it is (Colab), instead of creating .venv
#
# Started again, it continues where it stopped: train.py resumes from its newest checkpoint, the table keeps
# finished checkpoints, infer.py resumes from its partial file; finished stages are skipped.
# Without data/일상대화요약_{train,dev,test}.json it says so and runs on data/sample (outputs/sample/).
# --smoke writes only under outputs/smoke/ and never touches the real run. Each stage prints the command it
# runs, to rerun one stage alone or with other flags (README: Training, Inference and scoring).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

usage() {
    sed -n '2,13s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

SMOKE=0
for arg in "$@"; do
    case $arg in
        --smoke) SMOKE=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "error: unknown argument '$arg': bash run.sh [--smoke] [--help]" >&2; exit 2 ;;
    esac
done

# rich draws tables and rules 80 columns wide when stdout is not a terminal (nohup, `> log`, Colab's `!`), which
# folds the scripts' tables and paths; a log has room for more.
[[ -t 1 ]] || export COLUMNS=${COLUMNS:-120}

STAGES=6
STARTED=$SECONDS
stage_number=0
rule() {
    local title="run.sh $* "
    printf '\n%s%s\n' "$title" "$(printf '%*s' $((100 - ${#title})) '' | tr ' ' '=')"
}
stage() {
    stage_number=$((stage_number + 1))
    rule "($stage_number/$STAGES) $*"
}
die() {
    echo "error: $*" >&2
    exit 2
}
show_and_run() {  # print the command the way a user would retype it, then run it
    printf '$'; printf ' %q' "$@"; printf '\n'
    "$@"
}

# -------------------------------------------------------------------------------------------------
stage "data"
COMPETITION=(data/일상대화요약_train.json data/일상대화요약_dev.json data/일상대화요약_test.json)
present=() missing=()
for file in "${COMPETITION[@]}"; do
    if [[ -f $file ]]; then present+=("$file"); else missing+=("$file"); fi
done
if ((${#present[@]} > 0 && ${#missing[@]} > 0)); then
    die "data/ holds ${present[*]} but not ${missing[*]}: put all three competition files there"
fi
SAMPLE=(data/sample/train.json data/sample/dev.json data/sample/test.json)
if ((SMOKE)); then
    ROOT=outputs/smoke
    INPUTS=("${SAMPLE[@]}")
    echo "smoke run: a tiny Gemma 2 built here, on data/sample, CPU only; everything goes to $ROOT/"
    if ((${#missing[@]} > 0)); then
        echo "no competition files in data/ (${COMPETITION[*]}): bash run.sh would run on data/sample"
    fi
elif ((${#missing[@]} > 0)); then
    ROOT=outputs/sample
    INPUTS=("${SAMPLE[@]}")
    echo "no competition files in data/ (${COMPETITION[*]}): running on data/sample, outputs in $ROOT/"
else
    ROOT=outputs
    INPUTS=("${COMPETITION[@]}")
    echo "competition files: ${COMPETITION[*]}"
fi
TRAIN=${INPUTS[0]} DEV=${INPUTS[1]} TEST=${INPUTS[2]}
if [[ $ROOT == outputs ]]; then
    # README's own paths, so its single-step commands (python train.py, python infer.py ...) continue this run.
    PREPARED=data/prepared RUN=outputs/gemma2-9b-dcs SUBMISSION=submission.json
else
    # One level deeper than outputs/*/final, so infer.py's default model is never a sample or smoke run.
    PREPARED=$ROOT/prepared RUN=$ROOT/run SUBMISSION=$ROOT/submission.json
fi
DEV_PRED=$ROOT/dev/dev_pred.json
TABLE=$ROOT/dev/dev_pred.checkpoints.json

if ((SMOKE)); then
    # Nothing may reach a hub: a smoke run must work (and fail) the same with no network.
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
    MODEL=$ROOT/tiny_model
    PREP_FLAGS=(--tokenizer "$MODEL" --max_seq_length 1024)
    # A high learning rate teaches the random tiny model the summaries' opening in a few steps, so it does not end
    # its turn at once (an empty summary stops infer.py). 8 rows in batches of 4 checkpoint every 2 steps (one
    # epoch): the table ranks checkpoint-6 and checkpoint-8.
    TRAIN_FLAGS=(--model "$MODEL" --max_seq_length 1024 --max_steps 8 --learning_rate 3e-2 --lr_scheduler_type constant
                 --warmup_steps 0 --weight_decay 0 --lora_r 16 --lora_alpha 16 --lora_dropout 0
                 --per_device_train_batch_size 4 --gradient_accumulation_steps 1)
    # BERTScore and BLEURT would download ~2 GB of scorer models; ROUGE-1 is local and exact.
    INFER_FLAGS=(--max_new_tokens 32 --metrics rouge1)
else
    PREP_FLAGS=(--tokenizer unsloth/gemma-2-9b-it-bnb-4bit)
    TRAIN_FLAGS=()
    INFER_FLAGS=()
fi

# -------------------------------------------------------------------------------------------------
stage "environment"
if [[ -n ${PYTHON:-} ]]; then
    PY=$PYTHON
    echo "using $PY as it is (PYTHON is set): no .venv created"
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
    echo "using the existing .venv"
else
    base=python3
    command -v "$base" >/dev/null || die "no python3 on PATH: install Python >= 3.11, or point PYTHON at one"
    "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$("$base" --version 2>&1) is too old: trl 1.15 and matplotlib 3.11.2 need Python >= 3.11; make .venv" \
            "with one (python3.11 -m venv --system-site-packages .venv; README Install) and run bash run.sh again"
    # --system-site-packages keeps the image's CUDA torch (and numpy) visible in the venv.
    # A half-made .venv would be taken for a finished one next time.
    show_and_run "$base" -m venv --system-site-packages .venv || {
        rm -rf .venv
        die "could not create .venv with $base (no ensurepip?): run PYTHON=$base bash run.sh to use it as it is"
    }
    PY=.venv/bin/python
fi
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$("$PY" --version 2>&1) is too old: trl 1.15 and matplotlib 3.11.2 need Python >= 3.11 (README Install)"
PIP=("$PY" -m pip --disable-pip-version-check --no-input)
if ! "$PY" -c 'import importlib.metadata as m; m.version("torch")' 2>/dev/null; then
    ((SMOKE)) || die "no torch in $PY: use a CUDA PyTorch image or Colab (this keeps its torch), or install a CUDA" \
        "torch first (README Install)"
    echo "no torch in $PY: installing torch==2.13.0 for the smoke run (the torch tests/run.sh installs)"
    show_and_run "${PIP[@]}" install --quiet torch==2.13.0
fi
# prep.py --check_env reads versions from package metadata and needs only numpy, which torch images carry.
"$PY" -c 'import numpy' 2>/dev/null || show_and_run "${PIP[@]}" install --quiet numpy
show_and_run "$PY" prep.py --check_env

# requirements.txt pins every package but torch: compare what is installed with the pins (no import, no pip call).
stale=$("$PY" - <<'EOF'
import re
from importlib import metadata
for line in open("requirements.txt", encoding="utf-8"):
    pin = re.match(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s#;]+)", line)
    if not pin:
        continue
    try:
        installed = metadata.version(pin[1])
    except metadata.PackageNotFoundError:
        installed = None
    if installed != pin[2]:
        print(f"{pin[1]}=={pin[2]} ({installed or 'missing'})", end=" ")
EOF
)
if [[ -z $stale ]]; then
    echo "requirements.txt: every pinned package is installed"
else
    echo "requirements.txt: to install: $stale"
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    # The torch already here is pinned, so pip never swaps the image's CUDA build for a PyPI one.
    "$PY" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > "$scratch/torch-pin.txt"
    # A -c on the command line replaces pip.conf's constraint file (tests/run.sh does the same).
    if [[ -f /etc/xdg/pip/constraints.txt ]]; then cat /etc/xdg/pip/constraints.txt >> "$scratch/torch-pin.txt"; fi
    grep -vE '^[[:space:]]*unsloth([_-]zoo)?[[:space:]]*([=<>!~;[#]|$)' requirements.txt > "$scratch/requirements.txt"
    show_and_run "${PIP[@]}" install --quiet -c "$scratch/torch-pin.txt" -r "$scratch/requirements.txt"
    # Their metadata asks for a certifi newer than some mirrors hold; their own dependencies are pinned above.
    unsloth_pins=$(grep -E '^[[:space:]]*unsloth([_-]zoo)?[[:space:]]*==' requirements.txt | sed 's/#.*//' | tr -d ' ')
    # shellcheck disable=SC2086  # one word per pin
    show_and_run "${PIP[@]}" install --quiet --no-deps $unsloth_pins
fi
# The real test of an install: unsloth imports (and patches) the stack, and says which accelerator it found.
device=$("$PY" -c '
from common import filter_known_noise
filter_known_noise()
import unsloth, torch
print(f"CUDA: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no CUDA")
' | tail -n 1) || die "import unsloth failed in $PY (the traceback is above; README Troubleshooting)"
echo "torch $("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))'), $device"
if ((!SMOKE)) && [[ $device == "no CUDA" ]]; then
    # On a GPU machine this means a CPU torch in $PY.
    die "torch in $PY sees no GPU: training Gemma 2 9B needs one (a GPU machine with a CPU torch there? move .venv" \
        "away and run again); bash run.sh --smoke runs the chain on CPU"
fi

# -------------------------------------------------------------------------------------------------
stage "prep"
if ((SMOKE)); then
    if [[ -f $MODEL/config.json ]]; then
        echo "$MODEL: built by an earlier run; kept"
    else
        show_and_run "$PY" tests/tiny_model.py "$MODEL"
    fi
    if ((${#missing[@]} == 0)); then
        echo "checking the competition files with prep.py (every record validated; the rows are not used here)"
        show_and_run "$PY" prep.py --train "${COMPETITION[0]}" --dev "${COMPETITION[1]}" --test "${COMPETITION[2]}" \
            --out "$ROOT/data_check"
    fi
fi
# Fast and deterministic (the same inputs give the same bytes), so it simply runs again.
show_and_run "$PY" prep.py --train "$TRAIN" --dev "$DEV" --out "$PREPARED" "${PREP_FLAGS[@]}"

# -------------------------------------------------------------------------------------------------
stage "train"
if [[ -f $RUN/final/run_config.json ]]; then
    # train.py refuses to overwrite a finished run; the table below still picks up any new checkpoint.
    echo "$RUN/final: finished by an earlier run; kept (to train again: python train.py --output_dir $RUN" \
        "--overwrite_output_dir)"
else
    show_and_run "$PY" train.py --data "$PREPARED" --output_dir "$RUN" "${TRAIN_FLAGS[@]}"
fi

# -------------------------------------------------------------------------------------------------
stage "checkpoint table on dev"
mkdir -p "$(dirname "$DEV_PRED")"
show_and_run "$PY" infer.py --model "$RUN" --input "$DEV" --output "$DEV_PRED" "${INFER_FLAGS[@]}"
BEST=$("$PY" -c '
import json, sys
table = json.load(open(sys.argv[1], encoding="utf-8"))
print(next(row["path"] for row in table["rows"] if row["checkpoint"] == table["best"]))
' "$TABLE")

# -------------------------------------------------------------------------------------------------
stage "submission"
weights=$BEST/adapter_model.safetensors
[[ -f $weights ]] || weights=$BEST
if [[ -f $SUBMISSION && $SUBMISSION -nt $weights ]]; then
    echo "$SUBMISSION: written from $BEST by an earlier run; kept (delete it to write it again)"
else
    show_and_run "$PY" infer.py --model "$BEST" --input "$TEST" --output "$SUBMISSION" "${INFER_FLAGS[@]}"
fi

# -------------------------------------------------------------------------------------------------
rule "done"
elapsed=$((SECONDS - STARTED))
echo "$SUBMISSION: from $BEST, the best on dev ($TABLE), in $((elapsed / 60))m$((elapsed % 60))s"
if ((SMOKE)); then
    echo "next: the install and the chain work; on the GPU machine (competition files in data/): bash run.sh"
elif [[ $ROOT == outputs/sample ]]; then
    echo "next: put the three competition files in data/ and run bash run.sh again"
else
    echo "next: upload $SUBMISSION; to compare seeds, merges or selections first, see README (The whole loop)"
fi
