"""The `fedtl` command line: one entry point for the lab, a site's operator and the federation's operator.

Commands by who runs them: `simulate`, `sweep`, `rank-backbones`, `audit` (cli/lab.py); `site ...`
(cli/site.py); `certs`, `server start` (cli/server.py); `predict` (anyone holding a model file).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import sys
import threading
import traceback

from fedtl.cli import (
    EXIT_BAD_INPUT,
    EXIT_BUG,
    EXIT_ENVIRONMENT,
    EXIT_FEDERATION_FAILED,
    EXIT_INTERRUPTED,
)
from fedtl.cli.lab import add_lab_commands, run_audit_command, run_rank_command, run_simulate_command, run_sweep_command
from fedtl.cli.server import add_deployment_commands, run_certs_command, run_server_command
from fedtl.cli.site import add_site_commands, run_site_command
from fedtl.shared.errors import FederationError, FedtlError, StorageError

log = logging.getLogger("fedtl")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every `fedtl` subcommand."""
    parser = argparse.ArgumentParser(prog="fedtl", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log Flower's and fedtl's INFO messages")
    sub = parser.add_subparsers(dest="command", required=True)
    add_lab_commands(sub)
    add_site_commands(sub)
    add_deployment_commands(sub)
    pred = sub.add_parser("predict", help="label images, texts or table rows with an adapted model file")
    pred.add_argument("model", help="model.safetensors written by a run")
    pred.add_argument(
        "images",
        nargs="+",
        help="image files or folders of them; texts or .csv/.jsonl files of texts; .csv/.parquet rows",
    )
    pred.add_argument(
        "--backbone-weights", help="backbone weights file (e.g. from a site cache) instead of the registry"
    )
    pred.add_argument("--device", default="auto")
    return parser


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler that writes to whatever `sys.stderr` is when a line comes (a caller may swap it)."""

    @property  # type: ignore[override]
    def stream(self):  # type: ignore[no-untyped-def]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # type: ignore[no-untyped-def]
        pass


def show_progress(logger: logging.Logger) -> None:
    """Print the run's progress lines (one per round) on stderr as they come, whatever the log level."""
    if not any(getattr(h, "fedtl_progress", False) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.fedtl_progress = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run_predict_command(args: argparse.Namespace) -> int:
    """Print label and probability per image (`fedtl predict`)."""
    from fedtl.server.predict import predict_inputs

    for p in predict_inputs(args.model, args.images, weights_file=args.backbone_weights, device=args.device):
        print(f"{p.path}\t{p.label}\t{p.probability:.4f}")
    return 0


COMMANDS = {
    "simulate": run_simulate_command,
    "sweep": run_sweep_command,
    "rank-backbones": run_rank_command,
    "audit": run_audit_command,
    "site": run_site_command,
    "certs": run_certs_command,
    "server": run_server_command,
    "predict": run_predict_command,
}


def main(argv: list[str] | None = None) -> int:
    """Run the `fedtl` command line and return its exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        if args.verbose
        else "fedtl: %(levelname)s: %(message)s",
        force=True,  # Flower, imported first, may have put a handler of its own on the root logger
    )
    # Flower logs every round through its own console handler; keep the terminal for fedtl's progress lines
    # and the final table unless --verbose.
    os.environ.setdefault("FLWR_LOG_LEVEL", "INFO" if args.verbose else "WARNING")  # for processes started later
    flwr_logger = logging.getLogger("flwr")  # already imported (and configured from the environment) by now
    flwr_logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
    flwr_logger.propagate = False  # its handler prints already; no second copy via root
    show_progress(logging.getLogger("fedtl.progress"))
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("fedtl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one line for the user; the traceback with -v
        code, what = exit_code(exc)
        if args.verbose:
            traceback.print_exc()
        hint = "" if args.verbose or code != EXIT_BUG else " (run with -v for the traceback)"
        print(f"fedtl: {what}: {exc}{hint}", file=sys.stderr)
        return code


def exit_code(exc: BaseException) -> tuple[int, str]:
    """Return the exit code and the word that introduces `exc`'s message."""
    if isinstance(exc, FederationError):
        return EXIT_FEDERATION_FAILED, "the federation stopped"
    if isinstance(exc, StorageError):
        return EXIT_ENVIRONMENT, "storage"
    if isinstance(exc, OSError):
        return EXIT_ENVIRONMENT, "system error"
    if isinstance(exc, FedtlError):
        return EXIT_BAD_INPUT, "error"
    return EXIT_BUG, f"internal error ({type(exc).__name__})"


def entry() -> None:
    """Run the `fedtl` command and exit with its status.

    An interrupted run on Flower's engine (a second Ctrl-C: "stops at once") leaves Flower's threads waiting for replies
    that will not come, and Python would wait for them before exiting: the process then ends without them. Otherwise,
    once no thread is left to wait for, the exit handlers run and the process ends: Python's own exit would then spend
    about a second more taking torch's, Ray's and Flower's modules apart (0.95 s of a 5.2 s warm default run on 2
    cores), which frees nothing the end of the process does not.
    """
    code = main()
    waiting = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if waiting and code != EXIT_INTERRUPTED:
        sys.exit(code)  # Python joins them first, as it always does
    if not waiting:
        atexit._run_exitfuncs()  # what Python's exit runs (logging's flush, Ray's shutdown, temporary folders...)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be said there anyway
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
