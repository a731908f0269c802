#!/bin/sh
# Entry point of docker-compose.yml's `flwr` service: Flower's CLI with one SuperLink connection,
# `federation`: the Control API at $FEDTL_CONTROL (the SuperLink's loopback), over TLS verified
# against the federation's CA (a secret).
#   docker-compose run --rm flwr supernode register /keys/supernode-site-1.pub federation
#   docker-compose run --rm flwr run /opt/fedtl federation --run-config "..."
set -eu
mkdir -p "$FLWR_HOME"
cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "federation"

[superlink.federation]
address = "${FEDTL_CONTROL:?set FEDTL_CONTROL=HOST:PORT of the SuperLink's Control API}"
root-certificates = "/run/secrets/ca.crt"
EOF
exec flwr "$@"
