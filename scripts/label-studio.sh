#!/usr/bin/env bash
# A local Label Studio for development and tests, kept out of surd's venv (it pins Django,
# pyarrow<25 and friends that would clash with surd's stack).
#
#   scripts/label-studio.sh install                 # its own venv (default .label-studio-venv)
#   scripts/label-studio.sh start [PORT] [DATA_DIR] # background server on 127.0.0.1, waits healthy
#   scripts/label-studio.sh stop [DATA_DIR]         # stops the server started with that data dir
#
# The admin user and API token come from the environment, and only take effect on an EMPTY data
# dir (Label Studio creates them on first start):
#   LABEL_STUDIO_USERNAME   admin e-mail           (default admin@surd.local)
#   LABEL_STUDIO_PASSWORD   admin password         (default: random, kept in DATA_DIR/admin-password)
#   LABEL_STUDIO_API_KEY    the admin's API token  (required, > 5 characters; surd reads the same
#                           variable to connect)
# Then point surd at it:  export LABEL_STUDIO_URL=http://127.0.0.1:PORT
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${LABEL_STUDIO_VENV:-$root/.label-studio-venv}
version=${LABEL_STUDIO_VERSION:-1.23.2}

install() {
  if [ -x "$venv/bin/label-studio" ]; then
    echo "label-studio already installed in $venv"
    return
  fi
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet "label-studio==$version"
  echo "installed label-studio $version in $venv"
}

start() {
  local port=${1:-8080} data_dir=${2:-$root/.label-studio-data}
  if [ ! -x "$venv/bin/label-studio" ]; then
    echo "error: label-studio is not installed; run: $0 install" >&2
    exit 2
  fi
  if [ -z "${LABEL_STUDIO_API_KEY:-}" ] || [ ${#LABEL_STUDIO_API_KEY} -le 5 ]; then
    echo "error: set LABEL_STUDIO_API_KEY to the admin token to create (more than 5 characters)" >&2
    exit 2
  fi
  mkdir -p "$data_dir"
  data_dir=$(cd "$data_dir" && pwd)  # absolute: stop works from any directory
  if "$venv/bin/python" -c "import socket, sys; s = socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', int(sys.argv[1]))) != 0)" "$port"; then
    echo "error: port $port on 127.0.0.1 is already in use; pick another" >&2
    exit 2
  fi
  if [ -f "$data_dir/server.pid" ] && kill -0 "$(cat "$data_dir/server.pid")" 2>/dev/null; then
    echo "error: a server for $data_dir is already running (pid $(cat "$data_dir/server.pid"))" >&2
    exit 2
  fi
  local password=${LABEL_STUDIO_PASSWORD:-}
  if [ -z "$password" ]; then
    # a random admin password, kept where only this user can read it (never printed)
    if [ ! -f "$data_dir/admin-password" ]; then
      (umask 077 && head -c 18 /dev/urandom | base64 >"$data_dir/admin-password")
    fi
    password=$(cat "$data_dir/admin-password")
  fi
  # No telemetry: with Label Studio's defaults its pages load Sentry (browser.sentry-cdn.com,
  # *.ingest.sentry.io) and Google Tag Manager, frame labelstud.io/track, and the server reports
  # errors to Sentry and asks PyPI for its latest version. Empty DSNs and these two switches turn
  # all of that off, so annotators' browsers talk to this server and the image server only.
  # Started as a plain background command so $! is the server itself: stopping a wrapping
  # subshell's pid would leave the server running.
  LABEL_STUDIO_BASE_DATA_DIR="$data_dir" \
    LABEL_STUDIO_USERNAME="${LABEL_STUDIO_USERNAME:-admin@surd.local}" \
    LABEL_STUDIO_PASSWORD="$password" \
    LABEL_STUDIO_USER_TOKEN="$LABEL_STUDIO_API_KEY" \
    LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true \
    LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK=true \
    DJANGO_DEBUG=false \
    SENTRY_DSN= FRONTEND_SENTRY_DSN= COLLECT_ANALYTICS=false LATEST_VERSION_CHECK=false \
    nohup "$venv/bin/label-studio" start --no-browser --internal-host 127.0.0.1 --port "$port" \
    --data-dir "$data_dir" --enable-legacy-api-token >"$data_dir/server.log" 2>&1 &
  echo $! >"$data_dir/server.pid"
  local url="http://127.0.0.1:$port"
  for _ in $(seq 1 240); do
    if "$venv/bin/python" -c "import sys, urllib.request as u; sys.exit(b'UP' not in u.urlopen(sys.argv[1], timeout=2).read())" "$url/health" 2>/dev/null \
      && kill -0 "$(cat "$data_dir/server.pid")" 2>/dev/null; then
      echo "$url"
      return
    fi
    if ! kill -0 "$(cat "$data_dir/server.pid")" 2>/dev/null; then
      echo "error: label-studio exited; see $data_dir/server.log" >&2
      exit 1
    fi
    sleep 0.5
  done
  echo "error: label-studio did not become healthy in 120 s; see $data_dir/server.log" >&2
  stop "$data_dir"
  exit 1
}

stop() {
  local data_dir=${1:-$root/.label-studio-data}
  local pid_file="$data_dir/server.pid"
  [ -f "$pid_file" ] || { echo "no server.pid in $data_dir"; return; }
  local pid
  pid=$(cat "$pid_file")
  # only our server: a pid left from a crash may belong to another process by now
  if grep -q label-studio "/proc/$pid/cmdline" 2>/dev/null && kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pid_file"
}

case "${1:-}" in
  install) install ;;
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
