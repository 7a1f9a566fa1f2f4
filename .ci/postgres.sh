#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tuner's shared-storage tests.
#
#   eval "$(.ci/postgres.sh start)"   # installs the server if missing, starts it, exports
#                                     # ATTNOPT_TEST_POSTGRES_URL
#   .ci/postgres.sh stop              # stops it and deletes the cluster
#
# The cluster lives in $ATTNOPT_PG_DIR (default: $TMPDIR/attnopt-pg), listens on 127.0.0.1
# only, on $ATTNOPT_PG_PORT (default: a free port), with trust authentication; nothing in it
# outlives `stop`. PostgreSQL refuses to run as root, so as root it runs as the `postgres` user.
# Only the export line goes to stdout; progress goes to stderr.
set -euo pipefail

DIR="${ATTNOPT_PG_DIR:-${TMPDIR:-/tmp}/attnopt-pg}"
DB=attnopt_test
USER_NAME=attnopt

log() { echo "postgres.sh: $*" >&2; }

bindir() {
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -z "$found" && -x "$(command -v pg_config 2>/dev/null)" ]]; then
        found=$(pg_config --bindir)
    fi
    [[ -n "$found" && -x "$found/initdb" ]] && echo "$found"
}

install_server() {
    log "PostgreSQL server not found; installing it with apt"
    local sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >&2
}

as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

url() { echo "postgresql://$USER_NAME@127.0.0.1:$(cat "$DIR/port")/$DB"; }

start() {
    local bin port
    bin=$(bindir) || true
    if [[ -z "$bin" ]]; then
        install_server
        bin=$(bindir) || { log "apt installed postgresql but no initdb was found"; exit 1; }
    fi
    if [[ -f "$DIR/port" ]] && as_owner "$bin/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
        log "already running"
        echo "export ATTNOPT_TEST_POSTGRES_URL=$(url)"
        return
    fi
    rm -rf "$DIR"
    mkdir -p "$DIR"
    [[ $(id -u) -eq 0 ]] && chown postgres: "$DIR"
    port="${ATTNOPT_PG_PORT:-$(free_port)}"
    echo "$port" >"$DIR/port"
    as_owner "$bin/initdb" -D "$DIR/data" -U "$USER_NAME" -A trust --no-sync >"$DIR/initdb.log" 2>&1 \
        || { cat "$DIR/initdb.log" >&2; exit 1; }
    as_owner "$bin/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $DIR -c fsync=off -c max_connections=100" \
        start >&2 || { cat "$DIR/server.log" >&2; exit 1; }
    as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U "$USER_NAME" "$DB"
    log "running on 127.0.0.1:$port (data in $DIR)"
    echo "export ATTNOPT_TEST_POSTGRES_URL=$(url)"
}

stop() {
    local bin
    bin=$(bindir) || true
    if [[ -n "$bin" && -d "$DIR/data" ]]; then
        as_owner "$bin/pg_ctl" -D "$DIR/data" -m fast -w stop >&2 || true
    fi
    rm -rf "$DIR"
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
