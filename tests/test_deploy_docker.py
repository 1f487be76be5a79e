"""The Docker deployment files, checked statically (no Docker engine runs in CI).

The compose files are parsed with PyYAML and held against what ``scripts/make-certs.sh``
really produces: every secret file exists, each private file is mounted only where it
belongs, TLS and SuperNode auth are on, ports and addresses agree, each organisation has
its own state and data volumes, and every Flower image tag is the Flower of
``requirements.lock`` (what ``scripts/install.sh`` installs).
"""

from __future__ import annotations

import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml
from cryptography import x509
from flwr.common.config import parse_config_args

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
MAKE_CERTS = REPO / "scripts" / "make-certs.sh"

def locked_version(package: str) -> str:
    """The version ``requirements.lock`` pins for ``package``."""
    lock = (REPO / "requirements.lock").read_text().splitlines()
    (pin,) = [line for line in lock if line.lower().startswith(f"{package}==")]
    return pin.split("==", 1)[1]


FLWR_VERSION = locked_version("flwr")
NUM_ORGS = 3
ORG_ENV = {
    "SUPERLINK_ADDRESS": "superlink.example.org:9091",
    "ORG": "supernode-1",
    "PARTITION_ID": "1",
    "NUM_PARTITIONS": "3",
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the users' script produces for a 3-organisation federation."""
    out = tmp_path_factory.mktemp("creds") / "certs"
    subprocess.run(
        ["timeout", "60", "bash", str(MAKE_CERTS), "all", str(out), str(NUM_ORGS)],
        check=True,
        capture_output=True,
    )
    return out


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``, for these files."""

    def value(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name in env:
            return env[name]
        if op == ":-":
            return arg
        raise AssertionError(f"${{{name}}} is required: {arg}")

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", value, text)


def _compose(name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    return yaml.safe_load(_interpolate((DOCKER / name).read_text(), env or {}))


def _flag(service: dict[str, Any], flag: str) -> str:
    command = [str(a) for a in service["command"]]
    assert command.count(flag) == 1, f"{flag} must appear once in {command}"
    return command[command.index(flag) + 1]


def _node_config(service: dict[str, Any]) -> dict[str, str]:
    """The node config as ``flower-supernode`` parses it (a bare word is refused there)."""
    parsed = parse_config_args([_flag(service, "--node-config")])
    return {key: str(value).lower() if isinstance(value, bool) else str(value)
            for key, value in parsed.items()}  # fmt: skip


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Container path -> (host path, mode)."""
    out = {}
    for volume in service.get("volumes", []):
        host, target, *mode = volume.split(":")
        out[target] = (host, mode[0] if mode else "rw")
    return out


def _secret_paths(doc: dict[str, Any], service: dict[str, Any]) -> dict[str, str]:
    """``/run/secrets/<name>`` -> the host file name the secret is read from."""
    return {
        f"/run/secrets/{name}": Path(doc["secrets"][name]["file"]).name
        for name in service.get("secrets", [])
    }


def _check_secrets_exist_and_are_used(doc: dict[str, Any], certs: Path) -> None:
    produced = {p.name for p in certs.iterdir()}
    for name, spec in doc["secrets"].items():
        file = Path(spec["file"])
        assert file.parent == Path("certs"), (name, file)
        assert file.name in produced, f"secret {name} reads {file}, not made by make-certs.sh"
        assert file.name != "ca.key", "the CA key must never be mounted anywhere"
    for service_name, service in doc["services"].items():
        paths = _secret_paths(doc, service)
        for arg in map(str, service.get("command", [])):
            if arg.startswith("/run/secrets/"):
                assert arg in paths, f"{service_name} uses {arg} but does not mount it"


# --- the one-host demo of the whole federation (compose.yml) ------------------------------
def test_compose_runs_superlink_with_tls_node_auth_database_and_official_tags(
    certs: Path,
) -> None:
    doc = _compose("compose.yml")
    link = doc["services"]["superlink"]
    port = _flag(link, "--port")

    assert link["image"] == f"flwr/superlink:{FLWR_VERSION}"
    assert "--insecure" not in link["command"] and "--enable-supernode-auth" in link["command"]
    secrets = _secret_paths(doc, link)
    assert secrets[_flag(link, "--ssl-certfile")] == "superlink.crt"
    assert secrets[_flag(link, "--ssl-keyfile")] == "superlink.key"
    assert secrets[_flag(link, "--ssl-ca-certfile")] == "ca.crt"
    assert link["ports"] == [f"{port}:{port}"], "publish exactly the SuperLink's one port"
    database = Path("/app") / _flag(link, "--database")
    assert str(database.parent) in _mounts(link), "the database must live on a volume"
    _check_secrets_exist_and_are_used(doc, certs)
    # The certificate names the address the containers dial.
    cert = x509.load_pem_x509_certificate((certs / "superlink.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink" in san.get_values_for_type(x509.DNSName)


def test_compose_has_three_organisations_each_with_own_key_state_and_data(certs: Path) -> None:
    doc = _compose("compose.yml")
    services = doc["services"]
    port = _flag(services["superlink"], "--port")
    serverapp = services["superexec-serverapp"]
    assert _flag(serverapp, "--runtime-api-address") == f"superlink:{port}"
    assert _secret_paths(doc, serverapp)[_flag(serverapp, "--root-certificates")] == "ca.crt"

    state_dirs = set()
    for i in range(NUM_ORGS):
        node, app = services[f"supernode-{i}"], services[f"superexec-clientapp-{i}"]
        # Prepare: who this organisation is
        config = _node_config(node)
        secrets = _secret_paths(doc, node)
        # TLS and authentication to the SuperLink
        assert node["image"] == f"flwr/supernode:{FLWR_VERSION}"
        assert "--insecure" not in node["command"]
        assert _flag(node, "--superlink") == f"superlink:{port}"
        assert secrets[_flag(node, "--root-certificates")] == "ca.crt"
        assert secrets[_flag(node, "--auth-supernode-private-key")] == f"supernode-{i}"
        # Partition and state directory; the ClientApp (in the SuperExec) mounts the state
        assert config["partition-id"] == str(i) and config["num-partitions"] == str(NUM_ORGS)
        # the organisation refuses plain rounds, whatever run config is submitted, and
        # signs its secure rounds with its node key (mounted where its ClientApp runs)
        assert config["require-secure-aggregation"] == "true"
        assert config["secagg-require-signed"] == "true"
        app_secrets = _secret_paths(doc, app)
        assert app_secrets[config["secagg-signing-key"]] == f"supernode-{i}"
        assert app_secrets[config["secagg-registry"]] == "registry.pub"
        # messages go to the node's worker, which lives beside the state it writes (in
        # the ClientApp's container: its socket is in the mounted state directory), and
        # that container's SuperExec looks for messages every 0.2 s and its ClientApp
        # processes send no usage event (no 4 s wait at each one's exit)
        assert config["node-worker"] == "true" and "worker-dir" not in config
        assert app["environment"]["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.2"
        assert app["environment"]["FLWR_TELEMETRY_ENABLED"] == "0"
        assert _flag(app, "--runtime-api-address") == f"supernode-{i}:{_flag(node, '--port')}"
        mounts = _mounts(app)
        host_state, mode = mounts[config["state-dir"]]
        assert mode == "rw" and host_state == f"./volumes/supernode-{i}/state"
        assert mounts["/app/data"] == (f"./volumes/supernode-{i}/data", "ro")
        state_dirs.add(host_state)
        # The node's own network, so no other organisation reaches its runtime API
        assert f"org-{i}" in node["networks"] and app["networks"] == [f"org-{i}"]
        assert doc["networks"][f"org-{i}"]["internal"] is True
    assert len(state_dirs) == NUM_ORGS


def test_each_private_file_is_mounted_only_where_it_belongs() -> None:
    doc = _compose("compose.yml")
    owners: dict[str, set[str]] = {}
    for service_name, service in doc["services"].items():
        for secret in service.get("secrets", []):
            owners.setdefault(secret, set()).add(service_name)
    assert owners["superlink.key"] == {"superlink"}
    assert owners["superexec-superlink.secret"] == {"superlink", "superexec-serverapp"}
    for i in range(NUM_ORGS):
        # the node key: the SuperNode authenticates with it, the ClientApp signs with it
        assert owners[f"supernode-{i}"] == {f"supernode-{i}", f"superexec-clientapp-{i}"}
        assert owners[f"superexec-supernode-{i}.secret"] == {
            f"supernode-{i}",
            f"superexec-clientapp-{i}",
        }


def test_gpu_reservation_is_there_but_commented_for_every_clientapp() -> None:
    text = (DOCKER / "compose.yml").read_text()
    blocks = re.split(r"\n  (?=\S)", text)  # one block per top-level service entry
    apps = [b for b in blocks if b.startswith("superexec-clientapp-")]
    assert len(apps) == NUM_ORGS
    for block in apps:
        assert re.search(r"\n\s+# deploy:\n(\s+#.*\n)*\s+#\s+- driver: nvidia", block), block
    assert all("deploy" not in s for s in _compose("compose.yml")["services"].values())


# --- one organisation on its own host (compose.org.yml) ----------------------------------
def test_org_compose_connects_one_organisation_with_its_own_key(certs: Path) -> None:
    doc = _compose("compose.org.yml", ORG_ENV)
    node, app = doc["services"]["supernode"], doc["services"]["superexec-clientapp"]

    assert node["image"] == f"flwr/supernode:{FLWR_VERSION}"
    assert "--insecure" not in node["command"] and "ports" not in node
    assert _flag(node, "--superlink") == ORG_ENV["SUPERLINK_ADDRESS"]
    secrets = _secret_paths(doc, node)
    assert secrets[_flag(node, "--auth-supernode-private-key")] == ORG_ENV["ORG"]
    assert secrets[_flag(node, "--root-certificates")] == "ca.crt"
    config = _node_config(node)
    assert (config["partition-id"], config["num-partitions"]) == ("1", "3")
    assert config["require-secure-aggregation"] == "true" and config["node-worker"] == "true"
    assert config["secagg-require-signed"] == "true"
    assert _secret_paths(doc, app)[config["secagg-signing-key"]] == ORG_ENV["ORG"]
    assert _secret_paths(doc, app)[config["secagg-registry"]] == "registry.pub"
    assert app["environment"]["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.2"
    assert app["environment"]["FLWR_TELEMETRY_ENABLED"] == "0"
    assert _mounts(app)[config["state-dir"]] == (f"./volumes/{ORG_ENV['ORG']}/state", "rw")
    assert doc["networks"]["org"]["internal"] is True and app["networks"] == ["org"]
    _check_secrets_exist_and_are_used(doc, certs)
    with pytest.raises(AssertionError, match="SUPERLINK_ADDRESS"):
        _compose("compose.org.yml", {k: v for k, v in ORG_ENV.items() if k != "SUPERLINK_ADDRESS"})


# --- the app image ----------------------------------------------------------------------
def test_app_image_is_built_from_the_matching_official_superexec_image() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert f"ARG FLWR_VERSION={FLWR_VERSION}\n" in dockerfile
    assert "\nFROM flwr/superexec:${FLWR_VERSION}\n" in dockerfile
    # flower-superexec's options, ClientApps forked (the command the project installs)
    assert 'ENTRYPOINT ["dpfpl-superexec"]' in dockerfile
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["dpfpl-superexec"] == "dpfpl_app.service.fork_superexec:main"
    # bytecode compiled after the last install: every per-message process imports Flower
    instructions = dockerfile.replace("\\\n", " ").splitlines()  # join continued lines
    runs = [line for line in instructions if line.startswith("RUN ")]
    installs = [i for i, line in enumerate(runs) if "pip install" in line]
    compiles = [i for i, line in enumerate(runs) if "compileall" in line and "purelib" in line]
    assert compiles and installs and compiles[-1] > installs[-1]
    for name in ("compose.yml", "compose.org.yml"):
        for service in _compose(name, ORG_ENV)["services"].values():
            if "build" in service:
                assert service["build"]["dockerfile"] == "docker/Dockerfile"
                assert service["build"]["args"]["FLWR_VERSION"] == FLWR_VERSION
    # Credentials and state never enter the build context: ignore all, allow the app.
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "**"
    allowed = {line[1:] for line in rules if line.startswith("!")}
    assert allowed == {
        "pyproject.toml",
        "README.md",
        "client_app.py",
        "server_app.py",
        "dpfpl_app/**",
    }


# --- the credentials script -------------------------------------------------------------
def test_make_certs_writes_private_files_0600_and_never_overwrites(certs: Path) -> None:
    private = ["ca.key", "superlink.key", "superexec-superlink.secret"]
    private += [f"supernode-{i}" for i in range(NUM_ORGS)]
    private += [f"superexec-supernode-{i}.secret" for i in range(NUM_ORGS)]
    for name in private:
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    for name in ["ca.crt", "superlink.crt", *(f"supernode-{i}.pub" for i in range(NUM_ORGS))]:
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o644, name
    # The node keys are what `flwr supernode register` accepts: OpenSSH ECDSA P-384.
    assert (certs / "supernode-0.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    before = (certs / "supernode-0").read_bytes()
    again = subprocess.run(
        ["timeout", "60", "bash", str(MAKE_CERTS), "node", str(certs), "supernode-0"],
        capture_output=True,
        text=True,
    )
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    assert (certs / "supernode-0").read_bytes() == before
