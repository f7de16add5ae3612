#!/usr/bin/env bash
# Version matrix: the whole test suite in a fresh virtual environment per row of the
# supported-versions table (docs/versions.md). Run it before a release; commit what it writes.
#
#   tools/matrix.sh [ROW...]      rows: oldest readme newest (default: all three)
#
#   oldest  the lowest versions setup.py allows, each one tested: torch 2.11 (triton 3.6), numpy,
#           transformers, timm at their floors; then checks that Triton's CPU interpreter refuses
#           numpy 2.4 with triton 3.6, naming the fix
#   readme  the pins of the README's install commands (torch 2.14.1, triton 3.8), the rest the newest
#   newest  the newest releases (torch 2.15, triton 3.9) on the newest Python tested
#
# Writes benchmarks/results/matrix/<row>.json (versions, counts, wall time, failures) and
# matrix.md (the table of every row there). Environment: MATRIX_VENVS (where the environments go,
# outside the repository; default ~/.cache/pruneattn-matrix), MATRIX_JOBS (pytest workers, default 2),
# MATRIX_WAIT_WHILE (a pgrep -f pattern: before each suite, wait while such a process runs, e.g. a
# timing benchmark that the suite would disturb).
# Each row downloads about 3 GB the first time (torch with its CUDA libraries; pip caches them).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENVS=${MATRIX_VENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/pruneattn-matrix}
OUT=$ROOT/benchmarks/results/matrix
JOBS=${MATRIX_JOBS:-2}

declare -A PYTHON TORCH PINS BROKEN
PYTHON[oldest]=3.11; TORCH[oldest]="torch==2.11.0 torchvision==0.26.0"
PINS[oldest]="numpy==1.26.4 transformers==5.24.0 timm==1.0.31"
BROKEN[oldest]="numpy==2.4.6"  # with triton 3.6: the interpreter must refuse it
PYTHON[readme]=3.11; TORCH[readme]="torch==2.14.1 torchvision==0.29.1"; PINS[readme]=""; BROKEN[readme]=""
PYTHON[newest]=3.13; TORCH[newest]="torch==2.15.0 torchvision==0.29.2"; PINS[newest]=""; BROKEN[newest]=""

# A fresh environment takes only the pins above: no site-wide pip constraints file.
export PIP_CONSTRAINT=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
# The suite's checks of the committed matrix results skip while this run writes them.
export PRUNEATTN_MATRIX_RUN=1

find_python() {  # python$1 from PATH, else from pyenv's versions
    local candidate
    for candidate in "python$1" "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/"$1".*/bin/"python$1"; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import sys" >/dev/null 2>&1; then
            command -v "$candidate"
            return
        fi
    done
    echo "tools/matrix.sh: no Python $1 found (put python$1 on PATH)" >&2
    return 1
}

run_row() {
    local row=$1 venv="$VENVS/$1" py start rc
    [[ -n "${PYTHON[$row]:-}" ]] || { echo "tools/matrix.sh: unknown row '$row' (oldest, readme, newest)" >&2; return 2; }
    echo "== $row: fresh environment in $venv"
    rm -rf "$venv"
    "$(find_python "${PYTHON[$row]}")" -m venv "$venv"
    py="$venv/bin/python"
    "$py" -m pip install -q ${TORCH[$row]}
    "$py" -m pip install -q -e "$ROOT[test]" ${PINS[$row]}
    "$py" -m pip check || true
    if [[ -n "${MATRIX_WAIT_WHILE:-}" ]]; then
        while pgrep -f "$MATRIX_WAIT_WHILE" >/dev/null; do
            echo "== $row: waiting for '$MATRIX_WAIT_WHILE' to finish"; sleep 60
        done
    fi
    echo "== $row: test suite"
    # Its own torch.compile cache: a cache shared with another checkout (a newer pruneattn whose custom
    # ops take more arguments) would hand this one compiled code it cannot run.
    export TORCHINDUCTOR_CACHE_DIR="$venv/inductor-cache" TRITON_CACHE_DIR="$venv/triton-cache"
    start=$(date +%s)
    local load_start
    load_start=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "")
    set +e
    (cd "$ROOT" && nice -n 10 "$py" -m pytest -q -n "$JOBS" -p no:cacheprovider --junitxml="$venv/junit.xml")
    rc=$?
    set -e
    "$py" "$ROOT/tools/matrix_report.py" row --name "$row" --junit "$venv/junit.xml" --seconds $(( $(date +%s) - start )) \
        --exit-status "$rc" --load-start "$load_start" --out "$OUT/$row.json"
    if [[ -n "${BROKEN[$row]}" ]]; then
        echo "== $row: a known-broken combination (${BROKEN[$row]}) is refused with the fix"
        "$py" -m pip install -q ${BROKEN[$row]}
        (cd "$ROOT" && "$py" tools/matrix_report.py refusal --out "$OUT/$row.json")
    fi
}

mkdir -p "$VENVS" "$OUT"
rows=("$@")
[[ ${#rows[@]} -gt 0 ]] || rows=(oldest readme newest)
for row in "${rows[@]}"; do
    run_row "$row"
done
python3 "$ROOT/tools/matrix_report.py" table "$OUT" > "$OUT/matrix.md"
cat "$OUT/matrix.md"
