"""The controller's config: the main file plus controller.conf.d/*.toml
beside it (what the Ansible role writes: the main file readable and
diffable, the tokens alone in a 0600 conf.d file)."""

from __future__ import annotations

import pytest

from agent.controller.config import load
from agent.errors import ConfigError

TOKEN = "t" * 32


def write(path, text, mode=0o640):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def test_conf_d_merges_in_name_order_and_tokens_add_up(tmp_path):
    main = write(tmp_path / "controller.toml", '[controller]\nlisten = "127.0.0.1:8080"\nlog_level = "info"\n')
    d = tmp_path / "controller.conf.d"
    write(
        d / "50-secrets.toml",
        f'[controller]\nagent_token = "{TOKEN}"\n[[tokens]]\ntoken = "{TOKEN}"\ntenant = "*"\n',
        0o600,
    )
    write(
        d / "60-more.toml",
        f'[controller]\nlog_level = "debug"\n[[tokens]]\ntoken = "{"u" * 20}"\n'
        'tenant = "8b69bb2f-2a6e-4149-9f43-8d2e2b780df1"\n',
        0o600,
    )
    write(d / "README", "not toml, not read")
    cfg = load(str(main))
    assert cfg.listen == "127.0.0.1:8080" and cfg.log_level == "debug" and cfg.agent_token == TOKEN
    assert [t.tenant for t in cfg.tokens] == ["*", "8b69bb2f-2a6e-4149-9f43-8d2e2b780df1"]
    # an explicit conf dir replaces the default one
    assert load(str(main), str(tmp_path / "elsewhere")).tokens == []


def test_a_conf_d_file_with_tokens_must_be_0600_and_is_named(tmp_path):
    main = write(tmp_path / "controller.toml", "[controller]\n")
    bad = write(tmp_path / "controller.conf.d" / "50-secrets.toml", f'[controller]\nagent_token = "{TOKEN}"\n', 0o644)
    with pytest.raises(ConfigError) as e:
        load(str(main))
    assert str(bad) in e.value.message and "0600" in e.value.message and TOKEN not in e.value.message
    # an empty token is no secret: the readable main file may say so
    bad.write_text('[controller]\nagent_token = ""\n')
    assert load(str(main)).agent_token == ""


def test_a_bad_key_in_conf_d_names_file_and_key(tmp_path):
    main = write(tmp_path / "controller.toml", "[controller]\n")
    bad = write(tmp_path / "controller.conf.d" / "10-x.toml", "[controller]\nlisten_port = 1\n")
    with pytest.raises(ConfigError) as e:
        load(str(main))
    assert str(bad) in e.value.message and "listen_port" in e.value.message
    assert e.value.field == "controller.listen_port"


def test_rest_tls_needs_both_files_readable(tmp_path):
    main = write(tmp_path / "controller.toml", f'[controller]\ntls_cert = "{tmp_path}/c.pem"\n')
    with pytest.raises(ConfigError) as e:
        load(str(main))
    assert e.value.field == "controller.tls_key"
    main.write_text(f'[controller]\ntls_cert = "{tmp_path}/c.pem"\ntls_key = "{tmp_path}/c.key"\n')
    with pytest.raises(ConfigError) as e:
        load(str(main))
    assert e.value.field == "controller.tls_cert" and "cannot read" in e.value.message


def test_webhooks_and_email_are_checked_by_field(tmp_path):
    def bad(text: str, field: str) -> None:
        main = write(tmp_path / "c.toml", text, 0o600)
        with pytest.raises(ConfigError) as e:
            load(str(main), str(tmp_path / "none"))
        assert e.value.field == field and field.split(".")[-1] in e.value.message, e.value.message

    bad('[[webhooks]]\nurl = "ftp://x"\nsecret = "s" \n', "webhooks.url")
    bad('[[webhooks]]\nurl = "https://x"\nsecret = "short"\n', "webhooks.secret")
    bad(f'[[webhooks]]\nurl = "https://x"\nsecret = "{TOKEN}"\nevents = ["task.done"]\n', "webhooks.events")
    bad('[email]\nsmtp_host = "m"\nto = ["nobody"]\n', "email.to")
    bad('[controller]\nlog_format = "xml"\n', "controller.log_format")
    # a webhook's secret makes the file a secret too
    main = write(tmp_path / "c.toml", f'[[webhooks]]\nurl = "https://x"\nsecret = "{TOKEN}"\n', 0o640)
    with pytest.raises(ConfigError, match="0600"):
        load(str(main), str(tmp_path / "none"))


def test_controller_logs_json_lines_and_journal_priorities(tmp_path):
    """Both log formats from a real controller process: JSON lines with the
    records' fields, journald's <N> priorities; tokens masked in both."""
    import json

    from support.controller import TOKENS, Controller

    for fmt in ("json", "journal"):
        c = Controller(tmp_path / fmt, extra=f'log_format = "{fmt}"\n')
        try:
            c.client("op").get("/v1/hosts")
            c.client("op").get("/v1/tasks/not-a-task")
        finally:
            c.stop()
        lines = [x for x in c.log.read_text().splitlines() if x.strip()]
        assert lines, fmt
        if fmt == "json":
            records = [json.loads(x) for x in lines]  # every line is one JSON object
            assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
            assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn's records too
        else:
            assert all(x[0] == "<" and x[2] == ">" and x[1] in "234567" for x in lines), lines[:5]
        assert not any(tok in c.log.read_text() for tok in TOKENS.values())
