"""Both UIs in a real browser (headless Chromium, Debian's package, driven by selenium): after a
tiny `relift train` reported to the Prefect server that `relift ui` starts, the MLflow UI shows
the run by name with a metric chart, and the Prefect UI shows the flow run `train-<name>` with
its link to MLflow."""

from __future__ import annotations

import contextlib
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.temporary_server import stop_process
from tests.commands import RELIFT, command_log, own_prefect_env, run_command, start_relift_ui

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _require_browser() -> None:
    if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists():
        return
    reason = "Chromium not installed (scripts/ensure_chromium.sh installs Debian's package)"
    if os.environ.get("RELIFT_REQUIRE_BROWSER"):
        pytest.fail(reason + ", and RELIFT_REQUIRE_BROWSER is set (CI)")
    pytest.skip(reason)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def browser():
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1600,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _page_text_contains(driver, text: str) -> bool:
    try:
        return text in driver.find_element("tag name", "body").text
    except Exception:  # noqa: BLE001  (the page is still rendering)
        return False


@contextlib.contextmanager
def _relift_ui(workdir: Path, tmp_path: Path, wait_until) -> Iterator[tuple[dict, str, str]]:
    """`relift ui` for `workdir` (its Prefect home in `tmp_path`, its output in ui.log there)
    once both UIs answer: yields (the environment it runs in, the Prefect UI's address, the
    MLflow UI's address), and stops it after the block."""
    env = own_prefect_env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    with open(tmp_path / "ui.log", "w") as log:
        ui, prefect_port, mlflow_port = start_relift_ui(workdir, env, log)
        prefect_ui = f"http://127.0.0.1:{prefect_port}"
        mlflow_ui = f"http://127.0.0.1:{mlflow_port}"
        try:
            wait_until(lambda: _answers(f"{prefect_ui}/api/health"), 180, "the Prefect server")
            wait_until(lambda: _answers(f"{mlflow_ui}/health"), 180, "the MLflow UI")
            yield env, prefect_ui, mlflow_ui
        finally:
            stop_process(ui, grace_s=30)
            shutil.rmtree(tmp_path / "prefect-home", ignore_errors=True)


def test_mlflow_and_prefect_uis_show_the_run_and_link_to_each_other(
    wait_until, browser, tiny_overrides, tmp_path
):
    with _relift_ui(tmp_path, tmp_path, wait_until) as (env, prefect_ui, mlflow_ui):
        prefect_api = f"{prefect_ui}/api"
        # A tiny training, reported to this Prefect server, tracked in the store the UI serves.
        train = run_command(
            [
                RELIFT,
                "train",
                "-p",
                "toy",
                *tiny_overrides,
                "run.name=browsed",
                f"run.workdir={tmp_path}",
                "eval.benchmarks=[]",
            ],
            env={**env, "PREFECT_API_URL": prefect_api},
            timeout=600,
        )
        assert train.returncode == 0, train.stdout + train.stderr
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        (run,) = client.search_runs(
            [client.get_experiment_by_name("relift").experiment_id],
            filter_string="attributes.run_name = 'browsed'",
        )
        flow_run_id = run.data.tags["prefect.flow_run_id"]

        # MLflow: the run's page (training view) names the run; its metrics tab draws a chart.
        page = (
            f"{mlflow_ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
            "?workflowType=machine_learning"
        )
        browser.get(page)
        wait_until(lambda: _page_text_contains(browser, "browsed"), 90, "the run name in MLflow")
        # The run's description links back to the Prefect flow run.
        assert f"/runs/flow-run/{flow_run_id}" in browser.page_source
        browser.get(
            f"{mlflow_ui}/#/experiments/{run.info.experiment_id}/runs/"
            f"{run.info.run_id}/model-metrics"
        )
        charts = wait_until(
            lambda: browser.find_elements("css selector", "svg.main-svg"),
            90,
            "a drawn metric chart",
        )
        # Each chart's legend names the run and the metric: "browsed (sft/sft_loss)".
        wait_until(lambda: _page_text_contains(browser, "browsed ("), 30, "a chart of the run")
        assert charts

        # Prefect: the flow run, named after the run, with its link artifact to MLflow.
        browser.get(f"{prefect_ui}/runs/flow-run/{flow_run_id}")
        wait_until(lambda: _page_text_contains(browser, "train-browsed"), 90, "the flow run name")
        try:
            tab = wait_until(
                lambda: browser.find_elements("xpath", "//*[normalize-space(.)='Artifacts']"),
                30,
                "the Artifacts tab",
            )
            tab[-1].click()
            wait_until(
                lambda: _page_text_contains(browser, "mlflow-run"), 60, "the MLflow link artifact"
            )
        except AssertionError as e:
            raise AssertionError(f"{e}: {browser.find_element('tag name', 'body').text}") from e


def _click_through(driver, link) -> None:
    """Click a link as a user does; follow it into the tab it opens, if it opens one."""
    before = set(driver.window_handles)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", link)
    link.click()
    opened = set(driver.window_handles) - before
    if opened:
        driver.switch_to.window(opened.pop())


def test_after_a_sweep_the_links_open_both_ways_and_the_parent_shows_the_table(
    wait_until, browser, tiny_overrides, tmp_path
):
    """`relift ui`, then `relift sweep` on its work directory (no PREFECT_API_URL: the running
    UI's server is used): the parent run's page in MLflow shows the per-method table and its
    Prefect link opens the sweep's flow run; a child flow run's MLflow link opens its run; the
    saved runs view shows method groups and the held-out column."""
    workdir = tmp_path / "runs"
    with _relift_ui(workdir, tmp_path, wait_until) as (env, prefect_ui, mlflow_ui):
        wait_until(lambda: (workdir / "ui.json").exists(), 30, "relift ui's ui.json")
        sweep = run_command(
            [
                RELIFT,
                "sweep",
                "-p",
                "toy",
                "--algorithms",
                "rl,relift",
                "--seeds",
                "0",
                "--name",
                "web",
                *tiny_overrides,
                f"run.workdir={workdir}",
                "run.iterations=1",
            ],
            env=env,
            timeout=900,
        )
        out = sweep.stdout + sweep.stderr
        assert sweep.returncode == 0, out
        assert "| method" in sweep.stdout and f"MLflow parent run (2 runs): {mlflow_ui}/" in out
        # No link to a temporary server: every "View at" (in the command's log) names the UI.
        views = [line for line in command_log(workdir, "sweep").splitlines() if "View at" in line]
        assert views and all(prefect_ui in line for line in views), views
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
        exp_id = client.get_experiment_by_name("relift").experiment_id
        runs = client.search_runs([exp_id])
        (parent,) = [r for r in runs if r.data.tags.get("relift.kind") == "sweep"]
        child = next(r for r in runs if r.data.tags.get("relift.algorithm") == "relift")

        # MLflow -> Prefect: the parent's page shows the table; its link opens the flow run.
        browser.get(
            f"{mlflow_ui}/#/experiments/{exp_id}/runs/{parent.info.run_id}"
            "?workflowType=machine_learning"
        )
        wait_until(
            lambda: _page_text_contains(browser, "Which method is best"),
            90,
            "the parent run's description",
        )
        assert _page_text_contains(browser, "demos used")
        link = wait_until(
            lambda: browser.find_elements(
                "css selector", f"a[href^='{prefect_ui}/runs/flow-run/']"
            ),
            30,
            "the Prefect link",
        )
        _click_through(browser, link[0])
        wait_until(
            lambda: _page_text_contains(browser, parent.info.run_name),
            90,
            f"the sweep's flow run {parent.info.run_name} in Prefect",
        )

        # Prefect -> MLflow: a training's flow run links to its MLflow run.
        browser.get(f"{prefect_ui}/runs/flow-run/{child.data.tags['prefect.flow_run_id']}")
        wait_until(
            lambda: _page_text_contains(browser, f"train-{child.info.run_name}"),
            90,
            "the child's flow run",
        )
        tab = wait_until(
            lambda: browser.find_elements("xpath", "//*[normalize-space(.)='Artifacts']"),
            30,
            "the Artifacts tab",
        )
        tab[-1].click()
        # Its link artifact `mlflow-run`: the card opens the artifact, which holds the link.
        card = wait_until(
            lambda: browser.find_elements("xpath", "//*[normalize-space(.)='mlflow-run']"),
            60,
            "the mlflow-run artifact",
        )
        card[-1].click()
        link = wait_until(
            lambda: browser.find_elements("css selector", f"a[href^='{mlflow_ui}/#/experiments/']"),
            60,
            "the MLflow link",
        )
        _click_through(browser, link[0])
        wait_until(
            lambda: (
                _page_text_contains(browser, child.info.run_name)
                and child.info.run_id in browser.current_url
            ),
            90,
            "the child's MLflow run",
        )

        # The runs view the sweep prints: grouped by method, with method, seed and held-out score
        # as columns that show without scrolling (MLflow renders only the columns in view).
        (view_url,) = [
            line.split("Runs by method: ", 1)[1].strip()
            for line in sweep.stdout.splitlines()
            if "Runs by method: " in line
        ]
        assert view_url.startswith(f"{mlflow_ui}/#/experiments/{exp_id}/runs?")
        browser.get(view_url)
        wait_until(lambda: _page_text_contains(browser, "Group: relift"), 90, "method groups")
        page = browser.find_element("tag name", "body").text
        # The training view, and the view by its name in MLflow's "Views" menu.
        assert "Model training" in page and "Runs by method" in page

        def column(col_id: str) -> list[str]:
            cells = browser.find_elements("css selector", f"[col-id='{col_id}']")
            return [c.text.strip() for c in cells if c.is_displayed()]

        held_out = "metrics.`heldout/world/avg_at_k`"
        wait_until(lambda: "0" in column("params.`run.seed`"), 60, "the seed column's values")
        assert column("tags.`relift.algorithm`")[0] == "relift.algorithm"
        assert {"relift", "rl"} <= set(column("tags.`relift.algorithm`"))
        assert column("params.`run.seed`")[0] == "run.seed"
        scores = column(held_out)
        assert scores[0] == "heldout/world/avg_at_k", scores
        # A run's score, or a group's "0.51 (average)"; "-" where a row has none (the sweep's
        # parent, in the group of runs without a method).
        values = [float(v.split()[0]) for v in scores[1:] if v[:1].isdigit()]
        assert len(values) >= 2 and all(0.0 <= v <= 1.0 for v in values), scores
