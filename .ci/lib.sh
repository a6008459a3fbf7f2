# Helpers sourced by .ci/setup and .ci/gguf-runtime.

# heartbeat LABEL CMD...: run CMD, saying "LABEL: still running (N min)" on stderr every
# HEARTBEAT_S seconds (60), so a long quiet build never looks hung.
heartbeat() {
  local label=$1 every=${HEARTBEAT_S:-60} rc=0 beat
  shift
  # the sleeps hold no copy of stderr: a reader of a pipe must not wait for an orphaned sleep
  ( n=0; while sleep "$every" </dev/null >/dev/null 2>&1; do
      n=$((n + every)); echo "$label: still running ($((n / 60)) min $((n % 60)) s)" >&2
    done ) &
  beat=$!
  "$@" || rc=$?
  kill "$beat" 2>/dev/null || true
  wait "$beat" 2>/dev/null || true
  return "$rc"
}

# build_stamp: a hash of everything that decides gradmap's build (the torch it compiles
# against, whether the extension is built, setup.py, pyproject.toml, csrc/); .ci/setup
# rebuilds only when it changes.
build_stamp() {
  { "${PYTHON_BIN:-python}" -c "import torch; print(torch.__version__)" 2>/dev/null || echo no-torch
    echo "GRADMAP_BUILD_EXT=${GRADMAP_BUILD_EXT:-1}"
    cat setup.py pyproject.toml
    find csrc -type f 2>/dev/null | LC_ALL=C sort | xargs -r cat
  } | sha256sum | cut -d' ' -f1
}
