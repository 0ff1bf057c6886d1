#!/usr/bin/env bash
# Runs on the GPU machine, from the folder scripts/gpu-bundle.sh filled, without cargo:
# nvidia-smi, the GPU parity tests with FLOWFUSE_REQUIRE_GPU=1 (embedded kernel images, then
# NVRTC at run time where libnvrtc is present), the bench command and the criterion benches in
# a quick mode, and short training runs on the GPU. Finishes within about 5 minutes. With OUT
# set, writes $OUT/summary.md (and the raw outputs beside it).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out"
summary="$out/summary.md"
started=$(date +%s)
export FLOWFUSE_REQUIRE_GPU=1

step() { echo; echo "== $*"; }
elapsed() { echo $(( $(date +%s) - started )); }

{
    echo "# flowfuse GPU check"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo unknown)"
} > "$summary"

step "nvidia-smi"
nvidia-smi || echo "nvidia-smi failed"

step "flowfuse info / kernels"
"$here/bin/flowfuse" info | tee "$out/info.json"
"$here/bin/flowfuse" kernels | tee "$out/kernels.txt"

run_tests() {
    local label=$1
    local pass=0 fail=0
    echo >> "$summary"
    echo "## parity tests ($label)" >> "$summary"
    echo >> "$summary"
    for t in "$here"/tests/*; do
        local name log
        name=$(basename "$t")
        log="$out/test-$label-$name.log"
        if timeout 120 "$t" cuda --test-threads=1 > "$log" 2>&1; then
            pass=$((pass + 1)); echo "- $name: ok ($(grep -o '[0-9]* passed' "$log" | tail -1))" >> "$summary"
        else
            fail=$((fail + 1)); echo "- $name: FAILED (see $(basename "$log"))" >> "$summary"
            tail -30 "$log"
        fi
        tail -3 "$log"
    done
    echo "$label: $pass test binaries passed, $fail failed"
}

step "parity tests, embedded kernel images"
run_tests "embedded images"

if ldconfig -p 2>/dev/null | grep -q libnvrtc || ls /usr/local/cuda*/lib64/libnvrtc.so* >/dev/null 2>&1; then
    step "parity tests, kernels compiled by NVRTC at run time"
    [ -d /usr/local/cuda/lib64 ] && export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    FLOWFUSE_KERNEL_SOURCE=nvrtc run_tests "runtime NVRTC"
else
    echo "- runtime NVRTC: libnvrtc not found on this machine, not run" >> "$summary"
fi

step "bench command (quick)"
timeout 120 "$here/bin/flowfuse" bench --device cuda --quick | tee "$out/bench.jsonl"
{
    echo
    echo "## flowfuse bench --device cuda --quick"
    echo
    echo "| bench | precision | rows | ms/call | rows/s | GFLOP/s | frac of compute peak | GB/s | frac of memory peak |"
    echo "|---|---|---|---|---|---|---|---|---|"
    python3 - "$out/bench.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        v = json.loads(line)
    except ValueError:
        continue
    f = lambda k, fmt: (fmt % v[k]) if k in v else "-"
    print(f"| {v['bench']} | {v['precision']} | {v['rows']} | {f('ms_per_call','%.3f')} | {f('rows_per_second','%.3g')} | "
          f"{f('gflops','%.1f')} | {f('frac_compute_peak','%.2f')} | {f('gbs','%.1f')} | {f('frac_memory_peak','%.2f')} |")
PY
} >> "$summary"

step "criterion benches (quick)"
for b in "$here"/benches/*; do
    [ -x "$b" ] || continue
    timeout 90 "$b" --bench --quick --noplot 2>&1 | tee "$out/criterion-$(basename "$b").txt" | grep -E "time:|thrpt:|skip" || true
done

step "training on the GPU"
echo >> "$summary"
echo "## training on the GPU" >> "$summary"
echo >> "$summary"
for model in realnvp maf cnf; do
    line=$(timeout 60 "$here/bin/flowfuse" train --device cuda --model "$model" --steps 500 --quiet --no-figures --out "$out/train-$model" 2>&1 | tail -1)
    echo "$line"
    echo "- $model: \`$line\`" >> "$summary"
done

echo >> "$summary"
echo "- wall time: $(elapsed) s" >> "$summary"
step "summary ($summary)"
cat "$summary"
