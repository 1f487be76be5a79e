"""``dpfpl-superexec``: ClientApps forked from a warm process, against real Flower processes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_processes import Federation, app_copy, free_port
from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

from dpfpl_app.service.fork_superexec import ForkingExecutor, _forking_executor

PROBE = Path(__file__).parent / "fork_probe_app" / "fork_probe.py"


def test_only_the_local_executor_forks() -> None:
    with pytest.raises(ValueError, match="flower-superexec"):
        _forking_executor(ExecutorType.KUBERNETES, {"namespace": "x"})


def test_a_dead_zygote_is_replaced_and_closing_the_executor_ends_its_zygote() -> None:
    # Prepare: an executor whose zygote has died (e.g. killed by an operator)
    executor = ForkingExecutor()
    first = executor._zygote
    first.kill()
    first.wait()
    gone = subprocess.Popen(["true"])  # a parent that has exited: the child stops at once
    gone.wait()
    task = ExecutionSpec(
        task_type=TaskType.CLIENT_APP,
        runtime_api_address=f"127.0.0.1:{free_port()}",
        token="t" * 32,
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=gone.pid,
        suppress_output=True,
        task_id=1,
    )

    # Execute
    result = executor.launch(task)
    second = executor._zygote
    executor.close()

    # Assert: accepted by a new zygote, which ended when the executor closed
    assert result.status is LaunchResultStatus.ACCEPTED, result
    assert second.pid != first.pid
    assert second.returncode is not None


@pytest.mark.slow
def test_each_clientapp_is_forked_by_the_zygote_and_runs_the_fabs_code(tmp_path: Path) -> None:
    # Prepare: a TLS, node-auth SuperLink and one SuperNode with --isolation process and
    # dpfpl-superexec beside it; the probe app inside a copy of the real app
    fed = Federation(tmp_path, 1)
    (node,) = fed.nodes
    node.forked = True
    app = app_copy(
        tmp_path / "probe-app",
        replacements=(
            ('clientapp = "client_app:app"', 'clientapp = "fork_probe:client"'),
            ('serverapp = "server_app:app"', 'serverapp = "fork_probe:server"'),
            ('name = "dpfpl"', 'name = "dpfpl-fork-probe"'),
        ),
    )
    shutil.copy2(PROBE, app / PROBE.name)
    try:
        fed.make_credentials(extra_keys=[])
        fed.start_superlink()
        fed.register(node)
        fed.start_supernode(node)
        fed.wait_activated([node], 90)

        # Execute: two rounds, one message each
        run_id = fed.submit(app, f"output-dir='{fed.runs}' num-server-rounds=2")
        info = fed.wait_finished(run_id, 300)

        # Assert: both answered, each by a different child of the same zygote, which is
        # a child of the SuperExec; the app imported the FAB's dpfpl_app
        assert info["status"] == "finished:completed", (info, fed.server_log(run_id))
        answers = json.loads((fed.runs / "fork-probe.json").read_text())
        assert len(answers) == 2 and all(answers), answers
        assert node.superexec is not None
        log = node.superexec_log.read_text()
        forked = [int(p) for p in re.findall(r"forked the ClientApp of task \d+ as pid (\d+)", log)]
        assert sorted(a["pid"] for a in answers) == sorted(forked), (answers, log)
        (zygote,) = {a["ppid"] for a in answers}
        assert zygote != node.superexec.pid
        assert f"PPid:\t{node.superexec.pid}\n" in Path(f"/proc/{zygote}/status").read_text()
        flwr_apps = (node.root / "flwr-home").resolve()
        for answer in answers:
            assert Path(answer["dpfpl-app"]).resolve().is_relative_to(flwr_apps), answer
        assert "flwr-clientapp" not in log  # no process was spawned for a message
    finally:
        fed.close()
