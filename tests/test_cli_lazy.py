"""`infeng --help` lists every subcommand without importing one: a command's module (numpy, the
engine, FastAPI) is imported only when it runs or shows its own help."""
import inspect
import subprocess
import sys

from infeng.bench.comparisons import COMPARISONS
from infeng.cli.main import COMMANDS, load_command, main


def _modules_after(*args: str) -> set[str]:
    code = ("import sys\nfrom infeng.cli.main import main\nmain(list(sys.argv[1:]))\n"
            "print('MODULES', ' '.join(sorted(sys.modules)))")
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return set(p.stdout.rsplit("MODULES", 1)[1].split())


def test_top_level_help_imports_no_command_module():
    mods = _modules_after("--help")
    assert "infeng.cli.main" in mods
    loaded = sorted(m for m in mods if m.startswith("infeng.cli.") and m != "infeng.cli.main")
    assert loaded == []
    assert not {"numpy", "fastapi", "infeng.runtime", "infeng.model"} & mods


def test_a_command_loads_only_its_own_module():
    mods = _modules_after("bench", "--help")
    assert "infeng.cli.bench" in mods
    assert not {"infeng.cli.serve", "infeng.cli.generate", "fastapi"} & mods


def test_listed_help_is_each_commands_own():
    """The help lines of COMMANDS are the first paragraph of each command's docstring."""
    for name, (_, text) in COMMANDS.items():
        real = load_command(name)
        assert real.name == name
        assert inspect.cleandoc(real.help).split("\n\n")[0] == text, name


def test_unknown_command_is_one_line_with_a_hint(capsys):
    assert main(["generat"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("infeng: error: No such command 'generat'. Did you mean 'generate'?")


def test_bench_help_names_every_comparison_kind():
    text = " ".join(load_command("bench").help.split())
    assert [k for k in COMPARISONS if k not in text] == []
