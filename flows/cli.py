"""The `relift` command line. Heavy imports (torch, Prefect, MLflow) happen inside commands so
`relift --help` stays instant."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="ReLIFT experiment platform: RL interleaved with online fine-tuning.",
                  no_args_is_help=True, add_completion=False)
console = Console()

PresetOpt = Annotated[str, typer.Option("--preset", "-p", help="a preset name in configs/ or a YAML file")]
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
    from relift_core.config import ConfigError, load_config

    try:
        cfg = load_config(preset, overrides or [])
    except ConfigError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    console.print(cfg.to_yaml())


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@app.command()
def train(preset: PresetOpt = "toy", overrides: Overrides = None) -> None:
    """Train one run (ReLIFT or a baseline: algorithm.name=rl|sft|relift|sft_then_rl)."""
    from flows.train import train as train_flow
    from tasks.progress import terminal_progress

    with terminal_progress():
        result = train_flow(preset=preset, overrides=overrides or [])
    console.print(f"MLflow run {result['mlflow_run_id']}; demonstrations used {result['demos_used']}")


@app.command()
def demo(
    preset: PresetOpt = "toy",
    algorithms: Annotated[str, typer.Option(help="comma-separated")] = "rl,sft,relift",
    overrides: Overrides = None,
) -> None:
    """The proof-world: pretrain a base model, train RL, SFT and ReLIFT from it, compare."""
    import time

    from flows.demo import demo as demo_flow
    from tasks.progress import terminal_progress

    start = time.perf_counter()
    with terminal_progress():
        result = demo_flow(preset=preset, overrides=overrides or [], algorithms=_csv(algorithms))
    console.print(result["markdown"])
    console.print(f"\nfigure: {result['figure']}  MLflow parent run: {result['mlflow_run_id']}  "
                  f"total {time.perf_counter() - start:.0f}s")


@app.command()
def dynamics(
    checkpoint: Annotated[str, typer.Option(help="a trained policy directory")],
    preset: PresetOpt = "toy",
    base: Annotated[str | None, typer.Option(help="starting policy dir (default: the preset's)")] = None,
    overrides: Overrides = None,
) -> None:
    """Difficulty transitions of every training question: base model vs a checkpoint."""
    from flows.difficulty_dynamics import difficulty_dynamics

    result = difficulty_dynamics(preset=preset, checkpoint=checkpoint, base=base,
                                 overrides=overrides or [])
    import pandas as pd

    console.print(pd.DataFrame(result["table"]).to_string())


@app.command()
def evaluate(
    model: Annotated[str, typer.Option(help="a preset whose model to evaluate")] = "smollm2-135m",
    checkpoint: Annotated[str | None, typer.Option(help="a saved policy directory instead")] = None,
    benchmarks: Annotated[str | None, typer.Option(help="comma-separated, e.g. math500,gpqa_diamond")] = None,
    limit: Annotated[int | None, typer.Option(help="questions per benchmark")] = None,
    overrides: Overrides = None,
) -> None:
    """Evaluate a model or checkpoint on benchmarks; prints the table, logs to MLflow."""
    from flows.evaluate import evaluate as evaluate_flow
    from relift_core.evaluation import markdown_table
    from tasks.progress import terminal_progress

    with terminal_progress():
        result = evaluate_flow(preset=model, overrides=overrides or [], checkpoint=checkpoint,
                               benchmarks=_csv(benchmarks), limit=limit)
    console.print(markdown_table(result["summaries"]))
    console.print(f"MLflow run {result['mlflow_run_id']}")


@app.command()
def sweep(
    preset: PresetOpt = "toy",
    algorithms: Annotated[str, typer.Option(help="comma-separated")] = "rl,sft,relift",
    seeds: Annotated[str, typer.Option(help="comma-separated")] = "0",
    grid: Annotated[list[str] | None, typer.Option(help="key=v1,v2 (repeatable)")] = None,
    name: Annotated[str, typer.Option(help="sweep name")] = "sweep",
    overrides: Overrides = None,
) -> None:
    """Algorithms x seeds x grid values as child runs under one MLflow parent run."""
    import yaml

    from flows.sweep import sweep as sweep_flow
    from tasks.progress import terminal_progress

    grid_dict = {}
    for item in grid or []:
        key, _, values = item.partition("=")
        grid_dict[key] = [yaml.safe_load(v) for v in values.split(",")]
    with terminal_progress():
        result = sweep_flow(preset=preset, algorithms=_csv(algorithms),
                            seeds=[int(s) for s in _csv(seeds) or ["0"]], grid=grid_dict,
                            overrides=overrides or [], name=name)
    console.print(f"MLflow parent run {result['mlflow_run_id']}: {len(result['runs'])} runs")


@app.command()
def compare(
    preset: PresetOpt = "toy",
    parent: Annotated[str | None, typer.Option(help="only the children of this MLflow run")] = None,
    overrides: Overrides = None,
) -> None:
    """A table of RL vs SFT vs ReLIFT runs, read from MLflow."""
    from rich.table import Table

    from analysis.compare import runs_table
    from relift_core.config import load_config
    from tasks.tracking import tracking_uri

    cfg = load_config(preset, overrides or [])
    df = runs_table(tracking_uri(cfg), cfg.tracking.experiment, parent_run_id=parent)
    if df.empty:
        console.print(f"no training runs in {tracking_uri(cfg)}")
        raise typer.Exit(1)
    table = Table(title=f"runs in {tracking_uri(cfg)}")
    for col in df.columns:
        table.add_column(str(col))
    for _, row in df.iterrows():
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)


@app.command()
def ui(
    workdir: Annotated[str, typer.Option(help="the runs directory holding mlflow.db")] = "runs",
    prefect_port: int = 4200, mlflow_port: int = 5000,
) -> None:
    """Start the Prefect UI and the MLflow UI on 127.0.0.1 (Ctrl-C stops both)."""
    import subprocess
    import sys
    from pathlib import Path

    bindir = Path(sys.executable).parent
    db = Path(workdir).resolve() / "mlflow.db"
    procs = [
        subprocess.Popen([str(bindir / "prefect"), "server", "start", "--host", "127.0.0.1",
                          "--port", str(prefect_port)]),
        subprocess.Popen([str(bindir / "mlflow"), "ui", "--host", "127.0.0.1", "--port",
                          str(mlflow_port), "--backend-store-uri", f"sqlite:///{db}"]),
    ]
    console.print(f"Prefect UI http://127.0.0.1:{prefect_port}  MLflow UI http://127.0.0.1:{mlflow_port}\n"
                  f"Runs use this Prefect server with PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api")
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
