"""Lend this machine's pip settings to an image build: its CA bundle, and its local indexes and wheel
folders served read-only over HTTP on 127.0.0.1 (a build with `--network host` reaches them).

  python3 deploy/host_pip.py OUT_DIR     writes OUT_DIR/pip.conf (and OUT_DIR/pip-cert when pip has a
                                         CA bundle), then serves until SIGTERM; deploy/build-images.sh
                                         passes both files as build secrets and stops it by PID.

Settings come from `pip config list` (files and PIP_* variables). Local folders are served under
/0/, /1/, ... (an index with its parent folder, where its pages link to) and listed before any remote
index, so a wheel found on both comes from local disk.
"""

from __future__ import annotations

import functools
import http.server
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

KEYS = ("index-url", "extra-index-url", "find-links", "cert")


def read_pip_settings() -> dict[str, list[str]]:
    """Return the pip settings of KEYS, environment variables over configuration files."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    from_env: dict[str, list[str]] = {}
    from_files: dict[str, list[str]] = {}
    for line in out.splitlines():
        name, _, value = line.partition("=")
        scope, _, key = name.rpartition(".")
        if key in KEYS:
            target = from_env if scope == ":env:" else from_files
            target[key] = shlex.split(value)[0].split() if value else []
    return {**from_files, **from_env}


def local_folder(location: str) -> Path | None:
    """Return the local folder a file:// URL or a path names, None for a remote URL."""
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else location)
        return path if path.is_dir() else None
    return None


def write_build_settings(out: Path, port: int, settings: dict[str, list[str]]) -> list[Path]:
    """Write out/pip.conf (and out/pip-cert); return the local folders to serve, in /0/, /1/, ... order."""
    served: list[Path] = []

    def translate(location: str, index: bool) -> str | None:
        folder = local_folder(location)
        if folder is None:
            return location if urlparse(location).scheme in ("http", "https") else None
        folder = folder.resolve()
        # An index's pages may link to files beside it (../../files/x.whl): serve its parent.
        served.append(folder.parent if index else folder)
        return f"http://127.0.0.1:{port}/{len(served) - 1}/" + (f"{folder.name}/" if index else "")

    remote = settings.get("index-url", ["https://pypi.org/simple"])
    indexes = [translate(u, index=True) for u in remote + settings.get("extra-index-url", [])]
    local_first = sorted(filter(None, indexes), key=lambda u: not u.startswith("http://127.0.0.1"))
    links = list(filter(None, (translate(u, index=False) for u in settings.get("find-links", []))))
    lines = ["[global]", f"index-url = {local_first[0]}"]
    if local_first[1:]:
        lines.append("extra-index-url = " + " ".join(local_first[1:]))
    if links:
        lines.append("find-links = " + " ".join(links))
    (out / "pip.conf").write_text("\n".join(lines) + "\n")
    if settings.get("cert"):
        shutil.copyfile(settings["cert"][0], out / "pip-cert")
    return served


class FolderHandler(http.server.SimpleHTTPRequestHandler):
    """Serve GET/HEAD under /N/ from the N-th folder only; quiet."""

    def __init__(self, *args, folders: list[Path], **kwargs):
        self.folders = folders
        super().__init__(*args, directory="/nonexistent", **kwargs)

    def translate_path(self, path: str) -> str:
        first, _, rest = path.lstrip("/").partition("/")
        if not first.isdigit() or int(first) >= len(self.folders):
            return "/nonexistent"
        base = self.folders[int(first)]
        target = (base / unquote(rest.split("?", 1)[0].split("#", 1)[0])).resolve()
        return str(target) if target.is_relative_to(base) else "/nonexistent"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass


def main(argv: list[str]) -> int:
    """Write the build's pip settings into argv[0] and serve the local folders they name."""
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    settings = read_pip_settings()
    folders: list[Path] = []
    handler = functools.partial(FolderHandler, folders=folders)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        folders += write_build_settings(out, server.server_address[1], settings)
        (out / "ready").write_text(str(server.server_address[1]))
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
