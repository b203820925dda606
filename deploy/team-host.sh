#!/usr/bin/env bash
# One host for a team, without containers: PostgreSQL (Debian's package) holding MLflow's runs, the MLflow
# server on 127.0.0.1:5000 (deploy/rtdlm-mlflow.service) and the nightly sweep (deploy/rtdlm-nightly.*)
# logging to it. Idempotent: rerunning it keeps the database, its password and the results.
#
#   sudo deploy/team-host.sh                 # set up and start everything
#   deploy/team-host.sh --dry-run            # print every step, change nothing (no root needed)
#   sudo deploy/team-host.sh --repo /srv/rtdlm-experiments
#
# Needs: Debian/Ubuntu with systemd, the checkout at --repo (default /opt/rtdlm-experiments).
set -euo pipefail

REPO=/opt/rtdlm-experiments
DRY_RUN=0
STATE=/var/lib/rtdlm
ENV_FILE=/etc/rtdlm/mlflow.env
UNIT_DIR=/etc/systemd/system
DB=mlflow
DB_USER=rtdlm

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --repo) REPO="${2:?--repo needs a folder}"; shift ;;
    -h|--help) usage 0 ;;
    *) echo "error: unknown argument $1" >&2; usage 2 ;;
  esac
  shift
done
DEPLOY="$(cd "$(dirname "$0")" && pwd)"

run() {  # a command, or its line with --dry-run
  if [ "$DRY_RUN" = 1 ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}
have() {  # whether a check passes; with --dry-run nothing exists yet, so the whole plan prints
  [ "$DRY_RUN" = 0 ] && "$@" >/dev/null 2>&1
}
as_postgres() { run runuser -u postgres -- "$@"; }
install_unit() {  # unit file, destination: the checkout's path written into it
  if [ "$DRY_RUN" = 1 ]; then echo "+ install $1 -> $2 (paths under $REPO)"; return; fi
  sed "s#/opt/rtdlm-experiments#$REPO#g" "$1" > "$2.tmp" && chmod 0644 "$2.tmp" && mv "$2.tmp" "$2"
}

if [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
  echo "error: run as root (sudo $0), or see the plan with --dry-run" >&2; exit 2
fi

echo "== PostgreSQL"
if ! have test -x "$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)/postgres"; then
  run apt-get update
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql
fi
run systemctl enable --now postgresql.service

echo "== account and folders"
have id -u "$DB_USER" || run useradd --system --home-dir "$STATE" --shell /usr/sbin/nologin "$DB_USER"
run install -d -o "$DB_USER" -g "$DB_USER" -m 0750 "$STATE" "$STATE/outputs" "$STATE/models" "$STATE/mlartifacts"
run install -d -o root -g root -m 0750 /etc/rtdlm

echo "== checkout at $REPO"
if ! have test -x "$REPO/.venv/bin/python"; then
  run python3 -m venv "$REPO/.venv"
  run "$REPO/.venv/bin/pip" install torch==2.13.0
  run "$REPO/.venv/bin/pip" install -e "$REPO[scale]"  # psycopg, the joblib/submitit launchers
fi

echo "== database $DB owned by $DB_USER (password in $ENV_FILE, mode 0600)"
if have test -s "$ENV_FILE"; then
  PASSWORD="$(sed -n 's#^MLFLOW_BACKEND_STORE_URI=postgresql+psycopg://[^:]*:\([^@]*\)@.*#\1#p' "$ENV_FILE")"
else
  PASSWORD="$([ "$DRY_RUN" = 1 ] && echo '<password>' || (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'))"
fi
role_exists="SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'"
if have sh -c "runuser -u postgres -- psql -tAc \"$role_exists\" | grep -q 1"; then
  as_postgres psql -v ON_ERROR_STOP=1 -qc "ALTER ROLE $DB_USER LOGIN PASSWORD '$PASSWORD'"
else
  as_postgres psql -v ON_ERROR_STOP=1 -qc "CREATE ROLE $DB_USER LOGIN PASSWORD '$PASSWORD'"
fi
have sh -c "runuser -u postgres -- psql -lqtA | cut -d'|' -f1 | grep -qx $DB" \
  || as_postgres createdb --owner "$DB_USER" "$DB"
if [ "$DRY_RUN" = 1 ]; then
  echo "+ write $ENV_FILE (0600): MLFLOW_BACKEND_STORE_URI=postgresql+psycopg://$DB_USER:<password>@127.0.0.1:5432/$DB"
else
  (umask 077; printf 'MLFLOW_BACKEND_STORE_URI=postgresql+psycopg://%s:%s@127.0.0.1:5432/%s\n' \
    "$DB_USER" "$PASSWORD" "$DB" > "$ENV_FILE")
fi

echo "== systemd units"
install_unit "$DEPLOY/rtdlm-mlflow.service" "$UNIT_DIR/rtdlm-mlflow.service"
install_unit "$DEPLOY/rtdlm-nightly.service" "$UNIT_DIR/rtdlm-nightly.service"
install_unit "$DEPLOY/rtdlm-nightly.timer" "$UNIT_DIR/rtdlm-nightly.timer"
run install -d -m 0755 "$UNIT_DIR/rtdlm-nightly.service.d"
install_unit "$DEPLOY/rtdlm-nightly.service.d/team.conf" "$UNIT_DIR/rtdlm-nightly.service.d/team.conf"
run systemctl daemon-reload
run systemctl enable --now rtdlm-mlflow.service rtdlm-nightly.timer

echo "== check"
if [ "$DRY_RUN" = 1 ]; then
  echo "+ wait for http://127.0.0.1:5000/health (up to 120 s)"
else
  health='import urllib.request as u; u.urlopen("http://127.0.0.1:5000/health", timeout=2)'
  up=0
  for _ in $(seq 60); do
    if python3 -c "$health" 2>/dev/null; then up=1; break; fi
    sleep 2
  done
  if [ "$up" = 0 ]; then
    echo "error: the MLflow server did not answer in 120 s: journalctl -u rtdlm-mlflow" >&2; exit 1
  fi
  echo "MLflow server up: http://127.0.0.1:5000 (store: PostgreSQL database $DB)"
fi
run systemctl list-timers rtdlm-nightly.timer --no-pager
echo "Workers log with: MLFLOW_TRACKING_URI=http://<this host>:5000 python -m rtdlm_experiments ..."
