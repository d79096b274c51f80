"""The controller's status page, opened in a real headless browser
(Debian's chromium, driven through chromedriver by selenium) against a
real controller and agent: sign in with an operator token, then the
hosts, the pools and backup points with their health, a backup running
with its progress, and the volume's last good backup once it ends. A
screenshot is kept as a test artifact."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from support.controller import (
    CLUSTER,
    TENANT_A,
    TOKENS,
    Controller,
    agent_section,
    check_ok,
    dir_pool,
    hosts_online,
    local_backup_point,
    wait_task,
)
from support.volumes import write

ARTIFACTS = Path(os.environ.get("BLOCKFERRY_TEST_ARTIFACTS", "/tmp/blockferry-test-artifacts"))


@pytest.fixture
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1800",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_status_page_in_a_real_browser(short_tmp, make_agent, browser):
    c = Controller(short_tmp / "ctl")
    host = str(uuid.uuid4())
    a = make_agent(agent_section(c, host, "[jobs]\nbandwidth_limit = 2097152\n")).start()
    op = c.client("op")
    try:
        hosts_online(op)
        # a backup point (healthy once a reconnect attached it), a pool, a volume with 12 MiB written
        bp = local_backup_point(op, a.roots[0] / "nightly")
        pool = dir_pool(op, a.roots[0] / "pool", host, "fast-pool")
        vol_body = {
            "cluster_uuid": CLUSTER,
            "tenant": TENANT_A,
            "pool_uuid": pool,
            "volume_name": "web-disk",
            "volume_type": "block",
            "capacity": 16 << 20,
            "snap_capacity": 1 << 30,
        }
        vol = check_ok(op.post("/v1/volume/share/create", json=vol_body))["volume"]
        run = short_tmp / "run-status"
        run.mkdir()
        write(vol["AccessPath"][host], {0: os.urandom(12 << 20)}, run)
        ref = {"cluster_uuid": CLUSTER, "tenant": TENANT_A, "volume_uuid": vol["UUID"]}
        snap = check_ok(op.post("/v1/volume/share/snapshot/create", json={**ref, "snapshot_name": "s1", "desc": ""}))
        backup = {
            "cluster_uuid": CLUSTER,
            "volume_uuid": vol["UUID"],
            "snapshot_uuid": snap["snapshot"]["UUID"],
            "backup_point_uuid": bp,
            "backup_name": "nightly-1",
            "desc": "",
            "full": True,
        }
        task = check_ok(op.post("/v1/volume/share/backup/add", json=backup))["task_id"]  # 12 MiB at 2 MiB/s

        # not signed in: the sign-in form; a tenant's token is not enough
        browser.get(f"{c.url}/status")
        assert browser.current_url.endswith("/status/login")
        field = browser.find_element(By.ID, "token")
        field.clear()
        field.send_keys(TOKENS[TENANT_A])
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(browser, 30).until(ec.url_contains("failed=1"))  # the click does not wait for the answer
        assert "not an operator token" in browser.page_source
        field = browser.find_element(By.ID, "token")
        field.clear()  # the browser may have filled in the token it was given before
        field.send_keys(TOKENS["op"])
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(browser, 30).until(ec.title_is("blockferry status"))
        assert browser.current_url.endswith("/status")

        # the backup shows as running, its progress between 0 and 100
        deadline = time.monotonic() + 30
        while True:
            rows = browser.find_elements(By.CSS_SELECTOR, "#running + table tr")
            bars = browser.find_elements(By.CSS_SELECTOR, "#running + table progress")
            if bars and 0 < float(bars[0].get_attribute("value")) < 100:
                break
            assert time.monotonic() < deadline, browser.page_source[-3000:]
            time.sleep(0.5)
            browser.refresh()
        assert any(task in r.text and "backup" in r.text for r in rows)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "status-page-running.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")

        text = browser.find_element(By.TAG_NAME, "body").text
        hosts = browser.find_element(By.CSS_SELECTOR, "#hosts + table").text
        assert host in hosts and "online" in hosts
        points = browser.find_element(By.CSS_SELECTOR, "#backup-points + table").text
        assert "nightly" in points and "healthy" in points and "free of" in points
        assert "fast-pool" in browser.find_element(By.CSS_SELECTOR, "#pools + table").text
        assert "web-disk" in text and "no backup yet" in text
        assert not browser.find_elements(By.TAG_NAME, "script")  # no JavaScript at all

        # once it ends: the volume's last good backup, and nothing running
        assert wait_task(op, task, timeout=60)["status"] == "success"
        browser.refresh()
        volumes = browser.find_element(By.CSS_SELECTOR, "#backups + table").text
        line = next(x for x in volumes.splitlines() if "web-disk" in x or vol["UUID"] in x)
        assert "no backup yet" not in volumes and "never" not in line, volumes
        assert "Nothing is running." in browser.find_element(By.TAG_NAME, "body").text
        browser.save_screenshot(str(ARTIFACTS / "status-page.png"))

        # the session cookie stays in the browser (HttpOnly); curl uses a bearer token; signing out ends it
        cookie = browser.get_cookie("bf_status")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/status"
        r = httpx.get(f"{c.url}/status", headers={"Authorization": f"Bearer {TOKENS['op']}"})
        assert r.status_code == 200 and "web-disk" in r.text and r.headers["cache-control"] == "no-store"
        r = httpx.get(f"{c.url}/status", cookies={"bf_status": cookie["value"][:-2] + "00"}, follow_redirects=False)
        assert r.status_code == 303  # a forged cookie
        browser.find_element(By.CSS_SELECTOR, "form[action='/status/logout'] button").click()
        WebDriverWait(browser, 30).until(ec.url_contains("/status/login"))
        browser.get(f"{c.url}/status")
        assert browser.current_url.endswith("/status/login")
    finally:
        op.close()
        c.stop()
