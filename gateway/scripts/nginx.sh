# Sourced by the comparison scripts: a free loopback port, and nginx `return 200` with two
# workers (the reference server) started in a work directory.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# start_nginx DIR [CERT KEY]: writes DIR/nginx.conf, starts nginx (pid in DIR/nginx.pid), sets
# NGINX_PORT. With CERT and KEY (PEM files) it serves HTTPS with them.
start_nginx() {
  NGINX_PORT=$(free_port)
  local listen="listen 127.0.0.1:$NGINX_PORT;"
  if [[ -n "${2:-}" ]]; then
    listen="listen 127.0.0.1:$NGINX_PORT ssl; ssl_certificate $2; ssl_certificate_key $3;"
  fi
  cat > "$1/nginx.conf" <<CONF
worker_processes 2;
pid $1/nginx.pid;
error_log $1/nginx-error.log;
events { worker_connections 4096; }
http { access_log off; server { $listen location / { return 200 'ok'; } } }
CONF
  nginx -c "$1/nginx.conf" -p "$1"
}
