#!/usr/bin/env bash
# Build vLLM 0.30.0's CPU backend on this project's x86 CPU machine (Debian bookworm, g++ 12.2)
# into a cached wheel; a later run finds the wheel and only installs it.
#
#   bench/build_vllm_cpu.sh            build (or reuse) the wheel, install it into $VLLM_BUILD/venv
#
# Why the patches (all applied to the unpacked sdist, recorded here, never upstream):
# - cmake/cpu_extension.cmake refuses g++ < 12.3 for x86; bookworm has 12.2. The check guards the
#   AVX512-BF16/AMX kernel builds; only the AVX2 kernels are built here, so it is lowered to 12.2.
# - vLLM builds three copies of its kernels (AMX, AVX512, AVX2) and imports one by the CPU's ISA.
#   Only the AVX2 sources are built, under the module name `_C` that every ISA path can import.
# - oneDNN (MATMUL;REORDER only, as vLLM sets) is limited to AVX2 implementations and GEMM kernels.
# - vLLM's CMake clones oneDNN from GitHub, which this machine cannot reach: a local snapshot is
#   given with FETCHCONTENT_SOURCE_DIR_ONEDNN.
# The build runs under `nice -n 19` in its own process group, whose id is written to
# $VLLM_BUILD/BUILD_PGID while it runs (another job may SIGSTOP/SIGCONT it).
set -euo pipefail
VLLM_BUILD=${VLLM_BUILD:-/work/vllm-build}
VLLM_VERSION=0.30.0
SRC=$VLLM_BUILD/vllm-$VLLM_VERSION
JOBS=${MAX_JOBS:-2}  # two compile jobs at nice 19: they take only the cores nobody else uses
cd "$VLLM_BUILD"
log() { echo "[$(date +%T)] $*"; }
start=$(date +%s)

wheel=$(ls wheels/vllm-${VLLM_VERSION}*.whl 2>/dev/null | head -1 || true)
if [[ -z "$wheel" ]]; then
  [[ -d venv ]] || python3 -m venv venv
  venv/bin/pip install -q torch==2.13.0+cpu cmake ninja "setuptools>=77,<80" setuptools-scm \
    setuptools-rust wheel packaging jinja2
  log "build deps ready after $(( $(date +%s) - start )) s"
  if [[ ! -d "$SRC" ]]; then
    venv/bin/pip download -q --no-deps --no-binary :all: --no-build-isolation vllm==$VLLM_VERSION -d sdist || true
    tar -xzf sdist/vllm-$VLLM_VERSION.tar.gz
  fi
  [[ -d onednn ]] || { echo "need a oneDNN source snapshot in $VLLM_BUILD/onednn" >&2; exit 1; }
  venv/bin/python - "$SRC" <<'PY'
import pathlib, sys
src = pathlib.Path(sys.argv[1])

def patch(rel, old, new):
    path = src / rel
    text = path.read_text()
    if new in text and old not in text:
        return
    assert text.count(old) == 1, f"{rel}: anchor not found once: {old[:60]!r}"
    path.write_text(text.replace(old, new))

cmake = "cmake/cpu_extension.cmake"
patch(cmake, "VERSION_GREATER_EQUAL 12.3))", "VERSION_GREATER_EQUAL 12.2))")
text = (src / cmake).read_text()
if "    # AMX + AVX512F + AVX512BF16 + AVX512VNNI" in text:  # drop the AMX and AVX512 targets
    amx, avx2 = text.index("    # AMX + AVX512F + AVX512BF16 + AVX512VNNI"), text.index("    # AVX2 \n")
    patch(cmake, text[amx:avx2], "")
patch(cmake, "        _C_AVX2\n        DESTINATION", "        _C\n        DESTINATION")
patch(cmake, '    set(ONEDNN_ENABLE_PRIMITIVE "MATMUL;REORDER")\n',
      '    set(ONEDNN_ENABLE_PRIMITIVE "MATMUL;REORDER")\n'
      '    set(ONEDNN_ENABLE_PRIMITIVE_CPU_ISA "AVX2")\n'
      # a cache entry: oneDNN declares this one itself (no DNNL_ alias), which drops a plain variable
      '    set(ONEDNN_ENABLE_GEMM_KERNELS_ISA "AVX2" CACHE STRING "" FORCE)\n')
# Without oneDNN: its ~400 compile units take hours on this machine's shared cores. vLLM's linear
# layers then fall back to torch.nn.functional.linear (its own attention, norm and rotary kernels stay).
patch(cmake, "\nif (ENABLE_X86_ISA OR (ASIMD_FOUND AND NOT APPLE_SILICON_FOUND) OR POWER9_FOUND",
      "\nif (FALSE AND ENABLE_X86_ISA OR FALSE AND (ASIMD_FOUND AND NOT APPLE_SILICON_FOUND) OR POWER9_FOUND")
patch(cmake, '        "csrc/cpu/mamba_cpu.cpp"\n        "csrc/cpu/dnnl_kernels.cpp"\n',
      '        "csrc/cpu/mamba_cpu.cpp"\n')
# No libnuma headers here (libnuma-dev is not installed): vLLM's NUMA-less build.
patch(cmake, "set (ENABLE_NUMA TRUE)", "set (ENABLE_NUMA FALSE)")
patch(cmake, "    set(_C_AVX2_LIBS numa dnnl_ext)\n", "    set(_C_AVX2_LIBS)\n")
patch("csrc/cpu/torch_bindings.cpp",
      "#if defined(__AVX512F__) || defined(__AVX2__) ||                               \\\n"
      "    (defined(__aarch64__) && !defined(__APPLE__)) || defined(__powerpc64__) || \\\n"
      "    defined(__riscv_v) || defined(__s390x__)\n  // Helper function to release oneDNN handlers",
      "#if 0  // built without oneDNN (parallel-r1's bench/build_vllm_cpu.sh)\n"
      "  // Helper function to release oneDNN handlers")
# vLLM's CPU attention instantiates its kernels for 12 head sizes; 32 and 64 (and 48 for the 16-aligned
# path) cover the tiny models here and cut the heaviest compile unit to a fraction. Another head size
# then fails at its first attention call.
patch("csrc/cpu/generate_cpu_attn_dispatch.py", "HEAD_DIMS_32 = [32, 64, 96, 128, 160, 192, 224, 256, 512]",
      "HEAD_DIMS_32 = [32, 64]")
patch("csrc/cpu/generate_cpu_attn_dispatch.py", "HEAD_DIMS_16 = [48, 80, 112]", "HEAD_DIMS_16 = [48]")
patch("setup.py",
      '        ext_modules.append(CMakeExtension(name="vllm._C_AVX512"))\n'
      '        ext_modules.append(CMakeExtension(name="vllm._C_AVX2"))\n', "")
PY
  log "sources patched"
  export PATH=$VLLM_BUILD/venv/bin:$PATH VLLM_TARGET_DEVICE=cpu MAX_JOBS=$JOBS CMAKE_BUILD_TYPE=Release
  export FETCHCONTENT_SOURCE_DIR_ONEDNN=$VLLM_BUILD/onednn
  rm -f "$VLLM_BUILD/BUILD_PGID"
  cd "$SRC"
  # Not a group leader (no job control in a script), so setsid runs in place: its pid is the pgid.
  setsid nice -n 19 ../venv/bin/pip wheel -v --no-deps --no-build-isolation -w ../wheels . \
    > ../wheel.log 2>&1 &
  echo $! > "$VLLM_BUILD/BUILD_PGID"
  cd "$VLLM_BUILD"
  rc=0; wait $! || rc=$?
  rm -f "$VLLM_BUILD/BUILD_PGID"
  log "wheel build rc=$rc after $(( $(date +%s) - start )) s (log: $VLLM_BUILD/wheel.log)"
  [[ $rc -eq 0 ]] || exit $rc
  wheel=$(ls wheels/vllm-${VLLM_VERSION}*.whl | head -1)
fi
log "wheel: $wheel"
venv/bin/pip install -q "$wheel"
# The registry's torchvision/torchaudio wheels are built for CUDA torch; beside torch 2.13.0+cpu importing
# torchvision fails (`operator torchvision::nms does not exist`) and takes transformers' image code with it.
# Nothing here needs them.
venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
log "installed after $(( $(date +%s) - start )) s"
# The tests need the project in the same venv:
#   venv/bin/pip install -c constraints-cpu.txt -e ".[dev]"
#   OMP_NUM_THREADS=2 venv/bin/python -m pytest -m vllm tests/test_vllm_backend.py
