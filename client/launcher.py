"""The site's launcher: its SuperNode runs no app process of its own; this fedtl code answers each task.

Flower 1.42's SuperNode with `--isolation process` only queues the messages it receives and serves
them on its Runtime API (HTTP, 127.0.0.1); something else must claim each task (`AcquireTask`) and
run an app for it. Flower's `flower-superexec` starts `flwr-clientapp`, which installs the FAB sent
by whoever started the run and imports its ClientApp, so a replaced app would skip the site's policy,
ledger and DP. This launcher takes that place: for each task it starts a fresh process that pulls the
task's message and FAB, hashes the FAB (never unpacks or imports it), checks the hash against the site's
approvals (client/approval.py), and then either runs the fedtl ClientApp installed at the site or answers
with an error reply; both are written to the site's audit log. Only the launcher holds the Runtime API's
SuperExec secret, so no other local process can claim the site's tasks.

Task processes are forked from one process (`python -I -m fedtl.client.launcher --tasks`, the task
"zygote") that has imported the site's installed ClientApp code, torch, Opacus and Flower once: a task then
starts in milliseconds instead of the seconds those imports take (about 4 s on 2 cores), and still runs in
a process of its own, reading the site's policy afresh. The zygote imports nothing a run sends, opens no
connection, and runs no task itself; without `os.fork` (not POSIX) each task is started as a new process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fedtl.client.approval import (
    FAILED,
    RAN,
    REFUSED,
    apps_dir,
    check_app,
    hash_fab,
    keep_pending,
    record_event,
)
from fedtl.client.policy import SitePolicy, load_policy

log = logging.getLogger(__name__)

TOKEN_ENV = "FEDTL_RUNTIME_TOKEN"  # the task's token reaches its process by environment, not argv (ps shows argv)
POLL_SECONDS = 0.5
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"


def write_runtime_secret(state_dir: Path) -> Path:
    """Write a fresh SuperExec secret (0600) that only the SuperNode and this launcher read."""
    path = apps_dir(state_dir) / "runtime.secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))
    return path


def _die_with_parent() -> None:
    """In a child process: get SIGTERM when the process that started it dies (Linux), so nothing is orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the launcher still stops its children on a normal exit


def run_site(policy: SitePolicy, supernode_command: list[str], runtime_port: int, secret_file: Path) -> int:
    """Start the site's SuperNode and answer its tasks until it exits; return its exit status."""
    address = f"127.0.0.1:{runtime_port}"
    print("exec:", " ".join(supernode_command), flush=True)
    supernode = subprocess.Popen(supernode_command, preexec_fn=_die_with_parent)
    tasks: list[subprocess.Popen] = []
    # Started now, so that its imports are done before the first task arrives.
    zygote = TaskZygote.start(policy, address) if hasattr(os, "fork") else None

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        # Claims give up when the SuperNode is gone (Flower's invoker would otherwise retry for ever), so that
        # the launcher exits with it and a restart policy can start the site again.
        client = _runtime_client(address, secret=secret_file.read_bytes(), give_up=lambda: supernode.poll() is not None)
        log.info("site %s: launcher serving the SuperNode's Runtime API at %s", policy.site_name, address)
        print(f"site {policy.site_name}: runs only approved apps, with the installed fedtl ClientApp", flush=True)
        while supernode.poll() is None:
            tasks = [t for t in tasks if t.poll() is None]
            try:
                token_task = _acquire(client)
            except Exception as exc:  # noqa: BLE001 - the SuperNode may be starting or restarting its Runtime API
                log.warning("site %s: no task claimed from %s: %s", policy.site_name, address, exc)
                token_task = None
            if token_task is not None:
                token, task = token_task
                if zygote is None:
                    tasks.append(_start_task(policy, address, token, task.type))
                elif not zygote.send(token, task.type):
                    log.warning(
                        "site %s: the task zygote exited (%s); starting another",
                        policy.site_name,
                        zygote.process.returncode,
                    )
                    tasks.append(zygote.process)  # stopped with the others at the end
                    zygote = TaskZygote.start(policy, address)
                    if not zygote.send(token, task.type):
                        raise OSError(f"site {policy.site_name}: the task zygote exited at start; see its log above")
            time.sleep(POLL_SECONDS)
        return supernode.returncode
    finally:
        if zygote is not None:
            tasks.append(zygote.process)  # stopping it stops the tasks it forked (they die with their parent)
        for proc in [*tasks, supernode]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*tasks, supernode]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _runtime_client(  # type: ignore[no-untyped-def]
    address: str, *, secret: bytes | None = None, token: str | None = None, give_up: Callable[[], bool] | None = None
):
    """Return a client of the SuperNode's Runtime API (loopback HTTP), signing task claims or carrying a token.

    `give_up`, when given, ends a call's retries as soon as it returns True (e.g. the SuperNode has exited).
    """
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec" if secret else "flwr-clientapp")]
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={_ACQUIRE}))
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    invoker = make_simple_http_retry_invoker()
    if give_up is not None:
        flower_rule = invoker.should_giveup
        invoker.should_giveup = lambda exc: give_up() or bool(flower_rule and flower_rule(exc))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # loopback only: the SuperNode binds its Runtime API to 127.0.0.1
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=invoker,
    )


def _acquire(client):  # type: ignore[no-untyped-def]
    """Claim the oldest pending task of any kind the SuperNode may create; return (token, task) or None."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    # Agent tasks are claimed too, only to be refused: left unclaimed they would never get a reply.
    kinds = [TaskType.CLIENT_APP, TaskType.AGENT_APP]
    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=kinds))
    if res.HasField("task") and res.token:
        return res.token, res.task
    return None


def _start_task(policy: SitePolicy, address: str, token: str, task_type: str) -> subprocess.Popen:
    command = [sys.executable, "-I", "-m", "fedtl.client.launcher", "--runtime-api-address", address]
    command += ["--policy", policy.source, "--task-type", task_type]
    env = {**os.environ, TOKEN_ENV: token}
    return subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)


class TaskZygote:
    """The process the site's tasks are forked from: the installed ClientApp's code imported once.

    The launcher writes one JSON line per claimed task to its stdin (the token never appears in argv or the
    environment); end of input stops it. Started, like a task process used to be, with `python -I` (no
    PYTHONPATH, no user site-packages) and dying with the launcher.
    """

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process

    @classmethod
    def start(cls, policy: SitePolicy, address: str) -> TaskZygote:
        command = [sys.executable, "-I", "-m", "fedtl.client.launcher", "--runtime-api-address", address]
        command += ["--policy", policy.source, "--tasks"]
        return cls(subprocess.Popen(command, stdin=subprocess.PIPE, text=True, preexec_fn=_die_with_parent))

    def send(self, token: str, task_type: str) -> bool:
        """Have the zygote fork a process for one task; False when it has exited (start another, send again)."""
        if self.process.poll() is not None or self.process.stdin is None:
            return False
        try:
            self.process.stdin.write(json.dumps({"token": token, "task-type": task_type}) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return False
        return True


def serve_tasks(policy_path: Path, address: str) -> int:
    """The zygote's loop: import once, then fork one process per task line on stdin until end of input."""
    from flwr.supernode.runtime import run_clientapp  # noqa: F401 - what run_task imports, imported once here

    from fedtl.client import client_app  # noqa: F401 - the site's installed code, never a bundle's

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps finished tasks: no zombies
    for line in sys.stdin:
        request = json.loads(line)
        if os.fork() == 0:  # the task's own process
            rc = 1
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _die_with_parent()
                os.close(0)  # the launcher's pipe is the zygote's, not the task's
                os.open(os.devnull, os.O_RDONLY)
                rc = run_task(load_policy(policy_path), address, request["token"], request["task-type"])
            except BaseException:  # noqa: BLE001 - a task must end here, never return into the zygote's loop
                log.exception("task process failed")
            finally:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
    return 0


def run_task(policy: SitePolicy, address: str, token: str, task_type: str) -> int:
    """Answer one task: the installed fedtl ClientApp for an approved app, an error reply for anything else."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    client = _runtime_client(address, token=token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    sub_status, details, audit = SubStatus.FAILED, "task failed before its input was read", {}
    try:
        message, context, run, fab = pull_task_input(client)
        audit = {
            "run-id": run.run_id,
            "fab-sha256": hash_fab(fab.content),
            "app": f"{run.fab_id}=={run.fab_version}",  # as the run announces it; not read from the bundle
            "task-type": task_type,
            "message-type": message.metadata.message_type,
            "round": message.metadata.group_id,
        }
        decision = check_app(
            policy.state_dir, fab.content, announced_sha256=fab.hash_str, task_type=task_type, site=policy.site_name
        )
        if not decision.approved:
            pending = keep_pending(policy.state_dir, fab.content)
            record_event(policy.state_dir, {"event": REFUSED, **audit, "reason": decision.reason})
            log.warning("%s", decision.reason)
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=decision.reason), reply_to=message)
            details = decision.reason + (f"; kept for review as {pending}" if pending else "")
        else:
            from fedtl.client.client_app import app  # the site's installed code, never the bundle's

            reply = app(message=message, context=context)
            record_event(policy.state_dir, {"event": RAN, **audit, "reply": "error" if reply.has_error() else "ok"})
            sub_status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 - every failure still gets a reply, or the SuperNode waits for one forever
        log.exception("task of run %s failed", audit.get("run-id", "?"))
        details = f"{type(exc).__name__}: {exc}"
        if message is not None:  # the reply first: without one the SuperNode would wait for ever
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        try:
            record_event(policy.state_dir, {"event": FAILED, **audit, "reason": details})
        except OSError:
            log.exception("site %s: the audit log could not be written", policy.site_name)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            heartbeat.stop()
            client.close()
    return 0 if sub_status == SubStatus.COMPLETED else 1


def main(argv: list[str] | None = None) -> int:
    """Entry of the task zygote (--tasks) or of one task process (started by the launcher, never by hand)."""
    parser = argparse.ArgumentParser(description="fedtl: answer SuperNode tasks (started by `fedtl site start`)")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--task-type", help="one task, its token in $" + TOKEN_ENV)
    parser.add_argument("--tasks", action="store_true", help="fork one process per task line read from stdin")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API call otherwise
    if args.tasks:
        return serve_tasks(Path(args.policy), args.runtime_api_address)
    token = os.environ.pop(TOKEN_ENV, "")
    if not token or not args.task_type:
        parser.error(f"one task needs --task-type and its token in ${TOKEN_ENV}; `fedtl site start` starts it")
    return run_task(load_policy(Path(args.policy)), args.runtime_api_address, token, args.task_type)


if __name__ == "__main__":
    sys.exit(main())
