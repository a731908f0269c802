"""The federation server as `fedtl server start` runs it: SuperLink on loopback, a Fleet-only front outside.

Flower 1.42's SuperLink serves its Fleet API (what SuperNodes dial), its Control API (`flwr run`,
`flwr ls`, `flwr supernode register`, ...) and its Runtime API (the ServerApp executor) on one HTTPS
port, and the open-source Control API has no authentication: whoever reaches that port with the
federation's public `ca.crt` can list the sites and start runs. So the SuperLink itself listens on
127.0.0.1 only, and the public address is served by this front: it terminates TLS with the
SuperLink's certificate and forwards only `POST` requests to the Fleet routes (the list is read from
Flower's own Fleet router), with their SuperNode signature headers, to the SuperLink; any other path
gets 404. The operator's `flwr` talks to the loopback address (README: "Deploying a federation").
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from fedtl.shared.errors import FedtlError
from fedtl.shared.files import installed_script

log = logging.getLogger(__name__)

CERT_FILES = {"--ssl-ca-certfile": "ca.crt", "--ssl-certfile": "server.pem", "--ssl-keyfile": "server.key"}
# Hop-by-hop headers (RFC 9110, 7.6.1) and the ones the HTTP client recomputes are not forwarded.
_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host",
     "content-length", "content-encoding"}
)  # fmt: skip
REFUSAL = (
    "fedtl: this address serves only the Fleet API (what SuperNodes dial); the Control API listens on the "
    "SuperLink's loopback address, for the operator on the server machine\n"
)


@dataclass(frozen=True)
class ServerAddresses:
    """Where `fedtl server start` listens: the public Fleet front and the SuperLink on loopback."""

    fleet_host: str
    fleet_port: int
    control_port: int
    control_host: str = "127.0.0.1"


def fleet_paths() -> frozenset[str]:
    """Return the paths of Flower's Fleet API routes (the only ones the front forwards)."""
    from flwr.superlink.routers.fleet.router import router

    return frozenset(route.path for route in router.routes)


def check_certs(certs: Path) -> Path:
    """Return the resolved certificates folder; fail naming the missing files and the fix."""
    certs = Path(certs).expanduser().resolve()
    missing = [name for name in CERT_FILES.values() if not (certs / name).is_file()]
    if missing:
        raise FedtlError(f"{certs} lacks {', '.join(missing)}; write them with `fedtl certs --out {certs}`")
    return certs


def superlink_command(certs: Path, addresses: ServerAddresses, extra: list[str] | None = None) -> list[str]:
    """Return the `flower-superlink` command: TLS, SuperNode authentication, every API on loopback only."""
    certs = check_certs(certs)
    command = [installed_script("flower-superlink")]
    for flag, name in CERT_FILES.items():
        command += [flag, str(certs / name)]
    command += ["--enable-supernode-auth", "--host", addresses.control_host, "--port", str(addresses.control_port)]
    return command + list(extra or [])


def create_fleet_front(upstream: str, ca_cert: Path, paths: frozenset[str] | None = None):  # type: ignore[no-untyped-def]
    """Return the ASGI app that forwards Fleet requests to `upstream` (https, verified with `ca_cert`)."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    allowed = fleet_paths() if paths is None else paths
    client = httpx.AsyncClient(base_url=upstream, verify=ssl.create_default_context(cafile=str(ca_cert)), timeout=None)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or path not in allowed:
            log.warning("fleet front: refused %s %s from %s", request.method, path, request.client)
            return PlainTextResponse(REFUSAL, status_code=404)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS]
        answer = await client.post(path, content=await request.body(), headers=headers)
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS}
        return Response(answer.content, status_code=answer.status_code, headers=kept)

    routes = [Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])]

    @contextlib.asynccontextmanager
    async def lifespan(_app):  # type: ignore[no-untyped-def]
        yield
        await client.aclose()

    return Starlette(routes=routes, lifespan=lifespan)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def run_server(certs: Path, addresses: ServerAddresses, extra: list[str] | None = None) -> int:
    """Run the SuperLink on loopback and the Fleet front on the public address until either stops."""
    import uvicorn

    certs = check_certs(certs)
    command = superlink_command(certs, addresses, extra)
    print("exec:", " ".join(command), flush=True)
    # The SuperLink starts flower-superexec by name: give it this environment's, as `installed_script` found its own.
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(command[0]).parent), os.environ.get("PATH", "")])}
    superlink = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)
    try:
        app = create_fleet_front(f"https://{addresses.control_host}:{addresses.control_port}", certs / "ca.crt")
        config = uvicorn.Config(
            app,
            host=addresses.fleet_host,
            port=addresses.fleet_port,
            ssl_certfile=str(certs / "server.pem"),
            ssl_keyfile=str(certs / "server.key"),
            log_level="warning",
            access_log=False,
        )
        server = uvicorn.Server(config)

        def watch() -> None:  # the front goes down with the SuperLink
            superlink.wait()
            server.should_exit = True

        threading.Thread(target=watch, daemon=True).start()
        print(
            f"Fleet API (for sites) on {addresses.fleet_host}:{addresses.fleet_port}; Control API (for the "
            f"operator's flwr) on {addresses.control_host}:{addresses.control_port} only",
            flush=True,
        )
        server.run()
        return superlink.returncode if superlink.poll() is not None else 0
    finally:
        if superlink.poll() is None:
            superlink.terminate()
            try:
                superlink.wait(timeout=15)
            except subprocess.TimeoutExpired:
                superlink.kill()
