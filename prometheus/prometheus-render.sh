#!/bin/sh
# Entrypoint of the prometheus service: renders the config from the template
# (prometheus/prometheus.yml) into --config.file and starts Prometheus with the arguments given.
# Relative rule_files become relative to the template's directory (where the rules are mounted).
# With FUNNEL_REMOTE_WRITE_URL set, a remote_write to that URL is added (a long-term store such as
# Thanos Receive or Grafana Mimir): basic auth with FUNNEL_REMOTE_WRITE_USERNAME and the password
# in the secret file remote_write_password, or a bearer token in remote_write_bearer_token.
# Empty: no remote_write.
# POSIX sh, sed and awk only: the prom/prometheus image has busybox, no Python.
set -eu
template=${PROMETHEUS_TEMPLATE:-/etc/prometheus/prometheus.yml}
secrets=${PROMETHEUS_FILES:-/run/secrets/prometheus}
binary=${PROMETHEUS_BIN:-/bin/prometheus}

say() { echo "prometheus-render: $*" >&2; }
fail() { say "$*"; exit 1; }
rendered=""
for arg in "$@"; do
    case "$arg" in --config.file=*) rendered=${arg#--config.file=} ;; esac
done
[ -n "$rendered" ] || fail "pass --config.file=<where to write the rendered config>"
[ "$rendered" != "$template" ] || fail "--config.file must not be the template $template"

# A value as a YAML double-quoted string.
quoted() {
    case "$1" in *'
'*) fail "$2 must be one line" ;; esac
    printf '"%s"' "$(printf '%s' "$1" | sed -e 's/[\\"]/\\&/g')"
}

url=${FUNNEL_REMOTE_WRITE_URL:-}
user=${FUNNEL_REMOTE_WRITE_USERNAME:-}
if [ -n "$url" ]; then
    case "$url" in
        http://*|https://*) ;;
        *) fail "FUNNEL_REMOTE_WRITE_URL must be an http(s):// URL, got $url" ;;
    esac
    if [ -n "$user" ] && [ ! -s "$secrets/remote_write_password" ]; then
        fail "FUNNEL_REMOTE_WRITE_USERNAME is set: put its password in $secrets/remote_write_password"
    fi
    if [ -n "$user" ] && [ -s "$secrets/remote_write_bearer_token" ]; then
        fail "both basic auth (FUNNEL_REMOTE_WRITE_USERNAME) and $secrets/remote_write_bearer_token: keep one"
    fi
    say "remote_write on: $url"
else
    [ -z "$user" ] || fail "FUNNEL_REMOTE_WRITE_USERNAME needs FUNNEL_REMOTE_WRITE_URL"
    say "remote_write off: FUNNEL_REMOTE_WRITE_URL is empty"
fi

umask 077
dir=$(dirname "$template")
awk -v dir="$dir" '
    /^[^ #]/ { in_rules = ($0 ~ /^rule_files:/) }
    in_rules && /^[ ]*- / && $0 !~ /^[ ]*- *["'\'']?\// { sub(/- */, "- " dir "/") }
    { print }
' "$template" >"$rendered.tmp"
if [ -n "$url" ]; then
    {
        echo
        echo "# rendered by prometheus-render.sh from FUNNEL_REMOTE_WRITE_*"
        echo "remote_write:"
        echo "  - url: $(quoted "$url" FUNNEL_REMOTE_WRITE_URL)"
        if [ -n "$user" ]; then
            echo "    basic_auth:"
            echo "      username: $(quoted "$user" FUNNEL_REMOTE_WRITE_USERNAME)"
            echo "      password_file: $(quoted "$secrets/remote_write_password" password_file)"
        elif [ -s "$secrets/remote_write_bearer_token" ]; then
            echo "    authorization:"
            echo "      credentials_file: $(quoted "$secrets/remote_write_bearer_token" credentials_file)"
        fi
    } >>"$rendered.tmp"
fi
mv "$rendered.tmp" "$rendered"
exec "$binary" "$@"
