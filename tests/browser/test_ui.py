"""The Dagster UI end to end, driven in headless Chromium (issue 7).

`dagster dev` serves a tiny experiment (no partitioned assets) from a temporary DAGSTER_HOME and artefact root.
The test clicks "Materialize all" on the global asset lineage page, follows the launched run until it succeeds,
checks the run page and the rendered PNG metadata of `base_model`, then reads the rows the run wrote to DuckDB.

Run it alone with `pytest -m browser`. It needs Debian's chromium (`apt-get install -y chromium`; never
`playwright install`) and the `playwright` pip package (the `test` extra). Screenshots go to $DIFFATTR_SCREENSHOTS,
default `test-artifacts/browser/`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_experiment_dict

pytestmark = [pytest.mark.browser,
              pytest.mark.timeout(1800)]  # start-up + a ~3 min run + the browser, over the suite's 600 s

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "ui_tiny"
ASSETS = ("training_set", "query_set", "base_model", "image_encoder", "features_dtrak", "scores_dtrak",
          "scores_pixel")
STARTUP_TIMEOUT_S = 240    # webserver + code location on the shared 2-core machine
RUN_TIMEOUT_S = 900        # every step is a spawned process importing torch (~3 min measured)
UI_TIMEOUT_MS = 60_000
SCREENSHOTS = ("asset_graph.png", "run_page.png", "asset_page.png")
# No internet here: the UI's external fetches fail to resolve; that is not a UI error.
IGNORED_CONSOLE = ("ERR_NAME_NOT_RESOLVED", "ERR_INTERNET_DISCONNECTED")

_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never send localhost through a proxy


def ui_experiment() -> dict:
    """The conftest tiny experiment, reduced to a graph without partitions (no LDS, no counterfactual, no inbox)
    and to two cheap attribution methods."""
    exp = tiny_experiment_dict(EXPERIMENT)
    exp["attribution"]["methods"] = {"pixel": {"kind": "pixel"},
                                     "dtrak": {"kind": "trak", "output": "square", "K": 2}}
    exp["lds"] = {"enabled": False}
    exp["counterfactual"] = {"enabled": False, "encoder_steps": 20}
    exp.pop("shapley", None)
    # no inbox (a dynamically partitioned asset) and no declarative automation launching runs of its own
    exp["operations"] = {"inbox": False, "automation": False}
    return exp


def screenshot_dir() -> Path:
    d = Path(os.environ.get("DIFFATTR_SCREENSHOTS") or REPO / "test-artifacts" / "browser")
    d.mkdir(parents=True, exist_ok=True)
    for name in SCREENSHOTS + ("failure.png",):  # no stale picture from an earlier run
        (d / name).unlink(missing_ok=True)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DagsterDev:
    """A `dagster dev` process group started by this test, with its URL, log and artefact root."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path, root: Path, home: Path):
        self.proc, self.url, self.log, self.root, self.home = proc, url, log, root, home
        self.startup_s = 0.0

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        req = urllib.request.Request(f"{self.url}/graphql", data=json.dumps(
            {"query": query, "variables": variables or {}}).encode(), headers={"Content-Type": "application/json"})
        with _http.open(req, timeout=30) as r:
            out = json.load(r)
        if out.get("errors"):
            raise AssertionError(f"GraphQL errors: {out['errors']}")
        return out["data"]

    def check_alive(self, what: str) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"dagster dev exited with code {self.proc.returncode} while {what}; log {self.log}:\n"
                        f"{self.log_tail()}", pytrace=False)

    def wait_ready(self, timeout: float) -> None:
        """/server_info answers, then the code location has loaded the experiment's assets."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive("starting")
            try:
                with _http.open(f"{self.url}/server_info", timeout=10) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dagster dev did not answer /server_info within {timeout:.0f} s; log {self.log}:\n"
                            f"{self.log_tail()}", pytrace=False)
            time.sleep(2)
        query = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
                      locationOrLoadError { __typename ... on PythonError { message } } } } }
                    assetNodes { assetKey { path } } }"""
        while True:
            self.check_alive("loading the code location")
            try:
                data = self.graphql(query)
            except (urllib.error.URLError, OSError):
                data = None
            if data:
                entries = data["workspaceOrError"].get("locationEntries") or []
                for e in entries:
                    err = e.get("locationOrLoadError") or {}
                    if err.get("__typename") == "PythonError":
                        pytest.fail(f"code location {e['name']} failed to load: {err.get('message')}", pytrace=False)
                keys = {"/".join(n["assetKey"]["path"]) for n in data["assetNodes"]}
                if entries and all(e["loadStatus"] == "LOADED" for e in entries) and \
                        {f"{EXPERIMENT}/{a}" for a in ASSETS} <= keys:
                    return
            if time.monotonic() > deadline:
                pytest.fail(f"the code location did not load {EXPERIMENT}'s assets within {timeout:.0f} s; log "
                            f"{self.log}:\n{self.log_tail()}", pytrace=False)
            time.sleep(2)

    def stop(self) -> None:
        """SIGTERM the process group this test started (dagster dev, webserver, daemon, code servers, run
        workers), SIGKILL what is left after 30 s."""
        pgid = self.proc.pid  # start_new_session=True: the group id is dagster dev's own pid
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            # dagster dev is gone; give its children a moment to follow, then check the group is empty
            for _ in range(20):
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.5)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture(scope="module")
def chromium_path() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail("Debian's chromium is not installed (needed by the browser test, marker `browser`): run "
                    "`apt-get install -y chromium` (never `playwright install`)", pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the `playwright` pip package is missing: `pip install -c constraints.txt -e '.[test]'`",
                    pytrace=False)
    return path


@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory):
    base = tmp_path_factory.mktemp("ui")
    home, root = base / "dagster_home", base / "artefacts"
    home.mkdir()
    root.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    exp_file = base / f"{EXPERIMENT}.yaml"
    exp_file.write_text(yaml.safe_dump(ui_experiment(), sort_keys=False))
    env = {**os.environ, "DAGSTER_HOME": str(home), "DIFFATTR_ROOT": str(root),
           "DIFFATTR_EXPERIMENTS": str(exp_file), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "DAGSTER_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
    dagster = Path(sys.executable).parent / "dagster"
    port = free_port()
    log = base / "dagster_dev.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(dagster if dagster.exists() else "dagster"), "dev", "-w", "workspace.yaml",
                                 "-h", "127.0.0.1", "-p", str(port)], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    dev = DagsterDev(proc, f"http://127.0.0.1:{port}", log, root, home)
    try:
        t0 = time.monotonic()
        dev.wait_ready(STARTUP_TIMEOUT_S)
        dev.startup_s = time.monotonic() - t0
        yield dev
    finally:
        dev.stop()
        print(f"\n[browser] dagster dev stopped (exit code {proc.returncode}); its log: {log}")


def wait_for_run(dev: DagsterDev, run_id: str, timeout: float) -> str:
    query = "query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }"
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        dev.check_alive(f"run {run_id} was executing")
        status = dev.graphql(query, {"id": run_id})["runOrError"].get("status")
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(5)
    return f"{status} after {timeout:.0f} s"


def run_failures(dev: DagsterDev, run_id: str) -> list[str]:
    query = """query($id: ID!) { logsForRun(runId: $id, limit: 5000) { ... on EventConnection { events {
                 __typename ... on MessageEvent { message stepKey }
                 ... on ExecutionStepFailureEvent { error { message } } ... on RunFailureEvent { message } } } } }"""
    try:
        events = dev.graphql(query, {"id": run_id})["logsForRun"].get("events") or []
    except Exception as e:  # noqa: BLE001 - diagnostics only
        return [f"(could not read the run's events: {e})"]
    return [f"{e.get('stepKey')}: {e.get('message')} {(e.get('error') or {}).get('message', '')}".strip()
            for e in events if e["__typename"] in ("ExecutionStepFailureEvent", "RunFailureEvent")]


def expand_all_groups(page) -> None:
    """The global lineage collapses asset groups; expand them (⌥E / Alt+E, the graph settings' shortcut), with the
    URL's `expanded` parameter as fallback."""
    first = page.get_by_text("base_model", exact=True)
    page.keyboard.press("Alt+e")
    try:
        first.wait_for(timeout=15_000)
        return
    except Exception:  # noqa: BLE001 - fall back to the URL form of the same state
        pass
    groups = ",".join(f"global@global:{g}" for g in ("data", "models", "features", "attribution"))
    page.goto(page.url.split("?")[0] + "?expanded=" + urllib.parse.quote(groups, safe=","))
    first.wait_for(timeout=UI_TIMEOUT_MS)


def launch_from_ui(page, dev: DagsterDev) -> str:
    """Click "Materialize all", confirm a launch dialog if one opens, then follow the toast's "View" link to the run
    page. Returns the run id."""
    page.get_by_role("button", name=re.compile(r"Materialize all")).click()
    toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
    deadline = time.monotonic() + 60
    while not toast.count():
        dialog = page.get_by_role("dialog")
        if dialog.count():
            confirm = dialog.get_by_role("button", name=re.compile(r"^(Launch|Materialize)"))
            if confirm.count():
                confirm.first.click()
        if time.monotonic() > deadline:
            pytest.fail("no 'Launched run ...' toast within 60 s of clicking 'Materialize all'", pytrace=False)
        time.sleep(0.2)
    short = re.search(r"Launched run ([0-9a-f]{8})", toast.first.inner_text()).group(1)
    try:
        # the toast: <div>Launched run <span>abcd1234</span></div> ... <a href="/runs/<run id>">View</a>
        box = page.locator("div").filter(has=toast).filter(
            has=page.get_by_role("link", name="View", exact=True)).last
        view = box.get_by_role("link", name="View", exact=True)
        href = view.get_attribute("href", timeout=5_000)
        view.click(timeout=5_000)
        page.wait_for_url(re.compile(rf"/runs/{short}[0-9a-f-]{{28}}"), timeout=30_000)
        run_id = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)
        assert href.endswith(run_id), (href, page.url)
    except Exception as e:  # noqa: BLE001 - the toast can vanish first on a slow machine: ask GraphQL instead
        print(f"[browser] following the toast's View link failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
              f"finding run {short} via GraphQL")
        runs = dev.graphql("{ runsOrError { ... on Runs { results { runId } } } }")["runsOrError"]["results"]
        matches = [r["runId"] for r in runs if r["runId"].startswith(short)]
        assert len(matches) == 1, f"run {short} not found among {runs}"
        run_id = matches[0]
    assert run_id.startswith(short)
    return run_id


def test_materialize_from_ui_then_inspect_run_asset_and_warehouse(chromium_path, dagster_ui):
    from playwright.sync_api import sync_playwright

    dev = dagster_ui
    shots = screenshot_dir()
    timings = {"dagster dev ready": dev.startup_s}
    console_errors: list[str] = []

    def on_console(msg):
        if msg.type == "error" and not any(s in msg.text for s in IGNORED_CONSOLE):
            console_errors.append(f"{msg.text} @ {msg.location.get('url')}")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.on("console", on_console)
        page.on("pageerror", lambda err: console_errors.append(f"page error: {err}"))
        try:
            # 1. the asset graph shows the experiment's assets
            t = time.monotonic()
            page.goto(f"{dev.url}/asset-groups")
            # (the accessible name starts with the icon's label, "materialization")
            button = page.get_by_role("button", name=re.compile(r"Materialize all"))
            button.wait_for()
            assert button.inner_text().strip() == "Materialize all", (
                f"the button reads {button.inner_text()!r}: the graph has partitioned assets (the launch would "
                f"open the partition dialog); {EXPERIMENT} must have none")
            expand_all_groups(page)
            for name in ASSETS:
                page.get_by_text(name, exact=True).first.wait_for()
            page.screenshot(path=str(shots / "asset_graph.png"))
            timings["asset graph"] = time.monotonic() - t

            # 2. launch the whole experiment from the UI and wait for the run
            t = time.monotonic()
            run_id = launch_from_ui(page, dev)
            tags = dev.graphql("query($id: ID!) { runOrError(runId: $id) { ... on Run { tags { key value } } } }",
                               {"id": run_id})["runOrError"]["tags"]
            assert {"key": "dagster/from_ui", "value": "true"} in tags, tags
            page.goto("about:blank")  # a live run page re-renders constantly: spare the 2 cores while waiting
            status = wait_for_run(dev, run_id, RUN_TIMEOUT_S)
            timings["run (launch to finish)"] = time.monotonic() - t

            # 3. the run page shows the success
            page.goto(f"{dev.url}/runs/{run_id}")
            page.get_by_text(run_id[:8], exact=True).first.wait_for()
            if status == "SUCCESS":
                page.get_by_text("Success", exact=True).first.wait_for()
                page.get_by_text(re.compile(r"^Succeeded \(\d+\)$")).first.wait_for()
            page.screenshot(path=str(shots / "run_page.png"))
            assert status == "SUCCESS", (f"run {run_id} ended {status}: {run_failures(dev, run_id)}; see "
                                         f"{shots / 'run_page.png'} and {dev.url}/runs/{run_id}")

            # 4. the base model's PNG metadata renders as an image
            t = time.monotonic()
            page.goto(f"{dev.url}/assets/{EXPERIMENT}/base_model")
            row = page.locator("tr").filter(has=page.get_by_text("samples", exact=True))
            row.first.wait_for()
            page.locator("tr").filter(has=page.get_by_text("loss_curve", exact=True)).first.wait_for()
            row.first.get_by_text("[Show Markdown]").click()
            dialog = page.get_by_role("dialog")
            img = dialog.locator('img[src^="data:image/png;base64,"]').first
            img.wait_for()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
            page.screenshot(path=str(shots / "asset_page.png"))
            timings["asset page"] = time.monotonic() - t
        except BaseException:
            try:
                page.screenshot(path=str(shots / "failure.png"))
                print(f"\n[browser] failure screenshot: {shots / 'failure.png'} (page {page.url})")
            except Exception:  # noqa: BLE001
                pass
            raise
        finally:
            browser.close()

    assert not console_errors, f"browser console errors: {console_errors}"

    # 5. the run's rows in the warehouse (read-only: no writer is left once the run has finished)
    import duckdb

    con = duckdb.connect(str(dev.root / "warehouse.duckdb"), read_only=True)
    try:
        models = con.execute("SELECT model, run_id FROM diffattr.training_runs WHERE experiment = ?",
                             [EXPERIMENT]).fetchall()
        assert models == [("base_model", run_id)], models
        datasets = con.execute("SELECT split, run_id FROM diffattr.datasets WHERE experiment = ? ORDER BY split",
                               [EXPERIMENT]).fetchall()
        assert datasets == [("heldout", run_id), ("train", run_id)], datasets
        lineage = con.execute("SELECT asset_key FROM diffattr.lineage WHERE run_id = ? AND experiment = ?",
                              [run_id, EXPERIMENT]).fetchall()
        assert {k for (k,) in lineage} >= {f"{EXPERIMENT}/{a}" for a in ASSETS}, lineage
    finally:
        con.close()

    print(f"\n[browser] run {run_id} launched from the UI: SUCCESS")
    for name in SCREENSHOTS:
        print(f"[browser] screenshot: {shots / name}")
    print("[browser] timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
