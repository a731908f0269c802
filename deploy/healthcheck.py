"""Container health checks of the fedtl images (docker-compose.yml's `healthcheck`); exit 0 when healthy.

healthcheck.py tls HOST:PORT CA_FILE   a TLS handshake that verifies the server against the federation's CA
healthcheck.py tcp HOST:PORT           something accepts connections (a SuperNode's local Runtime API)
healthcheck.py grpc HOST:PORT          a gRPC health service answers SERVING (flower-superexec's)
"""

import socket
import ssl
import sys

TIMEOUT_S = 5.0


def split_address(address: str) -> tuple[str, int]:
    """Return (host, port) of 'HOST:PORT'."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"healthcheck: address {address!r} is not HOST:PORT")
    return host, int(port)


def check_tls(address: str, ca_file: str) -> None:
    """Complete a TLS handshake, verifying the certificate and host name against `ca_file`."""
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as raw:
        with context.wrap_socket(raw, server_hostname=host):
            pass


def check_tcp(address: str) -> None:
    """Open and close a TCP connection."""
    with socket.create_connection(split_address(address), timeout=TIMEOUT_S):
        pass


def check_grpc(address: str) -> None:
    """Ask a plaintext gRPC health service for its status."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise SystemExit(f"healthcheck: {address} reports {reply.status}")


def main(argv: list[str]) -> int:
    """Run the check named by argv[0]."""
    checks = {"tls": (check_tls, 2), "tcp": (check_tcp, 1), "grpc": (check_grpc, 1)}
    if not argv or argv[0] not in checks or len(argv) - 1 != checks[argv[0]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    check, _ = checks[argv[0]]
    try:
        check(*argv[1:])
    except (OSError, ssl.SSLError) as exc:
        print(f"healthcheck {argv[0]} {argv[1]}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # grpc.RpcError and friends: unhealthy, never a crash
        print(f"healthcheck {argv[0]} {argv[1]}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
