#!/bin/sh
# Runs the example page (README.md): jobd with this directory's configuration, its HTTP listener on loopback, and
# php -S serving public/. A fresh token is made for each run; everything lives in a temporary directory, removed
# when this script stops (Ctrl-C).
#
#   examples/web/run.sh            then open http://127.0.0.1:8000/
#   PORT=8001 JOBD_HTTP_PORT=8081 JOBD=/usr/bin/jobd examples/web/run.sh
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
jobd=${JOBD:-$repo/.venv/bin/jobd}
[ -x "$jobd" ] || jobd=$(command -v jobd) || { echo "run.sh: no jobd (make run once, or set JOBD)" >&2; exit 1; }
port=${PORT:-8000}
jobd_port=${JOBD_HTTP_PORT:-8080}

run=$(mktemp -d "${TMPDIR:-/tmp}/jobd-web.XXXXXX")
jobd_pid= php_pid=
cleanup() {
    [ -z "$php_pid" ] || kill -- "-$php_pid" 2>/dev/null || true   # its workers too: they are its process group
    [ -z "$jobd_pid" ] || kill "$jobd_pid" 2>/dev/null || true
    wait
    rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

umask 077
mkdir -p "$run/etc/jobd.d" "$run/sessions"
cp "$here"/jobd/jobd.d/*.toml "$run/etc/jobd.d/"
cp -R "$here/jobd/workflows" "$run/etc/"
token=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
cat > "$run/etc/jobd.toml" <<TOML
[daemon]
socket = "$run/jobd.sock"
evqueue_socket = false
state_dir = "$run/state"
TOML
cat > "$run/etc/jobd.d/90-this-run.toml" <<TOML
[http]
listen = "127.0.0.1:$jobd_port"

[http.tokens.web-demo]   # the page's token, made for this run; only its SHA-256 is here
token_sha256 = "$(printf %s "$token" | sha256sum | cut -d' ' -f1)"
TOML

"$jobd" --config-dir "$run/etc" &
jobd_pid=$!
# The PHP side connects to jobd when a page asks, so it can start at once. Workers: events.php holds one for as
# long as a page watches an instance.
JOBD_HTTP="tcp://127.0.0.1:$jobd_port" JOBD_TOKEN="$token" PHP_CLI_SERVER_WORKERS=${PHP_CLI_SERVER_WORKERS:-4} \
    setsid php -d session.save_path="$run/sessions" -S "127.0.0.1:$port" -t "$here/public" &
php_pid=$!
echo "run.sh: open http://127.0.0.1:$port/ (jobd's HTTP listener: 127.0.0.1:$jobd_port); Ctrl-C stops both"
wait "$jobd_pid" || true
jobd_pid=
echo "run.sh: jobd has stopped" >&2
