"""The Ansible roles, for real: ansible-lint (production profile), then
site.yml against this machine as localhost (connection local) into a
prefix, a second run that changes nothing, and --check --diff.

systemd is not PID 1 here, so the playbook runs with
blockferry_{agent,controller}_systemd=false and this test starts the
installed units' effective ExecStart lines itself (the controller as its
unit's User=); the installed units, drop-ins included, still pass
systemd-analyze verify. Then the agent must answer gRPC health over mutual
TLS with the lab certificates, the controller REST over HTTPS, the agent
must have registered with the controller with its pool, and a checksum
job through the deployed agent must give the reference digest."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from agent import native

from support.agents import REPO
from support.cephcluster import free_port

ANSIBLE = REPO / "ansible"
VENV_BIN = Path(os.sys.prefix) / "bin"
POOL = "0eca2be3-056f-4634-a25b-5cf717e067fb"
BACKUP_POINT = "5b0c3f55-54d5-4b8e-9c2f-0a4f3c1e9d11"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the playbook creates a user and chowns files: root only")


def env() -> dict:
    e = dict(
        os.environ,
        ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        NO_COLOR="1",
        ANSIBLE_LOCAL_TEMP="/tmp/.ansible-local",
        ANSIBLE_HOME="/tmp/.ansible-home",
    )
    e["PATH"] = f"{VENV_BIN}:{e['PATH']}"
    return e


def test_ansible_lint_production_profile():
    r = subprocess.run(
        [str(VENV_BIN / "ansible-lint"), "--offline", "--profile", "production", "--nocolor"],
        cwd=ANSIBLE,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Profile 'production' was required, and it passed" in r.stdout + r.stderr


def test_example_inventory_and_playbook_parse():
    r = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "--syntax-check", "-i", "inventory/example/hosts.yml", "site.yml"],
        cwd=ANSIBLE,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(
        [str(VENV_BIN / "ansible-inventory"), "-i", "inventory/example/hosts.yml", "--list"],
        cwd=ANSIBLE,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    groups = json.loads(r.stdout)
    assert groups["blockferry_controller"]["hosts"] == ["ctl1.example.net"]
    assert len(groups["blockferry_agents"]["hosts"]) == 3


def changed_tasks(output: str) -> str:
    """The TASK headers of the tasks that reported a change."""
    task, found = "", []
    for line in output.splitlines():
        if line.startswith("TASK ["):
            task = line.rstrip("* ")
        elif line.startswith("changed:"):
            found.append(f"{task}: {line}")
    return "\n".join(found)


def recap(output: str) -> dict[str, int]:
    m = re.search(r"^localhost\s*:\s*(.*)$", output.split("PLAY RECAP")[-1], re.M)
    assert m, output[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


class Deployment:
    def __init__(self, root: Path, wheel: Path):
        self.root = root
        self.ports = {k: free_port() for k in ("agent", "rest", "registry")}
        self.operator_token = secrets.token_urlsafe(24)
        self.agent_token = secrets.token_urlsafe(24)
        self.bp_password = secrets.token_urlsafe(16)
        self.webhook_secret = secrets.token_urlsafe(24)
        self.inventory = root / "inventory.yml"
        self.inventory.write_text(
            json.dumps(
                {
                    "all": {
                        "hosts": {
                            "localhost": {
                                "ansible_connection": "local",
                                "ansible_host": "127.0.0.1",
                                "ansible_python_interpreter": "/usr/bin/python3",
                            }
                        },
                        "children": {
                            "blockferry_controller": {"hosts": {"localhost": {}}},
                            "blockferry_agents": {"hosts": {"localhost": {}}},
                        },
                    }
                }
            )
        )
        r = root
        self.vars = {
            "blockferry_install_wheel": str(wheel),
            "blockferry_install_prefix": f"{r}/opt",
            "blockferry_install_link_prefix": f"{r}/usr/local",
            "blockferry_tls_dir": f"{r}/etc/tls",
            "blockferry_tls_lab_dir": f"{r}/pki",
            "blockferry_agent_config_dir": f"{r}/etc",
            "blockferry_agent_state_dir": f"{r}/lib/agent",
            "blockferry_agent_run_dir": f"{r}/run",
            "blockferry_agent_roots": [f"{r}/pools", f"{r}/backups"],
            "blockferry_agent_listen": f"127.0.0.1:{self.ports['agent']}",
            "blockferry_agent_metrics_listen": "",
            "blockferry_agent_controller_address": f"127.0.0.1:{self.ports['registry']}",
            "blockferry_agent_controller_token": self.agent_token,
            "blockferry_agent_heartbeat_interval": 1.0,
            "blockferry_agent_fence_after": 0.0,
            "blockferry_agent_pools": {POOL: {"type": "dir", "path": f"{r}/pools/local"}},
            "blockferry_agent_backup_points": {
                BACKUP_POINT: {"type": "local", "path": f"{r}/backups/local", "password": self.bp_password}
            },
            "blockferry_agent_systemd": False,
            "blockferry_agent_unit_dir": f"{r}/units",
            "blockferry_controller_config_dir": f"{r}/etc",
            "blockferry_controller_state_dir": f"{r}/lib/controller",
            "blockferry_controller_listen": f"127.0.0.1:{self.ports['rest']}",
            "blockferry_controller_grpc_listen": f"127.0.0.1:{self.ports['registry']}",
            "blockferry_controller_metrics_listen": "",
            "blockferry_controller_api_tokens": [{"token": self.operator_token, "tenant": "*"}],
            "blockferry_controller_webhooks": [
                {"url": "http://127.0.0.1:9/hooks", "secret": self.webhook_secret, "events": ["task.failed"]}
            ],
            "blockferry_controller_agent_token": self.agent_token,
            "blockferry_controller_heartbeat_interval": 1,
            "blockferry_controller_host_dead_after": 5,
            "blockferry_controller_systemd": False,
            "blockferry_controller_unit_dir": f"{r}/units",
        }
        self.procs: list[subprocess.Popen] = []

    @property
    def secrets(self) -> list[str]:
        return [self.operator_token, self.agent_token, self.bp_password, self.webhook_secret]

    def playbook(self, *args: str, **overrides) -> subprocess.CompletedProcess:
        vars_file = self.root / "vars.json"
        vars_file.write_text(json.dumps({**self.vars, **overrides}))
        vars_file.chmod(0o600)
        return subprocess.run(
            [str(VENV_BIN / "ansible-playbook"), "-i", str(self.inventory), "-e", f"@{vars_file}", *args, "site.yml"],
            cwd=ANSIBLE,
            env=env(),
            capture_output=True,
            text=True,
            timeout=1800,
        )

    def exec_start(self, service: str) -> list[str]:
        """The effective ExecStart: the unit's, as reset and set by its drop-ins."""
        units = self.root / "units"
        lines = (units / f"{service}.service").read_text().splitlines()
        for dropin in sorted((units / f"{service}.service.d").glob("*.conf")):
            lines += dropin.read_text().splitlines()
        cmd = None
        for line in lines:
            if line.startswith("ExecStart="):
                cmd = line.split("=", 1)[1] or None
        assert cmd, f"{service}: no ExecStart"
        return cmd.split()

    def start(self, argv: list[str], log: str) -> subprocess.Popen:
        f = open(self.root / log, "ab")
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()

    def logs(self) -> str:
        return "".join(
            f"---- {f.name} ----\n{f.read_text(errors='replace')[-4000:]}\n" for f in self.root.glob("*.log")
        )


@pytest.fixture(scope="module")
def deployment(dist):
    root = Path(tempfile.mkdtemp(prefix="bf-ans-", dir="/var/tmp"))
    root.chmod(0o755)  # the controller runs as the blockferry user and must reach its files
    (root / "units").mkdir()  # /etc/systemd/system exists on a real host
    wheel = next(dist.glob("*.whl"))
    d = Deployment(root, wheel)
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_check_mode_on_a_new_host_runs_and_creates_nothing(deployment):
    d = deployment
    r = d.playbook("--check", "--diff")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert recap(out)["changed"] > 0 and '+listen = "127.0.0.1:' in out
    assert sorted(p.name for p in d.root.iterdir()) == ["inventory.yml", "units", "vars.json"]
    assert not any((d.root / "units").iterdir())


def test_playbook_deploys_both_services_and_they_work(deployment):
    d = deployment
    r = d.playbook("--diff")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert recap(out)["failed"] == 0 and recap(out)["changed"] > 0
    for s in d.secrets:  # never printed, not even in --diff
        assert s not in out

    etc = d.root / "etc"
    for path, mode, owner in [
        (etc / "agent.conf.d" / "50-secrets.toml", 0o600, "root"),
        (etc / "controller.conf.d" / "50-secrets.toml", 0o600, "blockferry"),
        (etc / "controller.toml", 0o640, "root"),
        (etc / "agent.toml", 0o644, "root"),
        (etc / "tls" / "host.key", 0o640, "root"),
        (d.root / "pki" / "ca.key", 0o600, "root"),
    ]:
        st = path.stat()
        import pwd

        assert (st.st_mode & 0o777, pwd.getpwuid(st.st_uid).pw_name) == (mode, owner), path
    for f in ("agent.toml", "agent.conf.d/20-pools.toml", "controller.toml"):
        text = (etc / f).read_text()
        assert all(s not in text for s in d.secrets), f
    assert d.bp_password in (etc / "agent.conf.d" / "50-secrets.toml").read_text()
    assert d.webhook_secret in (etc / "controller.conf.d" / "50-secrets.toml").read_text()

    # the CLIs, their man pages and completions, linked where operators look
    local = d.root / "usr" / "local"
    for cli in ("blockferry", "blockferry-ctl", "blockferry-restore"):
        assert (local / "bin" / cli).resolve() == d.root / "opt" / "venv" / "bin" / cli
        v = subprocess.run([str(local / "bin" / cli), "--version"], capture_output=True, text=True)
        assert v.returncode == 0 and v.stdout.startswith(cli + " "), v.stderr
        assert (local / "share" / "man" / "man1" / f"{cli}.1").read_text().startswith(".TH")
        assert "complete" in (local / "share" / "bash-completion" / "completions" / cli).read_text()

    # the installed units, with their drop-ins, verify
    for service in ("blockferry-agent", "blockferry-controller"):
        v = subprocess.run(
            ["systemd-analyze", "verify", str(d.root / "units" / f"{service}.service")], capture_output=True, text=True
        )
        assert v.returncode == 0 and v.stderr.strip() == "", v.stderr
        assert d.exec_start(service)[0] == f"{d.root}/opt/venv/bin/{service}"

    # no systemd as PID 1 here: start the units' ExecStart lines, the
    # controller as its unit's User= (so its file modes are put to the test)
    d.start(
        [
            "setpriv",
            "--reuid",
            "blockferry",
            "--regid",
            "blockferry",
            "--init-groups",
            *d.exec_start("blockferry-controller"),
        ],
        "controller.log",
    )
    d.start(d.exec_start("blockferry-agent"), "agent.log")

    import httpx

    tls = d.root / "etc" / "tls"
    rest = httpx.Client(
        base_url=f"https://127.0.0.1:{d.ports['rest']}",
        verify=ssl.create_default_context(cafile=str(tls / "ca.pem")),
        headers={"Authorization": f"Bearer {d.operator_token}"},
        timeout=10,
    )
    host = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and host is None:
        try:
            hosts = rest.get("/v1/hosts").json()["data"]["list"]
            host = next((h for h in hosts if h["State"] == "online"), None)
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    assert host, d.logs()
    assert host["Address"] == f"127.0.0.1:{d.ports['agent']}"
    assert POOL in json.dumps(host["Pools"]) and BACKUP_POINT in json.dumps(host["BackupPoints"])
    assert rest.get("/v1/hosts", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401

    # the agent over mutual TLS with the lab certificates: health, then a job
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    creds = grpc.ssl_channel_credentials(
        (tls / "ca.pem").read_bytes(), (tls / "host.key").read_bytes(), (tls / "host.pem").read_bytes()
    )
    with grpc.secure_channel(f"127.0.0.1:{d.ports['agent']}", creds) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.secure_channel(
        f"127.0.0.1:{d.ports['agent']}", grpc.ssl_channel_credentials((tls / "ca.pem").read_bytes())
    ) as ch:  # no client certificate: refused
        with pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    data = os.urandom(3 << 20) + bytes(2 << 20) + os.urandom(1 << 20)
    src = d.root / "pools" / "local" / f"probe-{uuid.uuid4()}.raw"
    src.write_bytes(data)
    out = subprocess.run(
        [
            str(d.root / "opt" / "venv" / "bin" / "blockferry"),
            "--address",
            f"127.0.0.1:{d.ports['agent']}",
            "--tls-ca",
            str(tls / "ca.pem"),
            "--tls-cert",
            str(tls / "host.pem"),
            "--tls-key",
            str(tls / "host.key"),
            "checksum",
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr + d.logs()
    ref = native.RefImageHash()
    ref.update(data)
    assert out.stdout.split()[0] == ref.digest().hex()


def test_second_run_changes_nothing(deployment):
    r = deployment.playbook()
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert recap(out)["changed"] == 0, changed_tasks(out)


def test_check_diff_shows_a_change_and_makes_none(deployment):
    d = deployment
    before = {p: p.read_bytes() for p in (d.root / "etc").rglob("*") if p.is_file()}
    r = d.playbook("--check", "--diff")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert recap(r.stdout)["changed"] == 0, changed_tasks(r.stdout)
    r = d.playbook("--check", "--diff", blockferry_agent_log_level="debug", blockferry_agent_controller_token="x" * 40)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert recap(out)["changed"] >= 2  # agent.toml and the secrets file
    assert '-log_level = "info"' in out and '+log_level = "debug"' in out
    assert "x" * 40 not in out and all(s not in out for s in d.secrets)
    after = {p: p.read_bytes() for p in (d.root / "etc").rglob("*") if p.is_file()}
    assert after == before


# ---- the variable tables of docs/deployment.md, from the comments in defaults/main.yml ----

ROLES = ("blockferry_install", "blockferry_tls", "blockferry_agent", "blockferry_controller")


def role_variables(role: str) -> list[tuple[str, str, str]]:
    """(name, default, description) of every variable in a role's
    defaults/main.yml; the description is the comment right above it, else
    the comment that opens its paragraph."""
    import yaml

    path = ANSIBLE / "roles" / role / "defaults" / "main.yml"
    values = yaml.safe_load(path.read_text())
    out, above, paragraph = [], [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            above, paragraph = [], []
        elif line.startswith("#"):
            above.append(line.lstrip("# ").rstrip())
        elif m := re.match(r"^(blockferry_\w+):", line):
            text = " ".join(above or paragraph)
            if above and not paragraph:
                paragraph = above
            above = []
            value = values[m.group(1)]
            shown = " ".join(value.split()) if isinstance(value, str) else json.dumps(value)
            out.append((m.group(1), shown, text))
        else:
            above = []
    return out


def variables_tables() -> str:
    lines = []
    for role in ROLES:
        lines += [f"**{role}**", "", "| variable | default | what |", "|---|---|---|"]
        for name, default, text in role_variables(role):
            default = default.replace("|", "\\|")
            lines.append(f"| `{name}` | `{default}` | {text.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def role_summary(role: str) -> str:
    """The comment that opens a role's defaults/main.yml, without its name."""
    lines = []
    for line in (ANSIBLE / "roles" / role / "defaults" / "main.yml").read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return " ".join(lines).split(": ", 1)[1]


def _spec_type(value) -> str:
    if isinstance(value, bool):
        return "bool"
    for kind, name in ((int, "int"), (float, "float"), (str, "str"), (list, "list"), (dict, "dict")):
        if isinstance(value, kind):
            return name
    return "raw"


def argument_specs(role: str) -> str:
    """meta/argument_specs.yml: every variable of defaults/main.yml with its
    type (from its default), default and description, so Ansible refuses a
    wrong type before the role runs."""
    import yaml

    values = yaml.safe_load((ANSIBLE / "roles" / role / "defaults" / "main.yml").read_text())
    options = {}
    for name, _, text in role_variables(role):
        kind = _spec_type(values[name])
        opt = {"type": kind, "description": text or name}
        if kind in ("list", "dict") or (kind == "str" and "{{" in values[name]):
            opt["required"] = False  # templated or structured defaults stay in defaults/main.yml
        else:
            opt["default"] = values[name]
        if kind == "list":
            opt["elements"] = "raw"
        options[name] = opt
    doc = {
        "argument_specs": {
            "main": {
                "short_description": role_summary(role).split(".")[0],
                "description": [role_summary(role)],
                "options": options,
            }
        }
    }

    class Indented(yaml.SafeDumper):  # lists indented under their key, as yamllint wants
        def increase_indent(self, flow=False, indentless=False):
            return super().increase_indent(flow, False)

    head = "---\n# Generated from defaults/main.yml: .venv/bin/python tests/test_ansible.py --argument-specs\n"
    return head + yaml.dump(doc, Dumper=Indented, sort_keys=False, width=120, allow_unicode=True)


def role_readme(role: str) -> str:
    rows = [
        f"| `{n}` | `{d.replace('|', chr(92) + '|')}` | {x.replace('|', '/')} |" for n, d, x in role_variables(role)
    ]
    example = {
        "blockferry_install": "blockferry_install_wheel: /path/to/dist/blockferry-0.1.0-cp311-cp311-linux_x86_64.whl",
        "blockferry_tls": "blockferry_tls_mode: lab",
        "blockferry_agent": 'blockferry_agent_controller_address: "ctl1.example.net:9444"',
        "blockferry_controller": 'blockferry_controller_api_tokens: [{token: "{{ vault_token }}", tenant: "*"}]',
    }[role]
    return "\n".join(
        [
            f"# {role}",
            "",
            role_summary(role),
            "",
            "Part of blockferry's `ansible/` (the playbook is `site.yml`; the whole story is",
            "`docs/deployment.md` and `docs/operator-guide.md`). Its variables are checked",
            "against `meta/argument_specs.yml` before it runs. Tested by `tests/test_ansible.py`:",
            "ansible-lint (production profile), a real deploy to localhost, a second run that",
            "changes nothing, and `--check --diff`.",
            "",
            "## Example",
            "",
            "```yaml",
            "- hosts: all",
            "  roles:",
            f"    - role: {role}",
            "      vars:",
            f"        {example}",
            "```",
            "",
            "## Variables",
            "",
            "Generated from `defaults/main.yml` (`.venv/bin/python tests/test_ansible.py --readmes`).",
            "",
            "| variable | default | what |",
            "|---|---|---|",
            *rows,
            "",
        ]
    )


def test_roles_carry_argument_specs_and_a_readme():
    for role in ROLES:
        d = ANSIBLE / "roles" / role
        assert (d / "meta" / "argument_specs.yml").read_text() == argument_specs(role), (
            f"{role}: regenerate: .venv/bin/python tests/test_ansible.py --argument-specs"
        )
        assert (d / "README.md").read_text() == role_readme(role), (
            f"{role}: regenerate: .venv/bin/python tests/test_ansible.py --readmes"
        )


def test_every_role_variable_is_in_the_docs_with_its_default():
    names = [n for role in ROLES for n, _, _ in role_variables(role)]
    assert len(names) == len(set(names)) and len(names) > 40
    assert variables_tables() in (REPO / "docs" / "deployment.md").read_text(), (
        "regenerate the tables: .venv/bin/python tests/test_ansible.py --tables"
    )


if __name__ == "__main__" and sys.argv[1:] == ["--tables"]:
    print(variables_tables())
if __name__ == "__main__" and sys.argv[1:] == ["--argument-specs"]:
    for r in ROLES:
        (ANSIBLE / "roles" / r / "meta" / "argument_specs.yml").write_text(argument_specs(r))
if __name__ == "__main__" and sys.argv[1:] == ["--readmes"]:
    for r in ROLES:
        (ANSIBLE / "roles" / r / "README.md").write_text(role_readme(r))
