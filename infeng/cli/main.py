"""`infeng` — one command, one thin module per subcommand.

Errors a user can cause (bad files, options, requests) surface as InfengError or a usage error
and are printed as one line on stderr with a non-zero exit; never a traceback.
"""
from __future__ import annotations

import importlib
import sys

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer >= 0.26 carries its own copy of click
    from typer._click import Command, exceptions as cx
except ImportError:  # pragma: no cover
    from click import Command, exceptions as cx

from infeng.errors import InfengError

# The subcommands in `infeng --help` order: name → (the module of infeng.cli whose register()
# adds it, the help `infeng --help` lists: the first paragraph of the command's docstring).
# A command's module, and what it imports (numpy, the engine, FastAPI), is imported only when
# that command runs or shows its own help.
COMMANDS = {
    "convert": ("convert", "Convert a Hugging Face checkpoint (or a PEFT adapter) to the engine-native format."),
    "generate": ("generate", "Generate text from a prompt, or run a batch of requests."),
    "eval": ("eval", "Evaluate a model: perplexity, KL-divergence, HumanEval, GSM8K, or a suite with a "
                     "regression check."),
    "quantize": ("quantize", "Quantize a model's weight matrices (GGUF-compatible q8_0 / q4_0 / q5_0 / q4_k "
                             "blocks, or fp8 E4M3)."),
    "bench": ("bench", "Kernel micro-benchmarks and end-to-end scenarios; medians, ratios, % of the bandwidth "
                       "roofline."),
    "profile": ("profile", "Where the time of a run goes (stages, ops per layer, CPU use), and where the C "
                           "forward pass\nfirst departs from the numpy reference (exit 3 when it does)."),
    "calibrate": ("calibrate", "Record per-channel activation statistics of every linear layer's input (for "
                               "calibrated quantization)."),
    "serve": ("serve", "Serve the model (and its adapters) over an OpenAI-compatible HTTP API."),
    "chat": ("chat", "Chat with a model: type a message, read the streamed reply; /reset, /system TEXT, /quit."),
}


class _Listed(TyperCommand):
    """A command not loaded yet: its name and help line, for `infeng --help` and typo hints."""


def load_command(name: str) -> Command:
    """The real click command of one subcommand (its module imported now)."""
    one = typer.Typer()
    importlib.import_module(f"infeng.cli.{COMMANDS[name][0]}").register(one)
    return typer.main.get_command(one)


class LazyGroup(TyperGroup):
    """`infeng`: every subcommand listed, each loaded the first time it is looked up to run
    (or to show its own help); the group's own help lists the stand-ins."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.commands = {name: _Listed(name, help=text) for name, (_, text) in COMMANDS.items()}
        self._listing = False

    def format_help(self, ctx, formatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def get_command(self, ctx, cmd_name: str):
        cmd = self.commands.get(cmd_name)
        if isinstance(cmd, _Listed) and not self._listing:
            cmd = self.commands[cmd_name] = load_command(cmd_name)
        return cmd


app = typer.Typer(cls=LazyGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="infeng: CPU-first inference for Llama-family models.")


# a callback makes Typer build a group although no command is registered on the app itself
@app.callback()
def _root() -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    cmd = typer.main.get_command(app)
    try:
        rv = cmd.main(args=argv if argv is not None else sys.argv[1:], prog_name="infeng",
                      standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except InfengError as e:
        print(f"infeng: error: {e}", file=sys.stderr)
        return 1
    except cx.NoArgsIsHelpError as e:   # bare `infeng`: help, as a usage hint
        print(e.ctx.get_help() if e.ctx else str(e), file=sys.stderr)
        return 2
    except cx.UsageError as e:
        print(f"infeng: error: {e.format_message()}" + (f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""),
              file=sys.stderr)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("infeng: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("infeng: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
