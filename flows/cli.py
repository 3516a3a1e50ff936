"""The `relift` command line. Heavy imports (torch, Prefect, MLflow) happen inside commands so
`relift --help` stays instant.

A bad config, bad data, a diverged run or a refused checkpoint is reported as one line, the
error's message, and a non-zero exit (2 for a config, 1 otherwise); `--debug` (anywhere on the
command line) shows the full traceback instead. The config is validated before any flow runs,
so a wrong one is reported before a Prefect server starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from relift_core.errors import user_error_exit_code  # imports nothing: the CLI starts fast
from tasks.progress import HideRoutineTaskStates  # imports only rich: the CLI starts fast

app = typer.Typer(
    help="ReLIFT experiment platform: RL interleaved with online fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

_debug = False
_verbose = False


def one_line(exc: BaseException) -> str:
    """The error's message on one line: a multi-line ConfigError becomes 'head: item; item'."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    head, rest = lines[0], lines[1:]
    return head + (" " + "; ".join(rest) if rest else "")


class _HideUserErrorTracebacks(logging.Filter):
    """On Prefect's console handlers (not its API handler: the UI keeps every traceback): drop
    the records that carry a user error's traceback; the CLI prints the message once."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or user_error_exit_code(exc) is None


def quiet_prefect_tracebacks() -> None:
    """Unless --debug: attach _HideUserErrorTracebacks (and HideRoutineTaskStates) to
    Prefect's console handlers."""
    if _debug:
        return
    # Prefect's console handler sits on the root logger; flow and task run loggers propagate.
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            is_console = isinstance(handler, logging.StreamHandler) and type(
                handler
            ).__module__.startswith("prefect.")
            if is_console and not any(
                isinstance(f, _HideUserErrorTracebacks) for f in handler.filters
            ):
                handler.addFilter(_HideUserErrorTracebacks())
                handler.addFilter(HideRoutineTaskStates())


def validated_config(preset: str, overrides: list[str] | None):
    """load_config, before any flow (and so any Prefect server) starts; raises ConfigError."""
    from relift_core.config import load_config

    return load_config(preset, overrides or [])


def checked_before_servers(cfg, points: list | None = None) -> None:
    """The training rows, the settings only the data can refute and the benchmarks, before a
    Prefect server starts (relift_core.data.preflight), for `cfg` and for each config in
    `points` (a sweep's); warnings are printed, one line each, once."""
    from relift_core.data.preflight import preflight

    rows: dict[str, list] = {}  # the world's training rows, per world config
    warnings: list[str] = []
    for each in [cfg, *(points or [])]:
        world = None
        if each.data.world is not None:  # the generated world's rows, as preparation's
            key = each.data.world.model_dump_json()
            if key not in rows:
                from relift_core.data.examples import examples_from_records
                from relift_core.proofworld.problems import build_world, problem_to_record

                world_cfg = each.data.world.model_copy(update={"pretrain_examples": 0})
                rows[key] = examples_from_records(
                    [
                        problem_to_record(p, index=i)
                        for i, p in enumerate(build_world(world_cfg)["train"])
                    ],
                    origin="data.world",
                )
            world = rows[key]
        warnings += [w for w in preflight(each, world) if w not in warnings]
    for warning in warnings:
        err_console.print(
            f"warning: {warning}", style="yellow", markup=False, highlight=False, soft_wrap=True
        )


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="show full tracebacks of errors")] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="show the libraries' output too (Prefect, MLflow, transformers: logs, "
            "warnings, progress bars); otherwise train, sweep, evaluate, dynamics and demo "
            "send it to <workdir>/logs/<command>-<time>.log",
        ),
    ] = False,
) -> None:
    global _debug, _verbose
    _debug = debug or _debug_from_env()
    _verbose = verbose


def _debug_from_env() -> bool:
    return os.environ.get("RELIFT_DEBUG", "") not in ("", "0")


@contextlib.contextmanager
def library_output_to_log(workdir: str, command: str) -> Iterator[Path | None]:
    """Unless --verbose: the terminal shows the command's own lines only (`console`,
    `err_console`, tasks.progress), and everything else the process and its children write --
    Prefect's and MLflow's console logs, Python warnings, transformers' progress bars -- goes to
    `<workdir>/logs/<command>-<time>.log` (yielded). Descriptors 1 and 2 themselves are pointed
    at the file, so Prefect's worker processes (spawned, inheriting them), the grader's and the
    temporary server's write there too, whatever logging setup each makes. Prefect's API log
    handler is untouched: the UI keeps every log. Restored before an error leaves the block, so
    its `error:` line or traceback reaches the terminal."""
    if _verbose:
        yield None
        return
    log_dir = Path(workdir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = [os.fdopen(fd, "w", buffering=1, closefd=False) for fd in saved]
    try:
        with open(path, "a", buffering=1) as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            console.file, err_console.file = terminal
            try:
                yield path
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                console.file = err_console.file = None  # rich: sys.stdout / sys.stderr again
    finally:
        for stream in terminal:
            stream.close()
        for fd in saved:
            os.close(fd)


@contextlib.contextmanager
def command_console(workdir: str, command: str, headline: str) -> Iterator[str | None]:
    """The console of every command that runs a flow (train, sweep, evaluate, dynamics, demo):
    a first line, `headline` and where the libraries' output goes (library_output_to_log), then
    our own lines only (tasks.progress: a line per iteration or finished step, transient bars
    for long phases) while the block runs on a Prefect API (flows.temporary_server.prefect_api;
    yields the temporary server's API URL, or None). The command prints its result after the
    block, once, when the terminal is the command's alone again."""
    import prefect  # noqa: F401 - its logging setup made, before its handlers are filtered

    from flows.temporary_server import prefect_api
    from tasks.progress import terminal_progress

    quiet_prefect_tracebacks()
    with library_output_to_log(workdir, command) as log:
        console.print(
            headline + (f"; logs: {log}" if log else ""),
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
        with (
            prefect_api(workdir) as temporary_server,
            terminal_progress(console if log else None),
        ):
            yield temporary_server


def print_result(text: str) -> None:
    """A command's result, verbatim: unwrapped (a table row broken at the terminal's width is
    no longer a table row), no markup, no highlighting."""
    console.print(text, soft_wrap=True, markup=False, highlight=False)


PresetOpt = Annotated[
    str, typer.Option("--preset", "-p", help="a preset name in configs/ or a YAML file")
]
Overrides = Annotated[list[str] | None, typer.Argument(help="dotted overrides, e.g. rl.lr=1e-5")]


@app.command()
def presets() -> None:
    """List the config presets."""
    from relift_core.config import list_presets

    for name in list_presets():
        console.print(name)


@app.command()
def config(preset: PresetOpt = "toy", overrides: Overrides = None) -> None:
    """Print the resolved config of a preset with overrides (validates it)."""
    cfg = validated_config(preset, overrides)
    # Verbatim: no wrapping, markup or highlighting, so the output is the YAML itself.
    console.print(cfg.to_yaml(), soft_wrap=True, markup=False, highlight=False)


@app.command()
def plan(preset: PresetOpt = "toy", overrides: Overrides = None) -> None:
    """Per-GPU memory of a preset (weights, gradients, optimizer, activations, vLLM share) on
    its cluster, and the fewest GPUs it fits on. `train` refuses a config that does not fit."""
    from relift_core.runtime.memory_plan import render_plan

    console.print(
        render_plan(validated_config(preset, overrides), preset), highlight=False, soft_wrap=True
    )


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@app.command()
def train(preset: PresetOpt = "toy", overrides: Overrides = None) -> None:
    """Train one run (ReLIFT or a baseline: algorithm.name=rl|sft|relift|sft_then_rl|luffy|dapo)."""
    from relift_core.runtime.memory_plan import check_fits

    cfg = validated_config(preset, overrides)
    check_fits(cfg)
    checked_before_servers(cfg)
    from flows.train import train as train_flow

    headline = (
        f"train: {cfg.run.name} ({cfg.algorithm.name}, {cfg.run.iterations} iterations, "
        f"preset {preset})"
    )
    with command_console(cfg.run.workdir, "train", headline) as temporary_server:
        result = train_flow(preset=preset, overrides=overrides or [])
    print_result(train_summary(result, ui_hint=_ui_hint(cfg.run.workdir, temporary_server)))


def _ui_hint(workdir: str, temporary_server: str | None) -> str:
    """After a command that ran on a temporary Prefect server: the links are those of the
    UI `relift ui` serves for this work directory (its database keeps the flow runs)."""
    if temporary_server is None:
        return ""
    flag = "" if Path(workdir) == Path("runs") else f" --workdir {workdir}"
    return f"(open them with `relift ui{flag}`)"


def train_summary(result: dict, ui_hint: str = "") -> str:
    """What a finished `train` prints: held-out accuracy per benchmark, demonstrations used,
    and where to look: the MLflow run and the Prefect flow run, in UIs that outlive the
    command (`ui_hint` says how to open them when nothing serves them now)."""
    scores = []
    for name, summary in (result.get("eval") or {}).items():
        if isinstance(summary.get("avg_at_k"), (int, float)):
            scores.append(f"{name} avg@{summary.get('k', '?')} {summary['avg_at_k']:.3f}")
    held_out = ", ".join(scores) if scores else "(no evaluation)"
    lines = [
        f"{result['run_name']}: held-out {held_out}; demonstrations used {result['demos_used']}",
        f"MLflow  {result.get('mlflow_url') or result['mlflow_run_id']}",
        f"Prefect {result.get('prefect_url')}",
    ]
    return "\n".join(lines + ([ui_hint] if ui_hint else []))


@app.command()
def demo(
    preset: PresetOpt = "toy",
    algorithms: Annotated[str, typer.Option(help="comma-separated")] = "rl,sft,relift",
    seeds: Annotated[
        str | None,
        typer.Option(help="comma-separated run seeds, e.g. 0,1,2 (default: the config's run.seed)"),
    ] = None,
    overrides: Overrides = None,
) -> None:
    """The proof-world: pretrain a base model, train RL, SFT and ReLIFT from it, compare with
    bootstrap confidence intervals over held-out questions and seeds."""
    import time

    cfg = validated_config(preset, overrides)
    checked_before_servers(cfg)
    from flows.demo import demo as demo_flow
    from relift_core.proofworld.report import BASE_METHOD

    start = time.perf_counter()
    trained = [a for a in _csv(algorithms) or [] if a != BASE_METHOD]
    methods = ", ".join([BASE_METHOD, *trained])
    headline = f"demo: {methods} on the {preset} world, seeds {seeds or cfg.run.seed}"
    with command_console(cfg.run.workdir, "demo", headline):
        result = demo_flow(
            preset=preset,
            overrides=overrides or [],
            algorithms=_csv(algorithms),
            seeds=[int(s) for s in _csv(seeds)] if seeds else None,
        )
    print_result(
        f"{result['markdown'].rstrip()}\n\n"
        f"results: {result['results_path']}\nfigure: {result['figure']}\n"
        f"MLflow parent run {result['mlflow_run_id']}, total {time.perf_counter() - start:.0f}s"
    )


@app.command()
def dynamics(
    checkpoint: Annotated[str, typer.Option(help="a trained policy directory")],
    preset: PresetOpt = "toy",
    base: Annotated[
        str | None, typer.Option(help="starting policy dir (default: the preset's)")
    ] = None,
    overrides: Overrides = None,
) -> None:
    """Difficulty transitions of every training question: base model vs a checkpoint."""
    cfg = validated_config(preset, overrides)
    from flows.difficulty_dynamics import difficulty_dynamics

    headline = (
        f"dynamics: levels of preset {preset}'s training questions, "
        f"{base or 'its base policy'} vs {checkpoint}"
    )
    with command_console(cfg.run.workdir, "dynamics", headline):
        result = difficulty_dynamics(
            preset=preset, checkpoint=checkpoint, base=base, overrides=overrides or []
        )
    import pandas as pd

    print_result(
        "difficulty levels (rows: base, columns: trained)\n"
        + pd.DataFrame(result["table"]).to_string()
    )


@app.command()
def evaluate(
    model: Annotated[str, typer.Option(help="a preset whose model to evaluate")] = "smollm2-135m",
    checkpoint: Annotated[str | None, typer.Option(help="a saved policy directory instead")] = None,
    benchmarks: Annotated[
        str | None, typer.Option(help="comma-separated, e.g. math500,gpqa_diamond")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="questions per benchmark")] = None,
    overrides: Overrides = None,
) -> None:
    """Evaluate a model or checkpoint on benchmarks; prints the table, logs to MLflow."""
    cfg = validated_config(model, overrides)
    from relift_core.data.preflight import check_benchmarks

    # The benchmarks exist before a server starts (the training data is not read here).
    check_benchmarks(
        cfg.model_copy(
            update={
                "eval": cfg.eval.model_copy(
                    update={"benchmarks": _csv(benchmarks) or cfg.eval.benchmarks}
                )
            }
        )
    )
    from flows.evaluate import evaluate as evaluate_flow
    from relift_core.grading.evaluation import markdown_table

    headline = (
        f"evaluate: {checkpoint or model} on {', '.join(_csv(benchmarks) or cfg.eval.benchmarks)}"
        + (f", {limit} questions each" if limit else "")
    )
    with command_console(cfg.run.workdir, "evaluate", headline):
        result = evaluate_flow(
            preset=model,
            overrides=overrides or [],
            checkpoint=checkpoint,
            benchmarks=_csv(benchmarks),
            limit=limit,
        )
    print_result(markdown_table(result["summaries"]) + f"\nMLflow run {result['mlflow_run_id']}")


@app.command()
def sweep(
    preset: PresetOpt = "toy",
    algorithms: Annotated[str, typer.Option(help="comma-separated")] = "rl,sft,relift",
    seeds: Annotated[str, typer.Option(help="comma-separated")] = "0",
    grid: Annotated[list[str] | None, typer.Option(help="key=v1,v2 (repeatable)")] = None,
    name: Annotated[str, typer.Option(help="sweep name")] = "sweep",
    deployment: Annotated[
        str | None,
        typer.Option(
            help="a `train` deployment (e.g. train/train): each point becomes a flow run of it, "
            "run by that work pool's workers in parallel"
        ),
    ] = None,
    overrides: Overrides = None,
) -> None:
    """Algorithms x seeds x grid values as child runs under one MLflow parent run."""
    import yaml

    base_cfg = validated_config(preset, overrides)
    from flows.sweep import point_name, sweep_points, sweep_prefix
    from flows.sweep import sweep as sweep_flow

    if deployment and not os.environ.get("PREFECT_API_URL"):
        console.print(
            "error: --deployment needs PREFECT_API_URL set to the Prefect server whose "
            'workers run the deployment (README "Scaling out")'
        )
        raise typer.Exit(2)
    grid_dict = {}
    for item in grid or []:
        key, _, values = item.partition("=")
        grid_dict[key] = [yaml.safe_load(v) for v in values.split(",")]
    seed_list = [int(s) for s in _csv(seeds) or ["0"]]
    prefix = sweep_prefix(name, validated_config(preset, overrides), sorted(grid_dict))
    # Every point's config, as the sweep will build it, before the first one runs.
    points = [
        validated_config(
            preset,
            list(overrides or [])
            + [f"{k}={v}" for k, v in point.items()]
            + [f"run.name={point_name(prefix, point)}"],
        )
        for point in sweep_points(_csv(algorithms) or ["rl", "sft", "relift"], seed_list, grid_dict)
    ]
    checked_before_servers(validated_config(preset, overrides), points)
    headline = f"sweep {prefix}: {len(points)} runs of preset {preset}" + (
        f", as flow runs of {deployment}" if deployment else ""
    )
    with command_console(base_cfg.run.workdir, "sweep", headline) as temporary_server:
        result = sweep_flow(
            preset=preset,
            algorithms=_csv(algorithms),
            seeds=seed_list,
            grid=grid_dict,
            overrides=overrides or [],
            name=name,
            train_deployment=deployment,
        )
    hint = _ui_hint(base_cfg.run.workdir, temporary_server)
    print_result(
        f"{result['comparison']}\n"
        f"MLflow parent run ({len(result['runs'])} runs): {result['mlflow_url']}\n"
        f"Runs by method: {result['runs_view_url']}" + (f"\n{hint}" if hint else "")
    )


@app.command()
def compare(
    preset: PresetOpt = "toy",
    parent: Annotated[str | None, typer.Option(help="only the children of this MLflow run")] = None,
    out: Annotated[
        str | None, typer.Option(help="report directory (default <workdir>/compare)")
    ] = None,
    overrides: Overrides = None,
) -> None:
    """RL vs SFT vs ReLIFT from MLflow: held-out accuracy per algorithm (mean and 95%
    t-interval over seeds), and a report with training curves and per-level shares."""
    from pathlib import Path

    from rich.table import Table

    from analysis.compare import runs_table, short_table, write_report
    from tasks.tracking import tracking_uri

    cfg = validated_config(preset, overrides)
    uri = tracking_uri(cfg)
    df = runs_table(uri, cfg.tracking.experiment, parent_run_id=parent)
    if df.empty:
        console.print(f"no training runs in {uri}")
        raise typer.Exit(1)
    summary = short_table(df)
    table = Table(title=f"{len(df)} runs (mean over seeds, 95% t-interval)")
    for col in summary.columns:
        table.add_column(str(col), no_wrap=True)
    for row in summary.itertuples(index=False):
        table.add_row(*map(str, row))
    console.print(table)
    paths = write_report(
        uri,
        Path(out) if out else Path(cfg.run.workdir) / "compare",
        cfg.tracking.experiment,
        parent_run_id=parent,
    )
    console.print(f"report: {paths['report']}")


@app.command()
def deploy(
    pool: Annotated[
        str, typer.Option(help="the process work pool prefect.yaml names")
    ] = "relift-local",
    workdir: Annotated[
        str,
        typer.Option(
            help="the work directory whose `relift ui` serves the "
            "Prefect API, when PREFECT_API_URL is not set"
        ),
    ] = "runs",
) -> None:
    """Create the work pool, deploy prefect.yaml (train, evaluate, the weekly sweep) to the
    configured Prefect API (PREFECT_API_URL, or the work directory's running `relift ui`), and
    print how to start a worker that runs them."""
    import subprocess

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    from tasks.running_ui import running_ui

    api = PREFECT_API_URL.value()
    if not api:
        ui_info = running_ui(workdir)
        if ui_info is None:
            err_console.print(
                f"error: no Prefect API to deploy to: set PREFECT_API_URL, or start "
                f"`relift ui --workdir {workdir}` first",
                style="red",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2)
        api = ui_info["api"]
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PREFECT_API_URL": api, "RELIFT_REPO_DIR": str(repo)}
    prefect = str(Path(sys.executable).parent / "prefect")

    def run(*args: str) -> None:
        done = subprocess.run(
            [prefect, *args], cwd=repo, env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            err_console.print(
                f"error: prefect {' '.join(args)} failed:\n{done.stdout}{done.stderr}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1)

    os.environ["PREFECT_API_URL"] = api
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            console.print(f"work pool {pool}: exists", highlight=False)
        except ObjectNotFound:
            run("work-pool", "create", pool, "--type", "process")
            console.print(f"work pool {pool}: created (process)", highlight=False)
    run("--no-prompt", "deploy", "--all")
    with get_client(sync_client=True) as client:
        deployments = client.read_deployments()
        flows = {f.id: f.name for f in client.read_flows()}
    ui_url = api.removesuffix("/api")
    console.print(
        "deployed: "
        + ", ".join(sorted(f"{flows.get(d.flow_id, '?')}/{d.name}" for d in deployments)),
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"Deployments: {ui_url}/deployments\n"
        f"Start a worker (it runs their flow runs):\n"
        f"  PREFECT_API_URL={api} RELIFT_REPO_DIR={repo} prefect worker start --pool {pool}",
        highlight=False,
        soft_wrap=True,
    )


def prefect_server_command(port: int) -> list[str]:
    """`prefect server start` on 127.0.0.1:`port`, with this environment's Prefect: the server
    `relift ui` runs (the end-to-end tests start theirs with it too)."""
    prefect = str(Path(sys.executable).parent / "prefect")
    return [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]


@app.command()
def ui(
    workdir: Annotated[
        str, typer.Option(help="the runs directory holding mlflow.db and prefect.db")
    ] = "runs",
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
) -> None:
    """Start the Prefect UI and the MLflow UI on 127.0.0.1 for a work directory's runs (Ctrl-C
    or SIGTERM stops both). While it runs, commands on that work directory report to it."""
    import json
    import signal
    import subprocess

    from flows.temporary_server import database_env, prefect_database, stop_process
    from tasks.running_ui import UI_FILE
    from tasks.tracking import runs_views_in_store

    def _stop(signum, frame):
        raise KeyboardInterrupt  # SIGTERM stops the servers exactly as Ctrl-C does

    signal.signal(signal.SIGTERM, _stop)

    bindir = Path(sys.executable).parent
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    db = work / "mlflow.db"
    prefect_ui = f"http://127.0.0.1:{prefect_port}"
    # Prefect's API answers cross-origin requests from any site by default; only its own UI here.
    prefect_env = {
        **os.environ,
        **database_env(prefect_database(work)),
        "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": prefect_ui,
        # The UI's pages call this API (by default :4200, whatever port serves them).
        "PREFECT_UI_API_URL": f"{prefect_ui}/api",
    }
    procs = [
        subprocess.Popen(prefect_server_command(prefect_port), env=prefect_env),
        subprocess.Popen(
            [
                str(bindir / "mlflow"),
                "ui",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--backend-store-uri",
                f"sqlite:///{db}",
            ]
        ),
    ]
    ui_file = work / UI_FILE
    ui_file.write_text(
        json.dumps(
            {
                "api": f"{prefect_ui}/api",
                "ui": prefect_ui,
                "mlflow": f"http://127.0.0.1:{mlflow_port}",
                "pid": os.getpid(),
            }
        )
    )
    views = "".join(
        f"\nRuns by method ({name}): {url}"
        for name, url in runs_views_in_store(db, f"http://127.0.0.1:{mlflow_port}")
    )
    console.print(
        f"Prefect UI {prefect_ui}  MLflow UI http://127.0.0.1:{mlflow_port}{views}\n"
        f"Commands on {workdir} report to this Prefect server while it runs; "
        f"elsewhere: PREFECT_API_URL={prefect_ui}/api\n"
        f"Deployments: {prefect_ui}/deployments (after `relift deploy`)",
        highlight=False,
        soft_wrap=True,
    )
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt:
        pass
    finally:
        ui_file.unlink(missing_ok=True)
        for p in procs:
            stop_process(p, grace_s=20)


# A lost server must end a command within a minute, not after MLflow's 7 retries with a factor-2
# backoff (577 s were seen) or Prefect's 5: set unless the user sets them.
BOUNDED_SERVER_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",  # 1 + 2 + 4 s of backoff
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "PREFECT_CLIENT_MAX_RETRIES": "2",
}
# How long Prefect may take, once a command ends, to send the logs and events it still queues.
# It drains them at exit with no deadline: with its server gone (killed, or a temporary server
# stopped by the same Ctrl-C) the process never ended, retrying one queued event every 7 s.
PREFECT_DRAIN_S = 3.0  # each of its two queues


def lost_server(exc: BaseException) -> str | None:
    """One line for an error that is a server gone away, naming the server; else None."""
    seen: BaseException | None = exc
    while seen is not None:
        name, text = type(seen).__name__, str(seen)
        if name == "MlflowException" and "API request to" in text:
            return f"lost the MLflow tracking server: {one_line(seen)[:300]}"
        module = type(seen).__module__
        if module.startswith(("httpx", "httpcore")) or name == "PrefectHTTPStatusError":
            url = os.environ.get("PREFECT_API_URL", "?")
            return f"lost the Prefect server at {url}: {name}: {one_line(seen)[:200]}"
        seen = seen.__cause__ or seen.__context__
    return None


def _prefect_drained(timeout_s: float) -> bool:
    """Whether the logs and events Prefect still queues were sent within `timeout_s`."""
    if "prefect" not in sys.modules:
        return True
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    pending = False
    for worker in (APILogWorker, EventsWorker):
        try:
            _, not_done = worker.drain_all(timeout=timeout_s)
        except Exception:  # noqa: BLE001 - shutting down: what is not sent is lost, not fatal
            not_done = True
        pending = pending or bool(not_done)
    return not pending


def _end_children(grace_s: float) -> None:
    """SIGTERM to every process this one started (and theirs), SIGKILL to those still there
    after `grace_s`."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


# After SIGINT or SIGTERM a command has this long to mark its runs FAILED and stop cleanly;
# then it ends its own processes and exits anyway. `demo` joined its process pool's workers
# after Ctrl-C while they retried a dead server: no exit after 4 minutes nor a second Ctrl-C.
INTERRUPT_GRACE_S = 20.0
_interrupted = threading.Event()


def _exit_after_grace(code: int) -> None:
    time.sleep(INTERRUPT_GRACE_S)
    err_console.print(
        f"warning: still running {INTERRUPT_GRACE_S:.0f} s after the signal; ending its processes",
        markup=False,
        highlight=False,
    )
    _end_children(grace_s=5.0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _start_exit_deadline(signum: int) -> None:
    if not _interrupted.is_set():
        _interrupted.set()
        threading.Thread(
            target=_exit_after_grace, args=(128 + signum,), daemon=True, name="relift-exit-deadline"
        ).start()


def _interrupt(signum, frame) -> None:
    """SIGINT and SIGTERM: KeyboardInterrupt (runs are marked FAILED on the way out), and a
    deadline for the whole process (INTERRUPT_GRACE_S)."""
    _start_exit_deadline(signum)
    raise KeyboardInterrupt


def _deadline_under_prefects_sigterm_handler() -> None:
    """While a flow runs, Prefect's engine (prefect.utilities.engine.capture_sigterm) replaces
    the SIGTERM handler with its own, which raises TerminationSignal, and calls the previous
    one only once that exception has left the flow engine. `demo`'s engine first shuts its
    process pool down, waiting for trainings that run for minutes: SIGTERM to the command
    alone left it running. Prefect's handler, looked up by name each time a flow starts, is
    wrapped so that the deadline starts as the signal arrives."""
    from prefect.utilities import engine

    prefects = getattr(engine, "_prefect_sigterm_handler", None)
    if prefects is None or getattr(prefects, "relift_deadline", False):
        return

    def handler(signum: int, *args: object):
        _start_exit_deadline(signum)
        return prefects(signum, *args)

    handler.relift_deadline = True  # type: ignore[attr-defined]
    engine._prefect_sigterm_handler = handler  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    """The `relift` entry point: runs the command; a user error (relift_core.errors) or a lost
    server prints one line and exits non-zero unless --debug (or RELIFT_DEBUG=1) asks for the
    traceback. SIGTERM and SIGINT end it within seconds (see PREFECT_DRAIN_S)."""
    import signal

    global _debug
    args = list(sys.argv[1:] if argv is None else argv)
    _debug = "--debug" in args or _debug_from_env()
    # --debug is an option of the app, so it must come before the command; accept it anywhere,
    # --verbose too.
    app_options = [o for o in ("--debug", "--verbose") if o in args]
    args = app_options + [a for a in args if a not in app_options]
    for key, value in BOUNDED_SERVER_RETRIES.items():
        os.environ.setdefault(key, value)
    if argv is None:  # the process's own entry point, not a test calling main()
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)
        _deadline_under_prefects_sigterm_handler()
    code = 1
    try:
        app(args=args, prog_name="relift")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    except Exception as exc:  # sorted into user errors, lost servers and bugs here
        user_code = user_error_exit_code(exc)
        line = one_line(exc) if user_code is not None else lost_server(exc)
        if line is None or _debug:
            if argv is None:
                # A bug: its traceback, printed here because os._exit below ends the process
                # before Python would print it (a failed demo exited with no word at all).
                traceback.print_exc()
            raise
        code = user_code or 1
        err_console.print(
            f"error: {line}", style="red", markup=False, highlight=False, soft_wrap=True
        )
        sys.exit(code)
    finally:
        if argv is None:
            drained = _prefect_drained(PREFECT_DRAIN_S)
            if not drained:
                err_console.print(
                    f"warning: Prefect's server did not take its last logs and "
                    f"events within {2 * PREFECT_DRAIN_S:.0f} s; exiting without "
                    "them",
                    markup=False,
                    highlight=False,
                )
            if code != 0 or not drained:
                # An interrupted or failed command does not wait on the interpreter's exit: a
                # process pool joins its workers there, and `demo`'s were still retrying a dead
                # server minutes after Ctrl-C. Its own children end with it.
                _end_children(grace_s=5.0)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)


if __name__ == "__main__":
    main()
