"""The controller's REST API: the seeds' request examples as written, the
envelope, tenants, secrets at rest, and bad input (hypothesis). The
controller runs as a real process on SQLite; the fuzzing drives the same
application in process."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import pytest

from support.controller import (
    AGENT_TOKEN,
    CLUSTER,
    SEEDS,
    TENANT_A,
    TENANT_B,
    TOKENS,
    Controller,
    check_error,
    check_ok,
    seed_example,
    wait_registered,
    write_controller_config,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def controller(request, short_tmp):
    """A controller process on SQLite (the embedded default) and on a real
    PostgreSQL server."""
    url = None
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_server").create_database(f"bf_{uuid.uuid4().hex[:10]}")
    c = Controller(short_tmp, url)
    yield c
    c.stop()


def test_seed_000_backup_points_as_written(controller):
    add = seed_example("000", "/v1/volume/internal/backuppoint/add")
    add["pass_word"] = "s3cret-backup-password"
    with controller.client(TENANT_A) as c:
        data = check_ok(c.post("/v1/volume/internal/backuppoint/add", json=add))
        bp = data["uuid"]
        assert data["name"] == add["name"]
        # the list example, as written (its query string)
        url = seed_example("000", "/v1/volume/internal/backuppoint/list", "url")
        listed = check_ok(c.get("/v1/volume/internal/backuppoint/list?" + url.split("?", 1)[1]))
        assert listed["total_count"] == 1
        item = listed["list"][0]
        assert (item["UUID"], item["Name"], item["BType"], item["tenant"]) == (bp, "nfs_type", "nfs", TENANT_A)
        assert item["indentify"] == {
            "IP": "10.30.12.165",
            "PORT": "",
            "RootDir": add["root_dir"],
            "SubDir": "zhanghailiang",
            "Dest": "",
            "Env": None,
            "Pwd": "******",
        }
        assert set(item) == {
            "tenant",
            "tenant_name",
            "Name",
            "UUID",
            "BType",
            "NsUUID",
            "Ref",
            "indentify",
            "Ctime",
            "Mtime",
            "Bpstate",
            "Health",  # beyond the seed: why, host by host (docs/controller.md)
        }
        assert item["Bpstate"] == item["Health"]["state"] == "unknown" and item["Health"]["reason"]
        # at rest the password is sealed (AES-256-GCM with the controller's key)
        from sqlalchemy import create_engine, text

        engine = create_engine(controller.db_url)
        with engine.connect() as conn:
            sealed = conn.execute(text("SELECT password_sealed FROM backup_points")).scalar_one()
        engine.dispose()
        assert sealed.startswith("v1:") and "s3cret" not in sealed
        upd = seed_example("000", "v1/volume/internal/backuppoint/update")
        upd["backup_point_uuid"] = bp  # the seed's uuid names its own backup point
        check_ok(c.post("/v1/volume/internal/backuppoint/update", json=upd))
        item = check_ok(c.get("/v1/volume/internal/backuppoint/list", params={"cluster_uuid": CLUSTER}))["list"][0]
        assert item["Name"] == "nfs_type_1" and item["Mtime"] >= item["Ctime"]
        dele = seed_example("000", "v1/volume/internal/backuppoint/delete")
        dele.update(uuid=bp, tenant=TENANT_A)
        check_ok(c.post("/v1/volume/internal/backuppoint/delete", json=dele))
        assert (
            check_ok(c.get("/v1/volume/internal/backuppoint/list", params={"cluster_uuid": CLUSTER}))["total_count"]
            == 0
        )
    # the password is sealed at rest
    db = controller.workdir / "controller.sqlite3"
    if db.exists():
        raw = db.read_bytes()
        wal = controller.workdir / "controller.sqlite3-wal"
        raw += wal.read_bytes() if wal.exists() else b""
        assert b"s3cret-backup-password" not in raw
    assert b"s3cret-backup-password" not in controller.log.read_bytes()


def test_tenants_and_tokens(controller):
    add = seed_example("000", "/v1/volume/internal/backuppoint/add")
    with controller.client(TENANT_A) as a, controller.client(TENANT_B) as b, controller.client("op") as op:
        bp = check_ok(a.post("/v1/volume/internal/backuppoint/add", json=add))["uuid"]
        # B never sees A's backup point, cannot add in A's name, update or delete it
        assert (
            check_ok(b.get("/v1/volume/internal/backuppoint/list", params={"cluster_uuid": CLUSTER}))["total_count"]
            == 0
        )
        check_error(
            b.get("/v1/volume/internal/backuppoint/list", params={"cluster_uuid": CLUSTER, "tenant": TENANT_A}),
            404,
            "tenant",
        )
        check_error(b.post("/v1/volume/internal/backuppoint/add", json=add), 404, "tenant")
        upd = dict(
            seed_example("000", "v1/volume/internal/backuppoint/update"), backup_point_uuid=bp, tenant_uuid=TENANT_B
        )
        check_error(b.post("/v1/volume/internal/backuppoint/update", json=upd), 404, "backup_point_uuid")
        check_error(
            b.post("/v1/volume/internal/backuppoint/delete", json={"cluster_uuid": CLUSTER, "uuid": bp}), 404, "uuid"
        )
        # the operator sees every tenant
        assert (
            check_ok(op.get("/v1/volume/internal/backuppoint/list", params={"cluster_uuid": CLUSTER}))["total_count"]
            == 1
        )
        # a second add with the same name is a conflict
        check_error(a.post("/v1/volume/internal/backuppoint/add", json=add), 409, "name")
    for headers in ({}, {"Authorization": "Bearer wrong-token-xxxxxxxxxxxx"}, {"Authorization": "Basic x"}):
        r = httpx.post(f"{controller.url}/v1/volume/internal/backuppoint/add", json=add, headers=headers)
        check_error(r, 401, "authorization")
    doc = httpx.get(f"{controller.url}/openapi.json").json()
    assert doc["info"]["title"] == "blockferry-controller"
    # /docs has a working Authorize button; the errors shown are those sent (400, never 422)
    assert doc["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "a [[tokens]] token of the controller's config",
    }
    ops = [(path, op) for path, x in doc["paths"].items() for op in x.values()]
    assert all("422" not in op["responses"] for _, op in ops)
    assert all("400" in op["responses"] for path, op in ops if path not in ("/healthz", "/readyz"))
    assert {"/zstack/v1/backup-storage", "/v3/{project_id}/operation-logs", "/healthz", "/readyz"} <= set(doc["paths"])
    assert not [x for x in doc["components"]["schemas"] if "__" in x]  # names without module paths
    # every answer has a shape (204s have no body; a /v3 restore's 202 is null), every error its API's
    # envelope, and every /v3 and /zstack body that a handler reads itself is documented
    for path, method, op in [(p, m, op) for p, x in doc["paths"].items() for m, op in x.items()]:
        code, ok_ = next((c, r) for c, r in op["responses"].items() if c.startswith("2"))
        if code != "204":
            schema = ok_["content"]["application/json"]["schema"]
            assert "$ref" in schema or schema == {"type": "null"}, (method, path, schema)
        if path not in ("/healthz", "/readyz"):
            error = op["responses"]["default"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
            assert error == {"/v3": "CbrError", "/zs": "ZStackError"}.get(path[:3], "ErrorAnswer"), (path, error)
        if method in ("post", "put") and path.startswith(("/v3/", "/zstack/")):
            assert "$ref" in op["requestBody"]["content"]["application/json"]["schema"], (method, path)
    # health without a token: the process answers; ready once the database, dispatcher and registry are
    assert httpx.get(f"{controller.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{controller.url}/readyz")
    assert ready.status_code == 200 and ready.json() == {
        "status": "ok",
        "database": "ok",
        "dispatcher": "ok",
        "registry": "ok",
    }, ready.text


def test_bad_input_is_refused_by_field(controller):
    good = seed_example("000", "/v1/volume/internal/backuppoint/add")
    cases = [
        ({k: val for k, val in good.items() if k != "name"}, 400, "name"),
        (dict(good, name=123), 400, "name"),
        (dict(good, name="../../etc"), 400, "name"),
        (dict(good, sub_dir="../escape"), 400, "sub_dir"),
        (dict(good, sub_dir="/abs"), 400, "sub_dir"),
        (dict(good, root_dir="relative/dir"), 400, "root_dir"),
        (dict(good, root_dir="/exports/../etc"), 400, "root_dir"),
        (dict(good, btype="ftp"), 400, "btype"),
        (dict(good, ip="not an ip"), 400, "ip"),
        (dict(good, cluster_uuid="nope"), 400, "cluster_uuid"),
        (dict(good, tenant=str(uuid.uuid4())), 404, "tenant"),
    ]
    with controller.client(TENANT_A) as c:
        for body, status, field in cases:
            check_error(c.post("/v1/volume/internal/backuppoint/add", json=body), status, field)
        check_error(
            c.post(
                "/v1/volume/internal/backuppoint/add",
                content=b"{not json",
                headers={"content-type": "application/json"},
            ),
            400,
        )
        check_error(
            c.post("/v1/volume/internal/backuppoint/delete", json={"cluster_uuid": CLUSTER, "uuid": str(uuid.uuid4())}),
            404,
            "uuid",
        )
        check_error(
            c.get("/v1/volume/internal/backuppoint/list", params={"cluster_uuid": CLUSTER, "page_size": "ten"}),
            400,
            "page_size",
        )
        check_error(c.get("/v1/volume/internal/backuppoint/list"), 400, "cluster_uuid")
        # found by the fuzzing: numbers beyond a 64-bit column, and non-ASCII digits
        for bad in (str(2**63), "\u00b2", "1" * 13):
            check_error(
                c.get("/v1/volume/share/backup/list", params={"cluster_uuid": CLUSTER, "filter_end_time": bad}),
                400,
                "filter_end_time",
            )
        check_error(c.get("/v1/nope"), 404)
        assert (
            check_ok(c.get("/v1/volume/internal/backuppoint/list", params={"cluster_uuid": CLUSTER}))["total_count"]
            == 0
        )  # nothing changed


def test_paging_and_filter(controller):
    add = seed_example("000", "/v1/volume/internal/backuppoint/add")
    with controller.client(TENANT_A) as c:
        for i in range(7):
            check_ok(c.post("/v1/volume/internal/backuppoint/add", json=dict(add, name=f"bp-{i}")))

        def page(n, size, f=""):
            return check_ok(
                c.get(
                    "/v1/volume/internal/backuppoint/list",
                    params={"cluster_uuid": CLUSTER, "page_num": n, "page_size": size, "filter_name": f},
                )
            )

        assert [x["Name"] for x in page(1, 3)["list"]] == ["bp-0", "bp-1", "bp-2"]
        assert [x["Name"] for x in page(0, 3)["list"]] == ["bp-0", "bp-1", "bp-2"]
        assert [x["Name"] for x in page(3, 3)["list"]] == ["bp-6"] and page(3, 3)["total_count"] == 7
        assert page(0, 0)["total_count"] == 7 and len(page(0, 0)["list"]) == 7
        assert [x["Name"] for x in page(0, 0, "-5")["list"]] == ["bp-5"]
        assert page(0, 0, "%")["total_count"] == 0  # LIKE wildcards are matched literally


# ---- bad input at scale: hypothesis against the same application, in process ----

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(
        [
            "../../etc/passwd",
            "/",
            "..",
            "",
            " ",
            "\x00",
            "a/b",
            "%",
            "💥" * 3,
            str(uuid.UUID(int=0)),
            TENANT_B,
            CLUSTER,
            TENANT_A,
        ]
    ),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
ENDPOINTS = {
    "/v1/volume/internal/backuppoint/add": [
        "cluster_uuid",
        "tenant",
        "zone_uuid",
        "name",
        "btype",
        "ip",
        "root_dir",
        "sub_dir",
        "pass_word",
        "env",
    ],
    "/v1/volume/internal/backuppoint/delete": ["cluster_uuid", "uuid", "tenant", "backup_point_name"],
    "/v1/volume/internal/backuppoint/update": [
        "cluster_uuid",
        "tenant_uuid",
        "backup_point_uuid",
        "backup_point_name",
        "ip",
        "root_directory",
        "sub_dir",
        "environment",
    ],
}


@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from agent.controller.api.app import create_app
    from agent.controller.config import load
    from agent.controller.db import Database, migrate
    from agent.controller.secrets import SecretBox

    d = tmp_path_factory.mktemp("ctl")
    cfg = load(str(write_controller_config(d, 1)))
    migrate(cfg.database_url)
    db = Database(cfg.database_url)
    client = TestClient(create_app(cfg, db, SecretBox.from_file(cfg.secret_key_file)), raise_server_exceptions=False)
    client.headers["Authorization"] = f"Bearer {TOKENS[TENANT_A]}"
    # one real backup point of tenant A that the fuzzing may hit (and must never change)
    base = seed_example("000", "/v1/volume/internal/backuppoint/add")
    bp = client.post("/v1/volume/internal/backuppoint/add", json=base).json()["data"]["uuid"]
    return client, db, bp


def _snapshot(db):
    from sqlalchemy import select

    from agent.controller.models import BackupPoint

    with db.session() as s:
        return sorted((b.uuid, b.name, b.ip, b.root_dir, b.sub_dir, b.mtime) for b in s.scalars(select(BackupPoint)))


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(endpoint=st.sampled_from(sorted(ENDPOINTS)), data=st.data())
def test_fuzzed_bodies_never_500_and_change_nothing(app_client, endpoint, data):
    client, db, bp = app_client
    base = seed_example("000", endpoint.lstrip("/"))
    if "backup_point_uuid" in base:
        base["backup_point_uuid"] = bp
    if endpoint.endswith("/delete"):
        base["uuid"] = bp
    keys = ENDPOINTS[endpoint]
    body = dict(base)
    for k in data.draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
        if data.draw(st.booleans()):
            body.pop(k, None)
        else:
            body[k] = data.draw(_junk)
    if data.draw(st.booleans()):
        body[data.draw(st.text(min_size=1, max_size=8))] = data.draw(_junk)
    # every mutation above must break a rule, or be a harmless extra: keep the unmodified seed body out
    if body == base:
        return
    before = _snapshot(db)
    r = client.post(endpoint, json=body)
    assert r.status_code != 500, r.text
    payload = r.json()
    assert set(payload) >= {"scode", "message", "message_cn", "stack", "data"} and payload["stack"] is None
    if r.status_code != 200:
        assert payload["scode"] != 0 and _snapshot(db) == before, (body, payload)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    params=st.dictionaries(
        st.sampled_from(["cluster_uuid", "tenant", "page_num", "page_size", "filter_name", "x"]),
        st.text(max_size=20),
        max_size=5,
    )
)
def test_fuzzed_list_queries_never_500(app_client, params):
    client, db, _ = app_client
    r = client.get("/v1/volume/internal/backuppoint/list", params=params)
    assert r.status_code in (200, 400, 404), r.text
    assert r.json()["stack"] is None


def test_agents_register_and_heartbeat(short_tmp, make_agent):
    c = Controller(short_tmp / "ctl")
    try:
        host = str(uuid.uuid4())
        a = make_agent(
            f'[controller]\naddress = "127.0.0.1:{c.grpc_port}"\ntoken = "{AGENT_TOKEN}"\n'
            f'host_uuid = "{host}"\nheartbeat_interval = 1.0\n'
        )
        a.config.chmod(0o600)
        a.start()
        with c.client("op") as op, c.client(TENANT_A) as tenant:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                hosts = check_ok(op.get("/v1/hosts"))["list"]
                if hosts and hosts[0]["State"] == "online":
                    break
                time.sleep(0.2)
            h = hosts[0]
            assert (h["UUID"], h["State"], h["Address"]) == (host, "online", f"unix:{a.socket}")
            assert {p["pool_uuid"] for p in h["Pools"]} >= {a.pool_uuid}
            assert h["BackupPoints"] and h["BackupPoints"][0]["status"] in ("healthy", "degraded")
            assert h["Facts"]["hostname"] and "dir" in h["Facts"]["pool_types"]
            first_seen = h["LastSeen"]
            time.sleep(2.5)
            assert check_ok(op.get(f"/v1/hosts/{host}"))["LastSeen"] > first_seen  # heartbeats arrive
            check_error(tenant.get("/v1/hosts"), 403, "authorization")  # operators only
            check_error(op.get(f"/v1/hosts/{uuid.uuid4()}"), 404, "host_uuid")
            check_error(op.delete(f"/v1/hosts/{host}"), 409, "host_uuid")  # online: not forgotten
            check_error(tenant.delete(f"/v1/hosts/{host}"), 403, "authorization")
            assert a.stop() == 0
            deadline = time.monotonic() + 20
            while check_ok(op.get(f"/v1/hosts/{host}"))["State"] != "offline":
                assert time.monotonic() < deadline
                time.sleep(0.5)
            # a lost host is forgotten (operator guide); its agent would register again
            assert check_ok(op.delete(f"/v1/hosts/{host}")) == {"uuid": host}
            check_error(op.get(f"/v1/hosts/{host}"), 404, "host_uuid")
            assert check_ok(op.get("/v1/hosts"))["total_count"] == 0
        assert AGENT_TOKEN not in a.log_text()
    finally:
        c.stop()


def test_an_agent_with_the_wrong_token_is_refused(short_tmp, make_agent):
    c = Controller(short_tmp / "ctl")
    try:
        a = make_agent(
            f'[controller]\naddress = "127.0.0.1:{c.grpc_port}"\ntoken = "wrong-token-000000000000"\n'
            f"heartbeat_interval = 1.0\n"
        )
        a.config.chmod(0o600)
        a.start()
        time.sleep(3)
        with c.client("op") as op:
            assert check_ok(op.get("/v1/hosts"))["total_count"] == 0
        assert "controller unreachable or refused us" in a.log_text() and "UNAUTHENTICATED" in a.log_text()
        assert a.stop() == 0
    finally:
        c.stop()


def seed_endpoints() -> list[tuple[str, str, dict]]:
    """(method, path, example) of every endpoint of seeds 000-002; GET
    examples are their query parameters."""
    import re
    from urllib.parse import parse_qsl, urlparse

    out = []
    for seed in ("000", "001", "002"):
        text = next(SEEDS.glob(f"{seed}_*.txt")).read_text()
        for part in re.split(r"\n#{2,3} +(?=/?v1/)", text)[1:]:
            path = "/" + part.split("\n", 1)[0].strip().lstrip("/")
            method = "GET" if re.search(r"### 请求类型\s*\nGET", part) else "POST"
            if method == "POST" and "Body:" in part:
                example = json.loads(part[part.index("Body:") :].split("```")[1])
            else:
                url = part[part.index("#### 请求示例") :].split("```")[1].strip()
                example = dict(parse_qsl(urlparse(url).query, keep_blank_values=True))
            out.append((method, path, example))
    return out


ALL_ENDPOINTS = seed_endpoints()


def _db_state(db) -> list:
    from sqlalchemy import select

    from agent.controller import models

    with db.session() as s:
        return [
            sorted(
                repr(sorted((k, x) for k, x in vars(r).items() if not k.startswith("_"))) for r in s.scalars(select(m))
            )
            for m in (models.BackupPoint, models.Pool, models.Volume, models.Backup, models.Task)
        ]


def test_every_seed_endpoint_is_served():
    paths = {(m, p) for m, p, _ in ALL_ENDPOINTS}
    assert len(paths) == 4 + 17 + 8  # seed 001's own list has 17 (the issue counted 18)
    from agent.controller.api.app import create_app
    from agent.controller.config import ControllerConfig

    app = create_app(ControllerConfig(), None, None)
    served = {(m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops}  # the OpenAPI too
    assert paths <= served, sorted(paths - served)


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(which=st.integers(min_value=0, max_value=len(ALL_ENDPOINTS) - 1), data=st.data())
def test_fuzzed_every_endpoint_never_500_and_changes_nothing(app_client, which, data):
    """Missing fields, wrong types, unknown uuids, another tenant's uuids
    and path-traversal names on every seed endpoint."""
    client, db, _ = app_client
    method, path, example = ALL_ENDPOINTS[which]
    body = dict(example)
    keys = sorted(body) or ["x"]
    for k in data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True)):
        choice = data.draw(st.integers(0, 3))
        if choice == 0:
            body.pop(k, None)
        elif choice == 1:
            body[k] = data.draw(_junk)
        elif choice == 2:
            body[k] = data.draw(
                st.sampled_from(
                    [str(uuid.uuid4()), TENANT_B, CLUSTER, "../../etc/passwd", "/etc/shadow", "a/../../b", "..", "\x00"]
                )
            )
        else:
            body[k] = data.draw(st.sampled_from(["", 0, -1, 2**63, True, [], {}]))
    before = _db_state(db)
    if method == "GET":
        params = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in body.items()}
        r = client.get(path, params=params)
    else:
        r = client.post(path, json=body)
    assert r.status_code != 500, (path, body, r.text)
    payload = r.json()
    assert payload["stack"] is None and "Traceback" not in r.text
    if r.status_code != 200:
        assert payload["scode"] != 0 and payload["message"] and payload["message_cn"]
        assert _db_state(db) == before, (path, body, payload)


def test_agent_registry_over_mutual_tls(short_tmp, make_agent, pki):
    """The registry with TLS and client certificates, as in production: an
    agent with a certificate from the CA registers; one without is refused."""
    from support.cephcluster import free_port

    gport = free_port()
    c = Controller(
        short_tmp / "ctl",
        grpc_listen=f"127.0.0.1:{gport}",
        extra=f'grpc_tls_cert = "{pki}/server.pem"\ngrpc_tls_key = "{pki}/server.key"\n'
        f'grpc_client_ca = "{pki}/ca.pem"\n',
    )
    try:
        good, bad = str(uuid.uuid4()), str(uuid.uuid4())
        for name, host, cert in (("good", good, True), ("bad", bad, False)):
            tls = f'tls_ca = "{pki}/ca.pem"\n' + (
                f'tls_cert = "{pki}/client.pem"\ntls_key = "{pki}/client.key"\n' if cert else ""
            )
            a = make_agent(
                f'[controller]\naddress = "localhost:{gport}"\ntoken = "{AGENT_TOKEN}"\n'
                f'host_uuid = "{host}"\nheartbeat_interval = 1.0\n{tls}',
                name=name,
            )
            a.config.chmod(0o600)
            a.start()
        with c.client("op") as op:
            wait_registered(op)
            time.sleep(2)
            assert [h["UUID"] for h in check_ok(op.get("/v1/hosts"))["list"]] == [good]
    finally:
        c.stop()


def test_controller_tells_systemd_it_is_ready_and_alive(short_tmp, monkeypatch):
    """Type=notify: READY=1 once REST listens, WATCHDOG=1 pings, STOPPING=1
    on SIGTERM (exit 0), with a real NOTIFY_SOCKET."""
    import socket

    path = short_tmp / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    c = Controller(short_tmp / "ctl")  # returns once REST answers
    msg = s.recv(4096).decode()
    assert "READY=1" in msg and f"127.0.0.1:{c.port}" in msg
    pings = 0
    deadline = time.monotonic() + 5
    while pings < 3 and time.monotonic() < deadline:
        if s.recv(4096).decode() == "WATCHDOG=1":
            pings += 1
    assert pings >= 3
    c.proc.terminate()
    stopping = ""
    while "STOPPING=1" not in stopping:
        stopping = s.recv(4096).decode()
    assert c.proc.wait(timeout=30) == 0
    s.close()
