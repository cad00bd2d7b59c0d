#!/usr/bin/env bash
# Bring up a local Ray head for development, with token auth on, and print how to submit to it.
#
#   deploy/dev-ray-head.sh            start (sets up .venv first if needed)
#   deploy/dev-ray-head.sh --stop     stop it
#
# Ports: RAY_PORT (GCS, default 6379), RAY_DASHBOARD_PORT (jobs API + dashboard, default 8265),
# both on 127.0.0.1 only, and RAY_CLIENT_PORT (Ray Client server, default 10001). The token is Ray's default token file, ~/.ray/auth_token (created on the
# first start; RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH override it, as in Ray itself).
set -euo pipefail
cd "$(dirname "$0")/.."
RAY_PORT=${RAY_PORT:-6379}
RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
RAY_CLIENT_PORT=${RAY_CLIENT_PORT:-10001}   # Ray Client server (ray://), also on 127.0.0.1's node
TEMP_DIR=${RAY_DEV_TEMP_DIR:-/tmp/ray-odin-dev}
export RAY_AUTH_MODE=token
export RAY_USAGE_STATS_ENABLED=0
# Idle workers live 60 s, not 1 s: the scoring job's short read/write tasks reuse them
# (docs/scoring-job.md, "Worker reuse"). Read by `ray start`'s raylet.
export RAY_idle_worker_killing_time_threshold_ms=${RAY_idle_worker_killing_time_threshold_ms:-60000}

if [ "${1:-}" = "--stop" ]; then
  # Stop only this head: the processes whose command line names its temp dir (`ray stop` would
  # stop every Ray cluster on the machine), and its Ray Client server, which `ray start` leaves an
  # orphan whose command line names only its port.
  pids=$(grep -l -a -- "$TEMP_DIR" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3 | grep -vx "$$" || true)
  for f in $(grep -l -a -- "ray.util.client.server" /proc/[0-9]*/cmdline 2>/dev/null || true); do
    if tr '\0' ' ' < "$f" 2>/dev/null | grep -q -- "--port=$RAY_CLIENT_PORT "; then pids="$pids $(echo "$f" | cut -d/ -f3)"; fi
  done
  # and their children: the raylet's dashboard and runtime-env agents retitle themselves
  # (`ray::DashboardAgent`), so their command lines no longer name the temp dir, and they outlive it
  todo=$pids
  while [ -n "$(echo $todo)" ]; do
    kids=$(for p in $todo; do cat /proc/$p/task/*/children 2>/dev/null; done)
    pids="$pids $kids"
    todo=$kids
  done
  pids=$(echo $pids)
  if [ -z "$pids" ]; then echo "no Ray head with temp dir $TEMP_DIR is running"; exit 0; fi
  kill $pids 2>/dev/null || true
  for _ in $(seq 50); do
    alive=$(for p in $pids; do if [ -d "/proc/$p" ]; then echo "$p"; fi; done)
    [ -z "$alive" ] && break
    sleep 0.2
  done
  if [ -n "${alive:-}" ]; then
    kill -9 $alive 2>/dev/null || true
    for _ in $(seq 50); do
      alive=$(for p in $alive; do if [ -d "/proc/$p" ]; then echo "$p"; fi; done)
      [ -z "$alive" ] && break
      sleep 0.1
    done
  fi
  echo "stopped the Ray head with temp dir $TEMP_DIR"
  exit 0
fi
[ $# -eq 0 ] || { echo "usage: $0 [--stop]" >&2; exit 2; }

scripts/setup
# Jobs run `python`: make it the project's virtualenv for the head and everything it starts.
export PATH="$PWD/.venv/bin:$PATH"
RAY=.venv/bin/ray
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
  "$RAY" get-auth-token --generate >/dev/null   # creates ~/.ray/auth_token (mode 600) if missing
fi
"$RAY" start --head --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
  --dashboard-host 127.0.0.1 --dashboard-port "$RAY_DASHBOARD_PORT" --include-dashboard true \
  --ray-client-server-port "$RAY_CLIENT_PORT" --temp-dir "$TEMP_DIR" --disable-usage-stats ${RAY_START_ARGS:-}

cat <<MSG

Ray head is up on 127.0.0.1 (token auth on). In any shell:

  export RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:${RAY_DASHBOARD_PORT}
  .venv/bin/ray job submit --working-dir . -- python -m jobs.audit --config audit.toml
  .venv/bin/ray job submit --working-dir . -- python -m jobs.demo --output /tmp/odin-demo

(The token is read from ~/.ray/auth_token, or set RAY_AUTH_TOKEN. The dashboard at
http://127.0.0.1:${RAY_DASHBOARD_PORT} asks for it too.)  Stop: deploy/dev-ray-head.sh --stop
MSG
