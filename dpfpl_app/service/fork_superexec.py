"""``dpfpl-superexec``: Flower's SuperExec, with ClientApp processes forked from a warm one.

Flower starts a fresh ``flwr-clientapp`` process for every message a SuperNode receives,
and that process spends about 2 CPU-seconds importing Flower before it asks for its
message (``docs/flower-limits.md``): most of a deployment round's CPU on a small node.
This command is ``flower-superexec`` (Flower's own argument parser, task loop, TLS,
authentication and health server) with one part swapped: for ClientApp tasks, the
executor hands the task to a *zygote*, a process that imported Flower's ClientApp
runtime once and forks a child per task. The child runs Flower's own ``run_clientapp``
with the task's token, exactly what ``flwr-clientapp --token`` runs; it just starts with
the imports done. Every other task type (a ServerApp, on a SuperLink's SuperExec) is
started as Flower starts it.

What a forked child shares with a fresh process, and why that is safe:

* The zygote never connects anywhere, starts no thread and runs no app code, so a child
  inherits no socket, lock or secret, only imported modules (checked before each fork).
* The child forgets this package's own modules before loading the app, so the ClientApp
  imports ``dpfpl_app`` from the FAB the SuperLink sent, as a fresh process would, not
  the copy installed beside this command.
* The token goes to the zygote over a pipe, not on a command line other users can read
  (``flwr-clientapp --token`` has it in ``ps``).
* Each child still watches the SuperExec (``--parent-pid``) and exits when it goes; the
  zygote exits when the SuperExec's end of the pipe closes, including on SIGKILL.

The SuperNode runs with ``--isolation process`` and this command beside it
(``docs/deployment.md``); ``flower-superexec`` remains a drop-in alternative.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import traceback
from dataclasses import asdict
from logging import INFO
from typing import IO, Any, NoReturn

from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

OWN_PACKAGE = "dpfpl_app"
ZYGOTE_FLAG = "--zygote"


class ForkingExecutor(SubprocessExecutor):
    """Flower's subprocess executor, except that ClientApp tasks are forked by the zygote."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._zygote = _start_zygote()  # now, so its imports overlap the wait for a message

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type is not TaskType.CLIENT_APP:
            return super().launch(spec)
        line = json.dumps(asdict(spec)).encode() + b"\n"
        with self._lock:
            for attempt in range(2):  # a zygote that died is replaced once per task
                zygote = self._zygote
                if zygote.poll() is None:
                    try:
                        zygote.stdin.write(line)  # type: ignore[union-attr]  # stdin=PIPE
                        zygote.stdin.flush()  # type: ignore[union-attr]
                        return LaunchResult.accepted()
                    except BrokenPipeError:
                        pass
                if attempt == 0:
                    self._zygote = _start_zygote()
        return LaunchResult.failed(
            "the ClientApp zygote exited and so did its replacement: see this SuperExec's "
            "log for their traceback"
        )

    def close(self) -> None:
        """End the zygote; ClientApps it forked finish on their own (each watches the SuperExec).

        A zygote reads the closed pipe once its imports are done; one still importing
        after 10 s holds nothing yet (no task, no child), so it is killed.
        """
        zygote = self._zygote
        try:
            zygote.stdin.close()  # type: ignore[union-attr]  # stdin=PIPE
        except BrokenPipeError:
            pass
        try:
            zygote.wait(timeout=10)
        except subprocess.TimeoutExpired:
            zygote.kill()
            zygote.wait()


def _start_zygote() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        # -P: the working directory must not shadow Flower or the app, as it cannot in
        # the flwr-clientapp script
        [sys.executable, "-P", "-m", __name__, ZYGOTE_FLAG], stdin=subprocess.PIPE
    )


def _forking_executor(
    executor_type: ExecutorType, executor_config: Any = None, **_: Any
) -> ForkingExecutor:
    """Stands in for Flower's executor factory: only the local executor forks."""
    if executor_type != ExecutorType.SUBPROCESS or executor_config is not None:
        raise ValueError(
            f"dpfpl-superexec forks ClientApps on this host: --executor {executor_type} "
            "(or --executor-config) is for Flower's own flower-superexec"
        )
    return ForkingExecutor()


def main() -> None:
    """``dpfpl-superexec``: ``flower-superexec``'s command line and loop, forking ClientApps."""
    if sys.argv[1:2] == [ZYGOTE_FLAG]:
        _zygote(sys.stdin.buffer)
    import flwr.supercore.superexec.run_superexec as task_loop
    from flwr.supercore.cli.flower_superexec import flower_superexec

    if not hasattr(task_loop, "get_executor"):
        raise SystemExit(
            "dpfpl-superexec: this Flower has no executor factory to extend (written for "
            "flwr 1.42, see requirements.lock); run flower-superexec instead"
        )
    task_loop.get_executor = _forking_executor  # the one part that differs from Flower's
    flower_superexec()


def _zygote(tasks: IO[bytes]) -> NoReturn:
    """Import Flower's ClientApp runtime once, then fork a child per task line until EOF."""
    from flwr.supercore import log
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps finished children
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the SuperExec, which closes us
    for line in iter(tasks.readline, b""):
        spec = json.loads(line)
        if threading.active_count() != 1:  # a fork would copy another thread's locks
            raise RuntimeError("the ClientApp zygote must not start threads before it forks")
        pid = os.fork()
        if pid == 0:
            _child(spec, run_clientapp, validate_and_resolve_root_certificates)
        log(INFO, "forked the ClientApp of task %d as pid %d", spec["task_id"], pid)
    os._exit(0)


def _child(spec: dict[str, Any], run_clientapp: Any, resolve_certificates: Any) -> NoReturn:
    """Become what ``flwr-clientapp --token`` would be for this task, then exit."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        if spec["suppress_output"]:
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        for name in [n for n in sys.modules if n.split(".", 1)[0] == OWN_PACKAGE]:
            del sys.modules[name]
        run_clientapp(
            runtime_api_address=spec["runtime_api_address"],
            token=spec["token"],
            insecure=spec["insecure"],
            certificates=resolve_certificates(spec["root_certificates_path"], spec["insecure"]),
            parent_pid=spec["parent_pid"],
            runtime_dependency_install=spec["runtime_dependency_install"],
        )
        code = 0
    except SystemExit as done:  # run_clientapp ends with flwr_exit
        code = done.code if isinstance(done.code, int) else 1
    except BaseException:  # noqa: BLE001 - a child must never return into the zygote's loop
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
