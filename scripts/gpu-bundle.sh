#!/usr/bin/env bash
# Runs where there is no GPU (and no need for one): builds in release, with every kernel
# compiled at build time by NVRTC (sm_90 cubin + compute_80 PTX), and gathers in gpu-bundle/
# the stripped executables that need a GPU — the parity tests, the GPU benches, flowfuse —
# together with gpu-check.sh, which runs them on the GPU machine without cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bundle="$root/gpu-bundle"
limit_mib=60

if [ ! -e .nvidia/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 ]; then
    python3 -m pip install --quiet --disable-pip-version-check --target .nvidia \
        nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-nvcc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79
fi
export FLOWFUSE_DENY_SPILLS=1
# The H200 loads the sm_90 cubins (or compiles the embedded source): the compute_80 PTX, the
# largest image, stays out of these binaries so that the bundle fits in its size limit.
export FLOWFUSE_EMBED_PTX=0

rm -rf "$bundle"
mkdir -p "$bundle/bin" "$bundle/tests" "$bundle/benches"

cargo build --release --bin flowfuse
cp target/release/flowfuse "$bundle/bin/"

# Test and bench executables, found from cargo's JSON messages.
list_executables() {
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])
'
}
# Every suite with CUDA instances: the parity tests and the layer/flow suites whose bodies also
# run on the grid backends (on_grid_backends!).
gpu_tests=$(grep -l "on_grid_backends!(" tests/*.rs | xargs -n1 basename | sed 's/\.rs$//' | tr '\n' ' ')
test_args=()
for t in $gpu_tests; do test_args+=(--test "$t"); done
cargo test --release --no-run --message-format=json "${test_args[@]}" | list_executables |
    while read -r name exe; do
        case " $gpu_tests " in *" $name "*) cp "$exe" "$bundle/tests/$name" ;; esac
    done

gpu_benches=$(ls benches/gpu_*.rs 2>/dev/null | xargs -r -n1 basename | sed 's/\.rs$//' | tr '\n' ' ')
if [ -n "$gpu_benches" ]; then
    bench_args=()
    for b in $gpu_benches; do bench_args+=(--bench "$b"); done
    cargo bench --no-run --message-format=json "${bench_args[@]}" | list_executables |
        while read -r name exe; do
            case " $gpu_benches " in *" $name "*) cp "$exe" "$bundle/benches/$name" ;; esac
        done
fi

strip "$bundle"/bin/* "$bundle"/tests/* "$bundle"/benches/* 2>/dev/null || true
cp scripts/gpu-check.sh "$bundle/"
chmod +x "$bundle/gpu-check.sh"

size_mib=$(du -sm "$bundle" | cut -f1)
echo "gpu-bundle: ${size_mib} MiB"
ls -l "$bundle"/bin "$bundle"/tests "$bundle"/benches
if [ "$size_mib" -gt "$limit_mib" ]; then
    echo "gpu-bundle is larger than ${limit_mib} MiB" >&2
    exit 1
fi
