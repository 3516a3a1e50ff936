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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
