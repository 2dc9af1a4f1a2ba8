#!/usr/bin/env bash
# Creates .venv beside the checkout and installs the project with pinned versions.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh worker,test
# Why a script: README.md, .ci/run and the Dockerfiles all install through the same pins
# (constraints.txt), so what CI tests is what users and images get.
# `browser` in EXTRAS is not a pip extra: it installs Debian's `chromium` (apt-get, as root or with
# passwordless sudo) when no Chromium is found, for tests/test_browser.py; `scripts/setup.sh browser`
# alone installs only that. Without root it prints why and goes on (the browser test then fails, saying
# so, unless SEAMLESS_SKIP_BROWSER_TEST=1).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-worker}"
python="${PYTHON:-python3}"

install_chromium() {
  if [ -n "${SEAMLESS_CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1 \
     || command -v chromium-browser >/dev/null 2>&1; then
    return 0
  fi
  local why="" sudo=""
  if ! command -v apt-get >/dev/null 2>&1; then
    why="no apt-get on this machine (not Debian)"
  elif [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo="sudo -n"
    else
      why="not root and no passwordless sudo"
    fi
  fi
  if [ -z "$why" ]; then
    echo "setup: installing Debian's chromium for the browser test (apt-get)" >&2
    local log
    log="$(mktemp)"
    if $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$log" 2>&1 \
       && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >>"$log" 2>&1; then
      rm -f "$log"
      return 0
    fi
    tail -n 20 "$log" >&2
    rm -f "$log"
    why="apt-get failed (above)"
  fi
  echo "setup: Chromium not installed: $why. tests/test_browser.py needs it: install Debian's chromium" \
       "(apt-get install chromium) or set SEAMLESS_CHROMIUM=/path/to/chromium; SEAMLESS_SKIP_BROWSER_TEST=1 skips that test." >&2
}

case ",$extras," in
  *,browser,*)
    install_chromium
    extras="$(printf '%s' ",$extras," | sed -e 's/,browser,/,/g' -e 's/^,*//' -e 's/,*$//')"
    [ -n "$extras" ] || exit 0
    ;;
esac

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade "pip>=24"
# torch is pinned to the CPU 2.13.0 build in constraints.txt: an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet --constraint constraints.txt --editable ".[${extras}]"
