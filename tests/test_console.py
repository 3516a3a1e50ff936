"""What `relift demo` shows on the terminal: its own lines only, the libraries' output (Prefect
and MLflow logs, Python warnings, progress bars, from the process and its children) in a log
file of the work directory, everything back on the terminal with --verbose; the slow test runs
a reduced demo and counts its lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.commands import REPO, own_prefect_env, python_cli, run_command
from tests.conftest import REDUCED_DEMO

# A process that writes the way libraries do: a logging handler on stderr, a Python warning, a
# tqdm-like bar, and a spawned child writing to its inherited stdout; and one line of its own.
_SCRIPT = """
import logging, multiprocessing, sys, warnings
import flows.cli as cli

def child():
    print("child library line 100%|##########|", flush=True)

if __name__ == "__main__":
    cli._verbose = sys.argv[2] == "verbose"
    logging.basicConfig(level=logging.INFO)
    try:
        with cli.library_output_to_log(sys.argv[1], "demo") as log:
            cli.console.print("our line", highlight=False)
            logging.getLogger("prefect.flow_runs").info("View at http://127.0.0.1/runs/1")
            warnings.warn("a library's UserWarning")
            print("Loading weights 50%|#####     |", file=sys.stderr)
            p = multiprocessing.get_context("spawn").Process(target=child)
            p.start(); p.join()
            if sys.argv[2] == "fail":
                raise ValueError("train.jsonl: line 3: not JSON")
    except ValueError as e:  # as flows.cli.main reports a user error, after the block
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    cli.console.print(f"after: {log}", highlight=False, soft_wrap=True)
"""


def _run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "writes.py"  # a file: the spawned child imports its `child`
    script.write_text(_SCRIPT)
    return run_command(
        [sys.executable, str(script), str(tmp_path), mode],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )


def test_library_output_goes_to_the_log_file_and_ours_to_the_terminal(tmp_path):
    done = _run(tmp_path, "quiet")
    assert done.returncode == 0 and done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0] == "our line" and lines[1].startswith("after: ") and len(lines) == 2
    log = Path(lines[1].removeprefix("after: ").strip())
    assert log.parent == tmp_path / "logs" and log.name.startswith("demo-")
    kept = log.read_text()
    for text in ("View at", "UserWarning", "Loading weights", "child library line"):
        assert text in kept, text


def test_an_error_leaving_the_block_still_reaches_the_terminal(tmp_path):
    done = _run(tmp_path, "fail")
    assert done.returncode == 1
    assert done.stdout == "our line\n" and done.stderr == "error: train.jsonl: line 3: not JSON\n"
    [log] = (tmp_path / "logs").glob("demo-*.log")
    assert "UserWarning" in log.read_text()


def test_a_bug_ends_the_command_with_its_traceback_not_silently(tmp_path):
    # main() ends a failed command with os._exit (its worker pools must not be joined), which
    # comes before Python would print an uncaught exception's traceback.
    script = (
        "import flows.cli as cli\n"
        "def app(**_):\n"
        "    raise RuntimeError('training rl-s0: a bug, not a user error')\n"
        "cli.app = app\n"
        "cli.main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "RuntimeError: training rl-s0: a bug, not a user error" in done.stderr


def test_verbose_keeps_everything_on_the_terminal(tmp_path):
    done = _run(tmp_path, "verbose")
    assert done.returncode == 0, done.stderr
    shown = done.stdout + done.stderr
    for text in ("our line", "View at", "UserWarning", "Loading weights", "child library line"):
        assert text in shown, text
    assert "after: None" in done.stdout and not (tmp_path / "logs").exists()


# What no command's console shows: a library's progress bar (tqdm's, rich's), a Python warning,
# Prefect's "View at" and INFO lines.
NOISE = ("%|", "━", "Warning", "View at", "INFO")


def _console_of(command: list[str], workdir: Path) -> tuple[list[str], str]:
    """`relift <command>` as a user runs it (its own temporary Prefect server, a 100-column
    terminal): the lines it showed and its log file, once the checks every command passes
    hold: no noise on the terminal, the first line names the log file, which holds the
    libraries' output, and each line is under 100 columns but for links and paths."""
    done = run_command(
        python_cli(*command, f"run.workdir={workdir}"),
        env=own_prefect_env(COLUMNS="100"),  # its temporary server, as `make demo` runs it
        timeout=3000,
    )
    shown = done.stdout + done.stderr
    assert done.returncode == 0, shown[-3000:]
    print(shown)
    for noise in NOISE:
        assert noise not in shown, noise
    lines = shown.splitlines()
    [log] = (workdir / "logs").glob(f"{command[0]}-*.log")
    assert str(log) in lines[0]
    kept = log.read_text()
    assert "Finished in state Completed" in kept and "View at" in kept
    wide = [
        line
        for line in lines
        if len(line) >= 100 and "http" not in line and str(workdir) not in line
    ]
    assert not wide, wide
    return lines, kept


TABLE_HEADER = "| run | held-out accuracy | 95% bootstrap CI |"


@pytest.mark.slow
def test_demo_prints_its_own_lines_only(tmp_path):
    lines, _ = _console_of(["demo", "-p", "toy", "--seeds", "0", *REDUCED_DEMO], tmp_path)
    assert len(lines) <= 150, len(lines)
    assert "\n".join(lines).count(TABLE_HEADER) == 1
    assert sum("trained (" in line for line in lines) == 4  # base, rl, sft, relift


@pytest.mark.slow
def test_train_prints_a_line_per_iteration_and_its_result(tiny_overrides, tmp_path):
    lines, kept = _console_of(["train", "-p", "toy", *tiny_overrides, "run.name=quiet"], tmp_path)
    # The first line, one per iteration, the result: held-out score, the two links, `relift ui`.
    assert len(lines) <= 1 + 3 + 4, lines
    assert [line.split(":")[0] for line in lines if " iter " in line] == [
        f"quiet iter {i}" for i in range(3)
    ]
    assert sum(line.startswith("quiet: held-out world avg@") for line in lines) == 1
    assert "Writing model shards" in kept  # the checkpoints' bars: in the log, not on the terminal


@pytest.mark.slow
def test_evaluate_prints_its_table_once_in_100_columns(tiny_overrides, tmp_path):
    lines, _ = _console_of(
        ["evaluate", "--model", "toy", "--benchmarks", "world", "--limit", "4", *tiny_overrides],
        tmp_path,
    )
    assert sum(line.startswith("| benchmark | questions |") for line in lines) == 1
    assert [line for line in lines if line.startswith("| world | 4 |")], lines
    assert len(lines) <= 15, lines


@pytest.mark.slow
def test_sweep_prints_a_line_per_point_and_its_comparison_once(tiny_overrides, tmp_path):
    lines, _ = _console_of(
        [
            "sweep",
            "-p",
            "toy",
            "--algorithms",
            "rl,relift",
            "--name",
            "quiet",
            *tiny_overrides,
            "run.iterations=1",
        ],
        tmp_path,
    )
    assert sum(line.startswith("sweep point ") for line in lines) == 2
    assert sum(" iter 0: " in line for line in lines) == 2
    assert sum(line.startswith("| method") for line in lines) == 1
    assert len(lines) <= 40, lines
