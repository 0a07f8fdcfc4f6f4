#!/bin/sh
# Render docker/nginx.conf.template with the container's environment and start nginx in the
# foreground. Only the listed variables are replaced: nginx's own $variables stay as they are.
set -eu
: "${NGINX_RUNTIME_DIR:=/run/nginx-heatmaps}"
: "${NGINX_ACCESS_LOG:=/dev/stdout}"
: "${LISTEN_ADDRESS:=0.0.0.0:8080}"
: "${API_UPSTREAM:=api:8000}"
: "${NGINX_MAX_BODY_MB:=513}"
export NGINX_RUNTIME_DIR NGINX_ACCESS_LOG LISTEN_ADDRESS API_UPSTREAM NGINX_MAX_BODY_MB
mkdir -p "$NGINX_RUNTIME_DIR"
envsubst '${NGINX_RUNTIME_DIR} ${NGINX_ACCESS_LOG} ${LISTEN_ADDRESS} ${API_UPSTREAM} ${NGINX_MAX_BODY_MB}' \
    < /etc/nginx/heatmaps.conf.template > "$NGINX_RUNTIME_DIR/nginx.conf"
nginx -t -c "$NGINX_RUNTIME_DIR/nginx.conf"
exec nginx -c "$NGINX_RUNTIME_DIR/nginx.conf"
