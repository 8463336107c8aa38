#!/usr/bin/env bash
# A local PostgreSQL for the MLflow tracking server and Optuna studies: Debian's cluster, on 127.0.0.1 only.
#
#   scripts/postgres.sh start   install postgresql if missing, start the cluster (already running: fine),
#                               create the role moa and the databases moa_optuna, moa_mlflow, moa_test
#   scripts/postgres.sh stop    stop the cluster
#   scripts/postgres.sh url     print postgresql+psycopg://moa:<password>@127.0.0.1:<port> (append /<database>)
#
# Runs as root: PostgreSQL refuses to run as root, so the cluster runs as the postgres user through Debian's
# pg_ctlcluster. The port is MOA_PG_PORT (default 5432). The role's password is made once and kept, readable by
# root only, in MOA_PG_PASSWORD_FILE (default ~/.config/moa-autotune/postgres-password).
set -euo pipefail
shopt -s inherit_errexit

PORT=${MOA_PG_PORT:-5432}
PASSWORD_FILE=${MOA_PG_PASSWORD_FILE:-${HOME:-/root}/.config/moa-autotune/postgres-password}
CLUSTER=main
DATABASES=(moa_optuna moa_mlflow moa_test)

die() { echo "postgres.sh: $*" >&2; exit 1; }

newest_version() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin/postgres 2>/dev/null | sort -V | tail -n 1)
    [[ -n $bin ]] && basename "$(dirname "$(dirname "$bin")")"
}

install_if_missing() {
    if command -v pg_ctlcluster >/dev/null && [[ -n $(newest_version) ]]; then
        return
    fi
    command -v apt-get >/dev/null || die "PostgreSQL is not installed and there is no apt-get to install it"
    echo "postgres.sh: installing postgresql from the Debian packages" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # The package's own attempt to start a cluster may be refused in a container (policy-rc.d); we start it below.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 9>&-
}

password() {
    if [[ ! -s $PASSWORD_FILE ]]; then
        mkdir -p "$(dirname "$PASSWORD_FILE")"
        (umask 077 && head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$PASSWORD_FILE")
    fi
    cat "$PASSWORD_FILE"
}

running() { pg_ctlcluster "$1" "$CLUSTER" status >/dev/null 2>&1; }

start() {
    [[ $(id -u) == 0 ]] || die "run as root (the cluster is managed with pg_ctlcluster and runs as postgres)"
    # One start at a time (parallel test sessions). Every command that may start a server runs with fd 9 closed,
    # or the server would inherit the lock and hold it for as long as it runs.
    mkdir -p /run/lock && exec 9>/run/lock/moa-autotune-postgres.lock
    flock -w 300 9 || die "another scripts/postgres.sh start has held /run/lock/moa-autotune-postgres.lock for 5 minutes"
    install_if_missing
    local version changed=0
    version=$(newest_version) || die "no PostgreSQL server binaries under /usr/lib/postgresql"
    if ! pg_lsclusters -h "$version" "$CLUSTER" >/dev/null 2>&1; then
        pg_createcluster "$version" "$CLUSTER" >/dev/null 9>&-
    fi
    # Our settings in the cluster's conf.d (Debian's postgresql.conf includes it), rewritten only when they change.
    local dropin="/etc/postgresql/$version/$CLUSTER/conf.d/moa-autotune.conf"
    local wanted="listen_addresses = '127.0.0.1'"$'\n'"port = $PORT"
    if [[ ! -f $dropin || $(cat "$dropin") != "$wanted" ]]; then
        printf '%s\n' "$wanted" >"$dropin"
        changed=1
    fi
    if ! running "$version"; then
        pg_ctlcluster "$version" "$CLUSTER" start 9>&-
    elif ((changed)); then
        pg_ctlcluster "$version" "$CLUSTER" restart
    fi
    # Role and databases, idempotently; the password goes through stdin, not the command line.
    local pw
    pw=$(password)
    [[ $pw =~ ^[A-Za-z0-9_-]+$ ]] || die "$PASSWORD_FILE: want one password of letters, digits, _ and - (URL-safe)"
    runuser -u postgres -- psql -p "$PORT" -d postgres -qAtX -v ON_ERROR_STOP=1 >/dev/null <<SQL
\set pw '$pw'
SELECT 'CREATE ROLE moa' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'moa') \gexec
ALTER ROLE moa LOGIN CREATEDB PASSWORD :'pw';
SELECT format('CREATE DATABASE %I OWNER moa', name) FROM unnest(ARRAY['${DATABASES[0]}', '${DATABASES[1]}', '${DATABASES[2]}']) AS name
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = name) \gexec
SQL
    echo "postgres.sh: PostgreSQL $version/$CLUSTER on 127.0.0.1:$PORT, databases ${DATABASES[*]} owned by moa" >&2
}

stop() {
    local version
    version=$(newest_version) || return 0
    if running "$version"; then
        pg_ctlcluster "$version" "$CLUSTER" stop -m fast
    fi
}

url() {
    [[ -s $PASSWORD_FILE ]] || die "no password in $PASSWORD_FILE: run scripts/postgres.sh start first"
    echo "postgresql+psycopg://moa:$(cat "$PASSWORD_FILE")@127.0.0.1:$PORT"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    url) url ;;
    *) die "usage: scripts/postgres.sh start|stop|url" ;;
esac
