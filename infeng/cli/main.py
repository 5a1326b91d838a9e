"""`infeng` — one command, one thin module per subcommand.

Errors a user can cause (bad files, options, requests) surface as InfengError or a usage error
and are printed as one line on stderr with a non-zero exit; never a traceback.
"""
from __future__ import annotations

import sys

import typer

try:  # typer >= 0.26 carries its own copy of click
    from typer._click import exceptions as cx
except ImportError:  # pragma: no cover
    from click import exceptions as cx

from infeng.errors import InfengError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="infeng: CPU-first inference for Llama-family models.")

from infeng.cli import convert as _convert, generate as _generate  # noqa: E402  (register commands)
from infeng.cli import eval as _eval  # noqa: E402
from infeng.cli import quantize as _quantize  # noqa: E402
from infeng.cli import bench as _bench, profile as _profile  # noqa: E402
from infeng.cli import calibrate as _calibrate  # noqa: E402
from infeng.cli import serve as _serve  # noqa: E402
from infeng.cli import chat as _chat  # noqa: E402

_convert.register(app)
_generate.register(app)
_eval.register(app)
_quantize.register(app)
_bench.register(app)
_profile.register(app)
_calibrate.register(app)
_serve.register(app)
_chat.register(app)


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
