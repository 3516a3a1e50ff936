"""MLflow behind the core's Tracker protocol, plus the embedded-default store.

With nothing set, runs go to `sqlite:///<workdir>/mlflow.db` with artifacts in
`<workdir>/mlartifacts` (open with `relift ui`). `MLFLOW_TRACKING_URI` (or
`tracking.mlflow_uri`) points everything at a real server instead.

The client API with explicit run ids is used throughout (not the fluent "active run"), because
Prefect may run tasks in other threads and sweeps keep several runs open at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

from relift_core.config import ExperimentConfig, benchmark_logged_name, experiment_hash

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


def tracking_uri(cfg: ExperimentConfig) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    return f"sqlite:///{Path(cfg.run.workdir).resolve() / 'mlflow.db'}"


def artifact_root(cfg: ExperimentConfig) -> str | None:
    """Local artifacts beside the embedded store; a real server decides its own."""
    if tracking_uri(cfg).startswith("sqlite:///"):
        return (Path(cfg.run.workdir).resolve() / "mlartifacts").as_uri()
    return None


def get_client(cfg: ExperimentConfig) -> MlflowClient:
    # Not mlflow.set_tracking_uri: it exports MLFLOW_TRACKING_URI, which would then pin every
    # later run in this process (a sweep's children, a test's next run) to this store.
    with _embedded_store_lock(cfg):
        relocate_embedded_store(cfg)
        client = MlflowClient(tracking_uri=tracking_uri(cfg))
        # Both stores of the embedded database are created (tables, migrations) here, under the
        # lock: two first runs in one work directory creating them at once failed with
        # `sqlite3.OperationalError: table runs already exists`.
        if tracking_uri(cfg).startswith("sqlite:///"):
            _ = client._tracking_client.store
            _ = client._get_registry_client().store
    return client


@contextlib.contextmanager
def _embedded_store_lock(cfg: ExperimentConfig):
    """An exclusive flock on `<workdir>/mlflow.db.lock` (the kernel releases it if the holder
    dies) while the embedded store is opened; nothing for a tracking server."""
    uri = tracking_uri(cfg)
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# Where the embedded store keeps absolute artifact locations.
_ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)


def relocate_embedded_store(cfg: ExperimentConfig) -> None:
    """Make a moved or copied run store (`runs/` with mlflow.db and mlartifacts/) point at its
    own artifacts. The embedded store records absolute artifact locations; after a move they
    would still read and write the old directory. The experiment's location says where the
    store was; if that is not where it is now, every recorded location is rewritten."""
    uri = tracking_uri(cfg)
    new_root = artifact_root(cfg)
    if not uri.startswith("sqlite:///") or new_root is None:
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.exists():
        return
    import sqlite3

    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con, con:
        tables = {
            row[0] for row in con.execute("select name from sqlite_master where type='table'")
        }
        if "experiments" not in tables:
            return
        roots = {
            loc
            for (loc,) in con.execute("select artifact_location from experiments")
            if loc and loc.startswith("file://") and loc.rstrip("/").endswith("/mlartifacts")
        }
        for old_root in roots - {new_root}:
            for table, column in _ARTIFACT_COLUMNS:
                if table in tables:
                    con.execute(
                        f"update {table} set {column} = ? || substr({column}, ?) "
                        f"where substr({column}, 1, ?) = ?",
                        (new_root, len(old_root) + 1, len(old_root), old_root),
                    )


# The experiment tag MLflow 3's UI reads to choose its view (mlflow/server/js: `experimentKind`);
# `custom_model_development` is its model-training view (runs, metrics, models), not the GenAI
# one (traces, judges) an experiment without it opens in. MLflow 3.17's UI lets its global
# GenAI / Model-training switch (`?workflowType=`, else the browser's last choice, GenAI at
# first) win over the tag, so every link this project prints carries
# `workflowType=machine_learning` as well.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# A saved runs-table view: MLflow 3.17 keeps named views as experiment tags
# `mlflow.sharedViewState.<key>` holding {name, createdAt, updatedAt, state: the table's state as
# JSON} (its savedViewEnvelope); the UI lists them under "Views" and opens one by
# `?viewStateShareKey=<key>`. Ours: method, seed, held-out score and demonstrations as columns,
# runs grouped by method.
RUNS_VIEW_KEY = "relift-methods"
RUNS_VIEW_NAME = "Runs by method"


def runs_view_state(cfg: ExperimentConfig) -> dict[str, Any]:
    """The runs table's state as MLflow's UI stores it (a column is `<type>.` + its name in
    backquotes: tags.`relift.algorithm`)."""
    from tasks.eval_tasks import HELD_OUT

    held_out = [
        f"metrics.`{HELD_OUT}/{benchmark_logged_name(b)}/avg_at_k`" for b in cfg.eval.benchmarks
    ]
    columns = ["tags.`relift.algorithm`", "params.`run.seed`", *held_out, "metrics.`demos_used`"]
    return {
        "selectedColumns": columns,
        # MLflow's table puts metrics before parameters and tags by default, and renders only the
        # columns in view: the order names method and seed first so that they show beside the run
        # name; the held-out columns are widened so that their names are not cut.
        "columnOrder": columns,
        "columnWidths": {column: 220 for column in held_out},
        "groupBy": {
            "aggregateFunction": "average",
            "groupByKeys": [{"mode": "tag", "groupByData": "relift.algorithm"}],
        },
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
    }


def experiment_id(client: MlflowClient, cfg: ExperimentConfig) -> str:
    """The experiment's id, created (or, made by an older version, marked) as a model-training
    experiment, with the runs-table view for this config's benchmarks."""
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        try:
            exp_id = client.create_experiment(
                cfg.tracking.experiment,
                artifact_location=artifact_root(cfg),
                tags=dict([EXPERIMENT_KIND]),
            )
        except mlflow.exceptions.MlflowException:
            # Another run of a sweep created it first.
            exp = client.get_experiment_by_name(cfg.tracking.experiment)
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    tags = exp.tags if exp is not None else dict([EXPERIMENT_KIND])
    if tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
    view_tag, state = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}", json.dumps(runs_view_state(cfg))
    if _saved_view_state(tags.get(view_tag)) != state:
        now = int(time.time() * 1000)
        envelope = {"name": RUNS_VIEW_NAME, "createdAt": now, "updatedAt": now, "state": state}
        client.set_experiment_tag(exp_id, view_tag, json.dumps(envelope))
    return exp_id


def _saved_view_state(tag_value: str | None) -> str | None:
    """The table state inside a saved view's tag; None for no tag or another format."""
    try:
        return json.loads(tag_value)["state"] if tag_value else None
    except (ValueError, KeyError, TypeError):
        return None


def runs_view_url(client: MlflowClient, exp_id: str) -> str:
    """The experiment's runs table with the saved view (method, seed, held-out score)."""
    return _runs_view_address(ui_base(client), exp_id)


def _runs_view_address(base: str, exp_id: str) -> str:
    return (
        f"{base}/#/experiments/{exp_id}/runs?viewStateShareKey={RUNS_VIEW_KEY}"
        "&workflowType=machine_learning"
    )


def runs_views_in_store(db: Path, base: str) -> list[tuple[str, str]]:
    """(experiment name, runs-view address under `base`) for each active experiment of the
    SQLite store `db` that has the saved view. Read with sqlite3, not MLflow's store, which
    would create or upgrade the schema beside a starting `mlflow ui`."""
    if not db.exists():
        return []
    import sqlite3

    query = (
        "select e.experiment_id, e.name from experiments e join experiment_tags t "
        "on t.experiment_id = e.experiment_id "
        "where t.key = ? and e.lifecycle_stage = 'active' order by e.experiment_id"
    )
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            rows = con.execute(query, (f"mlflow.sharedViewState.{RUNS_VIEW_KEY}",)).fetchall()
    except sqlite3.Error:  # not (yet) an MLflow store
        return []
    return [(name, _runs_view_address(base, str(exp_id))) for exp_id, name in rows]


def ui_base(client: MlflowClient) -> str:
    """The MLflow UI of the client's store: a tracking server's own address; for the embedded
    store `<workdir>/mlflow.db`, the work directory's running `relift ui`, else the address it
    serves by default."""
    from tasks.running_ui import running_ui

    uri = client.tracking_uri
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    if uri.startswith("sqlite:///"):
        ui = running_ui(Path(uri.removeprefix("sqlite:///")).parent)
        if ui and ui.get("mlflow"):
            return ui["mlflow"]
    return "http://127.0.0.1:5000"


class MlflowTracker:
    """Implements relift_core.tracker.Tracker for one MLflow run."""

    def __init__(self, client: MlflowClient, run_id: str):
        self._system_metrics = None
        self.client, self.run_id = client, run_id
        self._logged: dict[str, set[int]] = {}  # key -> steps not to log again

    def skip_logged_steps_from(self, step: int) -> None:
        """Metrics already in the run at `step` or later are not logged again. MLflow keeps
        every value logged at a step (the history then holds 0,1,2,0,1,2,3 and the charts two
        points a step), and it has no call to delete one. A resumed run redoes the iterations
        after its checkpoint from that checkpoint's weights, buffer, data position and RNG
        states, so the redone values are the ones the lost attempt logged: keeping the first is
        keeping each step's metrics exactly once."""
        run = self.client.get_run(self.run_id)
        self._logged = {}
        for key in run.data.metrics:
            steps = {
                m.step for m in self.client.get_metric_history(self.run_id, key) if m.step >= step
            }
            if steps:
                self._logged[key] = steps

    def log_params(self, params: dict[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=fresh[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if v is not None and (step or 0) not in self._logged.get(k, ())
        ]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 500])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def start_system_metrics(self, interval_s: float | None) -> None:
        """MLflow's own monitor (CPU, memory, disk, GPU) on a background thread, until close;
        one sample is logged at once and one at close, so a run shorter than the interval
        still has its start and end."""
        if interval_s is None or self._system_metrics is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system_metrics = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=interval_s,
            resume_logging=True,
            tracking_uri=self.client.tracking_uri,
        )
        self._log_system_sample()  # before the thread starts: no sample is shared with it
        self._system_metrics.start()

    def stop_system_metrics(self) -> None:
        if self._system_metrics is not None:
            self._system_metrics.finish()  # joins the thread
            self._log_system_sample()
            self._system_metrics = None

    def _log_system_sample(self) -> None:
        """One sample of every system metric, logged now (the monitor's own collect, aggregate
        and publish steps, as its loop runs them)."""
        monitor = self._system_metrics
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()

    def log_policy(self, model, tokenizer, step: int) -> str:
        """The policy as an MLflow model (transformers flavour, text generation): it appears
        under the run's logged models and can be registered in the model registry. Returns its
        model URI."""
        import mlflow
        import torch
        import transformers
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        # Named after its run (`relift-s1-sweep-...`): the experiment's Models list tells the
        # policies apart. The fluent API logs models into the active run of the global
        # tracking URI: both set for this call only (a global URI left set would pin every later
        # run in the process to this store). Leaving the run ends it; the caller closes it with
        # its status right after.
        with _use_tracking_uri(self.client.tracking_uri), mlflow.start_run(run_id=self.run_id):
            info = mlflow.transformers.log_model(
                {"model": model, "tokenizer": tokenizer},
                name=self.client.get_run(self.run_id).info.run_name,
                task="text-generation",
                step=step,
                # Explicit: inferring them imports every optional module torch knows of.
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    f"transformers=={transformers.__version__}",
                ],
            )
        return info.model_uri

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """A table the MLflow UI previews (and `mlflow.load_table` reads back)."""
        self.client.log_table(self.run_id, data=pd.DataFrame(rows), artifact_file=artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dataset(
        self, df: pd.DataFrame, *, name: str, source: str, digest: str, context: str
    ) -> None:
        """A dataset input with its fingerprint as the digest (the lineage MLflow shows)."""
        dataset = mlflow.data.from_pandas(df, source=source, name=name, digest=digest)
        entity = dataset._to_mlflow_entity()
        tag = InputTag("mlflow.data.context", context)
        self.client.log_inputs(self.run_id, [DatasetInput(entity, [tag])])

    def url(self) -> str:
        run = self.client.get_run(self.run_id)
        # workflowType=machine_learning: the training view even for an experiment made before
        # EXPERIMENT_KIND was set (MLflow 3 opens those in its GenAI view).
        return (
            f"{ui_base(self.client)}/#/experiments/{run.info.experiment_id}/runs/"
            f"{self.run_id}?workflowType=machine_learning"
        )


IDENTITY_TAG = "relift.experiment"  # experiment_hash of the config that made the run
DATA_TAG = "relift.data_fingerprint"  # the prepared training data's fingerprint
KIND_TAG = "relift.kind"  # which flow's own run it is: base_model, demo, evaluate, sweep, ...


def _refuse_other_experiment(cfg: ExperimentConfig, run, data_fingerprint: str | None) -> dict:
    """The differences between the MLflow run `run` and this experiment (config keys, the
    training data); raises ResumeRefused for any unless run.resume=force."""
    from relift_core.runtime.session import DATA_KEY, ResumeRefused

    tags, diffs = run.data.tags, {}
    if tags.get(IDENTITY_TAG) not in (None, experiment_hash(cfg)):
        current = {k: str(v)[:MAX_PARAM_LEN] for k, v in cfg.experiment_params().items()}
        diffs = {
            k: (run.data.params.get(k), v)
            for k, v in current.items()
            if run.data.params.get(k) != v
        } or {"(config)": (tags[IDENTITY_TAG], experiment_hash(cfg))}
    if data_fingerprint and tags.get(DATA_TAG) not in (None, data_fingerprint):
        diffs[DATA_KEY] = (tags[DATA_TAG], data_fingerprint)
    if diffs and cfg.run.resume != "force":
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diffs.items())[:8])
        raise ResumeRefused(
            f"run '{cfg.run.name}' has an MLflow run ({run.info.run_id}) made by another "
            f"experiment ({shown}); choose another run.name, pass run.resume=never to start a "
            "new MLflow run, or run.resume=force to continue this one anyway"
        )
    return diffs


def open_run(
    cfg: ExperimentConfig,
    *,
    run_key: str,
    run_name: str,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    kind: str | None = None,
    known_run_id: str | None = None,
    data_fingerprint: str | None = None,
    start_over: bool = False,
) -> MlflowTracker:
    """The MLflow run for `run_key` (or `known_run_id`, recorded by an earlier attempt): the
    one a crashed attempt left behind, or a new one.

    Resuming a run by name continues its MLflow run too, so one training has one MLflow run
    however many times it was restarted -- but only by the same experiment: a run made with
    another config or other training data (its `relift.experiment` and
    `relift.data_fingerprint` tags) is refused, whether or not checkpoints are on disk, unless
    run.resume=force (the differences are then tagged). `start_over` (run.resume=never) always
    opens a new run. `kind` tags a flow's own run (KIND_TAG); a training run has none.
    """
    client = get_client(cfg)
    exp_id = experiment_id(client, cfg)
    found = []
    if known_run_id and not start_over:
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            found = [client.get_run(known_run_id)]
    if not found and not start_over:
        found = client.search_runs(
            [exp_id],
            filter_string=f"tags.`relift.run_key` = '{run_key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    identity = {IDENTITY_TAG: experiment_hash(cfg)}
    if data_fingerprint:
        identity[DATA_TAG] = data_fingerprint
    if found:
        run_id = found[0].info.run_id
        diffs = _refuse_other_experiment(cfg, found[0], data_fingerprint)
        if found[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        tracker = MlflowTracker(client, run_id)
        if diffs:  # run.resume=force
            tracker.set_tags(
                {
                    "relift.resumed_with_changes": json.dumps(
                        {k: f"{a!r} -> {b!r}" for k, (a, b) in diffs.items()}
                    )[:5000]
                }
            )
        tracker.set_tags(identity)
        return tracker
    all_tags = {"relift.run_key": run_key, **identity, **(tags or {})}
    if kind:
        all_tags[KIND_TAG] = kind
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(exp_id, tags=all_tags, run_name=run_name).info.run_id
    return MlflowTracker(client, run_id)


def close_run(tracker: MlflowTracker, status: str = "FINISHED") -> None:
    try:
        tracker.stop_system_metrics()
    finally:  # the run's status is set even if the monitor's last sample fails
        tracker.client.set_terminated(tracker.run_id, status=status)


@contextlib.contextmanager
def mlflow_run(cfg: ExperimentConfig, **open_kwargs: Any) -> Iterator[MlflowTracker]:
    """`open_run(cfg, **open_kwargs)` for the life of the block: the run ends FINISHED when the
    block completes, FAILED when anything leaves it -- an exception, Ctrl-C (KeyboardInterrupt),
    SIGTERM (SystemExit) -- which is re-raised. Every flow's MLflow run is opened here, so no
    failure leaves one RUNNING."""
    tracker = open_run(cfg, **open_kwargs)
    try:
        yield tracker
    except BaseException:
        close_run(tracker, "FAILED")
        raise
    close_run(tracker, "FINISHED")
