#!/usr/bin/env bash
# The engine benchmark on a GPU machine (an H100/H200 with JAX + CUDA, no TensorFlow, no Keras,
# no network): Keras on the JAX backend, VGG16 with random weights, float32 and bfloat16 side
# by side in one run: the matmul rate in each precision, tiled 1024x1024 stride 112 (and the
# seed's per-window recipe), direct 4096x4096 through the engine, and the same direct job end to
# end (decode a PNG -> infer -> heatmap.npz, summary.json, overlays). Prints one table.
#
#   bench/gpu_bench.sh prepare            # HERE (with network): download the wheels to carry
#                                         # into bench/wheels/ (PY_VERSION=3.12 for another Python)
#   bench/gpu_bench.sh [TILED] [DIRECT]   # THERE: install what is missing from bench/wheels,
#                                         # then run (default 1024 4096; ~3-4 minutes on an H100)
#
# Tested on CPU at a small size: `QUICK=1 JAX_PLATFORMS=cpu PYTHON=.venv/bin/python bench/gpu_bench.sh 336 448`
# (bench/README.md gives that run). Options via the environment: PYTHON (default
# python3), BUDGET_MB (direct mode's memory budget, default 16384: large tiles on a GPU),
# PRECISIONS (default "float32 bfloat16"), QUICK=1 (2048 matmul, 3 repeats), OUT (JSON results, default bench/results/gpu_bench.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=bench/wheels
# Distributions the engine imports beyond numpy/ml_dtypes/jax (which the GPU image has), with
# the import name that shows each is present. Versions come from constraints.txt.
PACKAGES="keras:keras absl-py:absl h5py:h5py namex:namex optree:optree rich:rich markdown-it-py:markdown_it
mdurl:mdurl pygments:pygments packaging:packaging pydantic:pydantic pydantic-core:pydantic_core
pydantic-settings:pydantic_settings python-dotenv:dotenv annotated-types:annotated_types
typing-extensions:typing_extensions typing-inspection:typing_inspection pillow:PIL psutil:psutil"

pinned() {  # "name==version" from constraints.txt (case- and -/_-insensitive), else the bare name
    local name=$1 line
    line=$(grep -i -E "^${name//-/[-_]}==" constraints.txt | head -1 || true)
    echo "${line:-$name}"
}

if [[ "${1:-}" == "prepare" ]]; then
    mkdir -p "$WHEELS"
    version_args=()
    if [[ -n "${PY_VERSION:-}" ]]; then
        version_args=(--python-version "$PY_VERSION" --only-binary=:all: --platform manylinux2014_x86_64
            --platform manylinux_2_28_x86_64)
    fi
    for entry in $PACKAGES; do
        "$PY" -m pip download --quiet --no-deps "${version_args[@]}" -d "$WHEELS" "$(pinned "${entry%%:*}")"
    done
    du -sh "$WHEELS"
    exit 0
fi

TILED=${1:-1024}
DIRECT=${2:-4096}
for entry in $PACKAGES; do  # install only what this interpreter lacks, never replacing its numpy/jax
    if ! "$PY" -c "import ${entry##*:}" 2>/dev/null; then
        "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" "$(pinned "${entry%%:*}")"
    fi
done
export KERAS_BACKEND=jax
"$PY" - <<'EOF'
import jax, keras
print(f"# keras {keras.__version__} on {keras.backend.backend()}; jax {jax.__version__}; devices {jax.devices()}")
EOF
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | sed 's/^/# GPU: /'
fi
# shellcheck disable=SC2086  # PRECISIONS is a list
"$PY" -m bench.bench_engine ${QUICK:+--quick} --only matmul tiled direct --sizes "$TILED" "$DIRECT" "$DIRECT" \
    --precisions ${PRECISIONS:-float32 bfloat16} --job --warm-same-size \
    --budget "${BUDGET_MB:-16384}" --case-timeout 300 --json "${OUT:-bench/results/gpu_bench.json}"
