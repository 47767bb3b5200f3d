#!/bin/sh
# Entrypoint of the alertmanager service: renders the config from the template
# (prometheus/alertmanager.yml) and starts Alertmanager with the arguments given.
# An integration is dropped while what it needs is empty (a secret file in ALERTMANAGER_FILES,
# or a .env value); a line ending in "# from VAR" gets VAR's value, one ending in
# "# from secret NAME" the first line of the secret file NAME (for a setting Alertmanager 0.25
# reads from no file: the webhook URL). POSIX sh and sed only: the prom/alertmanager image has
# busybox, no Python.
set -eu
template=${ALERTMANAGER_TEMPLATE:-/etc/alertmanager/alertmanager.yml}
secrets=${ALERTMANAGER_FILES:-/run/secrets/alertmanager}
binary=${ALERTMANAGER_BIN:-/bin/alertmanager}
script=""

say() { echo "alertmanager-render: $*" >&2; }
fail() { say "$*"; exit 1; }
rendered=""
for arg in "$@"; do
    case "$arg" in --config.file=*) rendered=${arg#--config.file=} ;; esac
done
[ -n "$rendered" ] || fail "pass --config.file=<where to write the rendered config>"
drop() { script="$script/# begin $1\$/,/# end $1\$/d;"; }
integration() { # name, on (0/1), why it is off
    if [ "$2" = 1 ]; then say "$1 on"; else drop "$1"; say "$1 off: $3"; fi
}
has_file() { if [ -s "$secrets/$1" ]; then echo 1; else echo 0; fi; }
has_value() { if [ -n "$1" ]; then echo 1; else echo 0; fi; }

integration pagerduty "$(has_file pagerduty_routing_key)" "no $secrets/pagerduty_routing_key"
integration slack "$(has_file slack_api_url)" "no $secrets/slack_api_url"
integration email "$(has_value "${ALERTMANAGER_EMAIL_TO:-}")" "ALERTMANAGER_EMAIL_TO is empty"
integration webhook "$(has_file webhook_url)" "no $secrets/webhook_url"
integration sales_slack "$(has_file sales_slack_api_url)" "no $secrets/sales_slack_api_url"
integration sales_email "$(has_value "${ALERTMANAGER_SALES_EMAIL_TO:-}")" \
    "ALERTMANAGER_SALES_EMAIL_TO is empty"
[ -s "$secrets/smtp_password" ] || { drop email_auth; drop sales_email_auth; }
[ -s "$secrets/webhook_bearer_token" ] || drop webhook_auth
# Both e-mail receivers (on-call, sales) send through the same server and sender.
if [ -n "${ALERTMANAGER_EMAIL_TO:-}${ALERTMANAGER_SALES_EMAIL_TO:-}" ]; then
    [ -n "${ALERTMANAGER_EMAIL_FROM:-}" ] || fail "e-mail needs ALERTMANAGER_EMAIL_FROM"
    case "${ALERTMANAGER_SMTP_SMARTHOST:-}" in
        *:*) ;;
        *) fail "e-mail needs ALERTMANAGER_SMTP_SMARTHOST as host:port" ;;
    esac
    if [ -s "$secrets/smtp_password" ] && [ -z "${ALERTMANAGER_SMTP_USERNAME:-}" ]; then
        fail "$secrets/smtp_password is set: e-mail needs ALERTMANAGER_SMTP_USERNAME"
    fi
fi

# "# from <source>" lines: the value as a YAML double-quoted string, escaped for sed.
put() { # source (as the template names it), value
    case "$2" in *'
'*) fail "$1 must be one line" ;; esac
    quoted=$(printf '%s' "$2" | sed -e 's/[\\"]/\\&/g' -e 's/[\\&|]/\\&/g')
    script="$script s|^\\([ -]*[a-z_]*: \\).*# from $1\$|\\1\"$quoted\"|;"
}
for var in ALERTMANAGER_SLACK_CHANNEL ALERTMANAGER_EMAIL_TO ALERTMANAGER_EMAIL_FROM \
    ALERTMANAGER_SMTP_SMARTHOST ALERTMANAGER_SMTP_USERNAME \
    ALERTMANAGER_SALES_SLACK_CHANNEL ALERTMANAGER_SALES_EMAIL_TO; do
    eval "value=\${$var:-}"
    put "$var" "$value"
done
if [ -s "$secrets/webhook_url" ]; then
    put "secret webhook_url" "$(head -n 1 "$secrets/webhook_url" | tr -d '\r')"
fi
script="$script s|/run/secrets/alertmanager/|$secrets/|g;"

umask 077 # the rendered file may hold the webhook URL: readable by Alertmanager's user only
sed -e "$script" "$template" >"$rendered.tmp"
mv "$rendered.tmp" "$rendered"
exec "$binary" "$@"
