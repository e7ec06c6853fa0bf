"""The ``ftdeploy`` command line: parses arguments and calls the library, nothing more.

Errors caused by the user (a bad config, a missing path, a failed gate) print one line and exit
non-zero; only bugs show a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click
import typer

from .errors import FtdeployError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune a pretrained model, compress it, export a verified ONNX file and serve it.")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config, e.g. configs/digits.yaml (default: built-in defaults)")
SetOpt = typer.Option(None, "--set", "-s", help="override a config field: --set train.epochs=3 (repeatable)")
OutOpt = typer.Option(None, "--output-dir", "-o", help="run directory to write (overrides output_dir)")


def _config(config: Optional[Path], overrides: Optional[list[str]], output_dir: Optional[Path]):
    from .config import load_config

    extra = [f"output_dir={output_dir}"] if output_dir is not None else []
    return load_config(config, list(overrides or []) + extra)


@app.command()
def train(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt,
          output_dir: Optional[Path] = OutOpt,
          resume: bool = typer.Option(False, "--resume", help="continue from OUTPUT_DIR/checkpoints/last")) -> None:
    """Fine-tune a pretrained model (the same as ``python -m ftdeploy.train``; works under ``accelerate launch``)."""
    from .train import train as run_train

    out = run_train(_config(config, overrides, output_dir), resume=resume)
    typer.echo(f"run directory: {out}")


@app.command()
def run(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt,
        output_dir: Optional[Path] = OutOpt,
        resume: bool = typer.Option(False, "--resume", help="resume the training stage from its checkpoint")) -> None:
    """Run every stage the config declares (fine-tuning, then export/quantize/prune when configured)."""
    from .pipeline import run_pipeline

    run_pipeline(_config(config, overrides, output_dir), resume=resume)


def main(argv: list[str] | None = None) -> None:
    command = typer.main.get_command(app)
    try:
        command.main(args=argv if argv is not None else sys.argv[1:], prog_name="ftdeploy", standalone_mode=False)
    except FtdeployError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
