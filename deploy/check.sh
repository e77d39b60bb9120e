#!/usr/bin/env bash
# Check the deployment files offline, with whichever tools this machine has:
#   nginx -t                               the site, inside a throwaway nginx.conf
#   systemd-analyze verify                 the unit (ExecStart pointed at an existing gunicorn)
#   systemd-analyze security --offline     the unit's exposure score
#   gunicorn --check-config                gunicorn.conf.py with the unit's command line
# Nothing is installed, started or written outside a temporary directory.
#
#   deploy/check.sh            from a checkout (uses .venv/bin/gunicorn if present)
#   GUNICORN=/path/to/gunicorn GATEWAY_CONFIG=/etc/anthropic-gateway/gateway.toml deploy/check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

SITE=deploy/nginx/anthropic-gateway.conf
UNIT=deploy/systemd/anthropic-gateway.service
status=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ok() { printf 'ok    %s\n' "$1"; }
fail() { printf 'FAIL  %s\n' "$1"; status=1; }
skip() { printf 'skip  %s (%s not found)\n' "$1" "$2"; }

# --- nginx -t -----------------------------------------------------------------------------------
nginx_bin=$(command -v nginx || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true)
if [ -n "$nginx_bin" ] && command -v openssl >/dev/null 2>&1; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
    -keyout "$tmp/key.pem" -out "$tmp/cert.pem" >/dev/null 2>&1
  # Placeholder certificate paths -> a throwaway certificate; log -> tmp. Ports stay as shipped:
  # nginx -t does not bind them.
  sed -e "s#/etc/ssl/anthropic-gateway/fullchain.pem#$tmp/cert.pem#" \
      -e "s#/etc/ssl/anthropic-gateway/privkey.pem#$tmp/key.pem#" \
      -e "s#/var/log/nginx/anthropic-gateway.access.log#$tmp/access.log#" \
      "$SITE" >"$tmp/site.conf"
  cat >"$tmp/nginx.conf" <<EOF
pid $tmp/nginx.pid;
error_log $tmp/error.log;
events { worker_connections 64; }
http {
    access_log $tmp/default-access.log;
    client_body_temp_path $tmp/client_body;
    proxy_temp_path $tmp/proxy;
    fastcgi_temp_path $tmp/fastcgi;
    uwsgi_temp_path $tmp/uwsgi;
    scgi_temp_path $tmp/scgi;
    include $tmp/site.conf;
}
EOF
  if "$nginx_bin" -t -q -p "$tmp" -c "$tmp/nginx.conf"; then ok "nginx -t $SITE"; else fail "nginx -t $SITE"; fi
else
  skip "nginx -t" "nginx or openssl"
fi

# --- systemd-analyze ----------------------------------------------------------------------------
gunicorn_bin=${GUNICORN:-}
[ -z "$gunicorn_bin" ] && [ -x .venv/bin/gunicorn ] && gunicorn_bin=$(pwd)/.venv/bin/gunicorn
[ -z "$gunicorn_bin" ] && gunicorn_bin=$(command -v gunicorn || true)

if command -v systemd-analyze >/dev/null 2>&1; then
  # verify checks that ExecStart exists: on a machine without /opt/anthropic-gateway, check a
  # copy whose ExecStart points at a gunicorn that does exist.
  cp "$UNIT" "$tmp/anthropic-gateway.service"
  if [ ! -x /opt/anthropic-gateway/.venv/bin/gunicorn ] && [ -n "$gunicorn_bin" ]; then
    sed -i "s#^ExecStart=/opt/anthropic-gateway/.venv/bin/gunicorn #ExecStart=$gunicorn_bin #" \
      "$tmp/anthropic-gateway.service"
  fi
  if systemd-analyze verify "$tmp/anthropic-gateway.service"; then
    ok "systemd-analyze verify $UNIT"
  else
    fail "systemd-analyze verify $UNIT"
  fi
  if score=$(systemd-analyze security --offline=true --no-pager "$UNIT" 2>&1); then
    printf '%s\n' "$score" | grep -E '^✗' || true
    ok "$(printf '%s\n' "$score" | grep 'Overall exposure level')"
  else
    printf '%s\n' "$score" | tail -3
    fail "systemd-analyze security --offline=true $UNIT (needs systemd >= 250)"
  fi
else
  skip "systemd-analyze verify/security" "systemd-analyze"
fi

# --- gunicorn --check-config --------------------------------------------------------------------
if [ -n "$gunicorn_bin" ]; then
  config=${GATEWAY_CONFIG:-deploy/gateway.example.toml}
  if GATEWAY_CONFIG=$config BACKEND_API_KEY=${BACKEND_API_KEY:-placeholder} \
     "$gunicorn_bin" -c gunicorn.conf.py --worker-tmp-dir "$tmp" --check-config wsgi:app; then
    ok "gunicorn --check-config (GATEWAY_CONFIG=$config)"
  else
    fail "gunicorn --check-config (GATEWAY_CONFIG=$config)"
  fi
else
  skip "gunicorn --check-config" "gunicorn"
fi

exit $status
