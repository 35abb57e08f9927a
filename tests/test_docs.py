"""Docs that run: every fenced code block in README.md, docs/*.md and benchmarks/README.md is
checked, one test per block (the test id names the file and the line of the fence).

- ```python blocks run as ``__main__``, each in a fresh process (so a block that registers
  a pass or sets global state cannot leak into another), with the working directory set to
  a fresh copy of the sample folder below. Tracebacks carry the Markdown file's line numbers.
- ```bash / ```sh / ```shell / ```console blocks (in ```console only the lines after a
  ``$ `` prompt): ``python -m optcc ...`` and ``optcc ...`` commands run for real, in
  order, in that folder (through ``optcc.cli.main``, what both call, in this process: an
  interpreter start per command would cost more than the commands), and must exit 0
  unless the line ends with a comment ``# exits N``; when one exits 0, the output it
  names (``-o FILE``, else MODEL.opt.onnx when it starts with the model) and its
  ``--report FILE`` must exist. ``pip install`` is skipped (installing is CI's job).
  Every other line must be a comment or a command listed in KNOWN_COMMANDS (not run);
  anything else fails, so a block that is not meant to run has to say so with ```text.
- ```toml blocks must parse; ```text and ```json blocks are not run.
- A fence without a language fails: mark it ```text (not run) or name its language.
- Every Markdown table renders: its second line is the header separator and every row has
  as many cells as the header.

The sample folder is the one ``python -m fixtures.docs_samples DIR`` writes (see
fixtures/docs_samples.py): ``model.onnx``, ``inputs.npz`` and ``calib.npz``; plus the
bundled example at ``fixtures/tinycnn.onnx``, where the README's first command, run from
the clone's root, finds it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import select
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fixtures.docs_samples import write_sample_folder
from optcc import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]

SHELL_LANGS = {"bash", "sh", "shell", "console"}
NOT_RUN_LANGS = {"text", "json"}
# Commands a shell block may show without this test running them: what they do is either
# the test suite itself, network fetches, or long benchmark runs.
KNOWN_COMMANDS = [
    re.compile(r"python -m pytest\b"),
    re.compile(r"python -m fixtures\.corpus\b"),
    re.compile(r"python -m fixtures\.docs_samples\b"),  # writes the sample folder this test copies
    re.compile(r"python (benchmarks/\w+\.py)\b"),  # the script must exist
    re.compile(r"(cd|ls|cat|mkdir|export)\b"),
]
PYTHON_BLOCK_TIMEOUT_S = 120
EXITS = re.compile(r"#\s*exits\s+(\d+)\s*$")


def _rel(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{_rel(self.path)}:{self.line}"


def _blocks(path: Path) -> list[Block]:
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        marker, start, body = fence.group(2), i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(marker):
            body.append(lines[i])
            i += 1
        blocks.append(Block(path, start + 1, fence.group(3).lower(), "\n".join(body) + "\n"))
        i += 1
    return blocks


BLOCKS = [b for doc in DOCS for b in _blocks(doc)]


# --------------------------------------------------------------------------- sample folder

@pytest.fixture(scope="module")
def sample_folder(tmp_path_factory) -> Path:
    folder = write_sample_folder(tmp_path_factory.mktemp("docs-template"))
    (folder / "fixtures").mkdir()
    shutil.copy(ROOT / "fixtures" / "tinycnn.onnx", folder / "fixtures")  # as in the clone's root
    return folder


@pytest.fixture
def workdir(sample_folder, tmp_path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(sample_folder, work)
    return work


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# --------------------------------------------------------------------------- runners

# Python blocks run in processes forked from one interpreter that has done the slow imports
# (numpy, onnx, onnx-ir, onnxruntime, optcc) but created no onnxruntime session: each block
# gets a fresh process (nothing it sets or registers outlives it) for a fraction of the cost
# of starting an interpreter.
_FORK_SERVER = r"""
import importlib, os, runpy, sys, traceback
for module in ("numpy", "onnx", "onnx_ir", "onnxruntime", "optcc", "optcc.passes"):
    try:
        importlib.import_module(module)  # once, for every block
    except Exception:  # a block that needs it reports the error itself
        pass
for request in sys.stdin:
    script, work = request.rstrip("\n").split("\t")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(work)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            sys.stdin = open(os.devnull)
            log = os.open("_block.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            sys.argv = [script]
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


@pytest.fixture(scope="module")
def fork_server():
    if not hasattr(os, "fork"):  # no fork (Windows): a fresh interpreter per block
        yield None
        return
    server = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    yield server
    server.stdin.close()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def _run_python(block: Block, work: Path, server: subprocess.Popen | None) -> None:
    # Blank lines first, so a traceback's line numbers are the Markdown file's.
    script = work / f"_{block.path.stem}_{block.line}.py"
    script.write_text("\n" * block.line + block.text)
    if server is None:
        done = subprocess.run([sys.executable, str(script)], cwd=work, env=_env(), capture_output=True,
                              text=True, timeout=PYTHON_BLOCK_TIMEOUT_S)
        assert done.returncode == 0, (
            f"python block at {block.id} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        return
    assert server.poll() is None, "the fork server of tests/test_docs.py exited"
    server.stdin.write(f"{script}\t{work}\n")
    server.stdin.flush()
    ready, _, _ = select.select([server.stdout], [], [], PYTHON_BLOCK_TIMEOUT_S)
    if not ready:
        os.killpg(server.pid, signal.SIGKILL)
        pytest.fail(f"python block at {block.id} ran past {PYTHON_BLOCK_TIMEOUT_S} s")
    code = int(server.stdout.readline())
    log = (work / "_block.log").read_text()
    assert code == 0, f"python block at {block.id} failed (exit {code}):\n{log[-4000:]}"


def _shell_commands(block: Block) -> list[tuple[int, str]]:
    """(line in the Markdown file, command) for each command of a shell block; backslash
    continuations joined; in ```console blocks only ``$ `` lines are commands."""
    commands: list[tuple[int, str]] = []
    pending, pending_line = "", 0
    for offset, raw in enumerate(block.text.splitlines(), start=block.line + 1):
        line = raw.strip()
        if not pending:
            if block.lang == "console":
                if not line.startswith("$ "):
                    continue  # output shown after a prompt
                line = line[2:].strip()
            pending_line = offset
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        command, pending = (pending + line).strip(), ""
        if command:
            commands.append((pending_line, command))
    assert not pending, f"{block.id}: a line continuation runs off the end of the block"
    return commands


def _optcc_argv(segment: str) -> list[str] | None:
    """The arguments after ``python -m optcc`` / ``optcc``; None for another command."""
    words = shlex.split(segment, comments=True)
    if words[:3] == ["python", "-m", "optcc"]:
        return words[3:]
    if words[:1] == ["optcc"]:
        return words[1:]
    return None


def _check_known(segment: str, where: str) -> None:
    for pattern in KNOWN_COMMANDS:
        found = pattern.match(segment)
        if found:
            if found.groups():
                assert (ROOT / found.group(1)).is_file(), f"{where}: {found.group(1)} does not exist"
            return
    pytest.fail(f"{where}: '{segment}' is neither an optcc command, pip install, nor a known command; "
                "mark the block ```text if it is not meant to run")


def _written_files(argv: list[str]) -> list[str]:
    """The files an optimizing command promises: ``-o``/``--output`` (else MODEL.opt.onnx
    when the command starts with the model) and ``--report``."""
    files = [argv[argv.index(flag) + 1] for flag in ("-o", "--output", "--report") if flag in argv[:-1]]
    if argv and argv[0].endswith(".onnx") and not {"-o", "--output"} & set(argv):
        files.append(str(cli.default_output(argv[0])))
    return files


def _run_optcc(argv: list[str], work: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """optcc's command line, in this process (what ``python -m optcc`` calls) with ``work``
    as the working directory: the exit code and what it printed."""
    previous = Path.cwd()
    os.chdir(work)
    try:
        code = cli.main(argv)
    finally:
        os.chdir(previous)
    out, err = capsys.readouterr()
    return code, err or out


def _run_shell(block: Block, work: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Run the block's optcc commands: how many ran, and what was skipped and why."""
    ran, skipped = 0, []
    for line, command in _shell_commands(block):
        where = f"{_rel(block.path)}:{line}"
        expected = 0
        exits = EXITS.search(command)
        if exits:
            expected = int(exits.group(1))
            command = command[: exits.start()].rstrip()
        for segment in (s.strip() for s in command.split("&&")):
            if not segment or segment.startswith("#"):
                continue
            if segment.startswith("pip install"):
                skipped.append(f"{where}: '{segment}' (installing is CI's job)")
                continue
            argv = _optcc_argv(segment)
            if argv is None:
                _check_known(segment, where)
                continue
            code, printed = _run_optcc(argv, work, capsys)
            ran += 1
            assert code == expected, (
                f"{where}: '{segment}' exited {code}, the doc expects {expected}:\n{printed[-3000:]}")
            if expected == 0:
                for written in _written_files(argv):
                    assert (work / written).exists(), f"{where}: '{segment}' did not write {written}"
    return ran, skipped


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_code_block(block: Block, workdir: Path, capsys: pytest.CaptureFixture[str],
                    fork_server: subprocess.Popen | None) -> None:
    if block.lang == "":
        pytest.fail(f"{block.id}: code block without a language; mark it ```text (not run) "
                    "or name its language (```python, ```bash, ...)")
    if block.lang == "python":
        _run_python(block, workdir, fork_server)
    elif block.lang in SHELL_LANGS:
        assert _shell_commands(block), f"{block.id}: a shell block without commands"
        ran, skipped = _run_shell(block, workdir, capsys)
        if not ran and skipped:
            pytest.skip("; ".join(skipped))
    elif block.lang == "toml":
        tomllib.loads(block.text)
    elif block.lang in NOT_RUN_LANGS:
        pass
    else:
        pytest.fail(f"{block.id}: unknown code block language '{block.lang}' "
                    f"(run: python, {', '.join(sorted(SHELL_LANGS))}; checked: toml; not run: text, json)")


# --------------------------------------------------------------------------- tables

def _cells(row: str) -> int:
    """Cells of a GFM table row: split on pipes that are not escaped (a pipe inside a code
    span splits too unless escaped, as GitHub renders it)."""
    inner = row.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return len(re.split(r"(?<!\\)\|", inner))


def _tables(path: Path) -> list[tuple[int, list[str]]]:
    """(first line, rows) for each run of lines starting with '|' outside code fences."""
    tables, current, start, fence = [], [], 0, None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        opening = re.match(r"(`{3,}|~{3,})", stripped)
        if fence is None and opening:
            fence = opening.group(1)
        elif fence is not None and stripped.startswith(fence):
            fence = None
            continue
        if fence is None and stripped.startswith("|"):
            if not current:
                start = number
            current.append(stripped)
            continue
        if current:
            tables.append((start, current))
            current = []
    if current:
        tables.append((start, current))
    return tables


TABLES = [(doc, line, rows) for doc in DOCS for line, rows in _tables(doc)]


@pytest.mark.parametrize("doc,line,rows", TABLES,
                         ids=[f"{_rel(d)}:{n}" for d, n, _ in TABLES])
def test_table_renders(doc: Path, line: int, rows: list[str]) -> None:
    where = f"{_rel(doc)}:{line}"
    assert len(rows) >= 2 and re.fullmatch(r"\|?(\s*:?-{3,}:?\s*\|)*\s*:?-{3,}:?\s*\|?", rows[1]), (
        f"{where}: lines starting with '|' but no header separator on the second line "
        "(a table cut by a blank line renders as text)")
    header = _cells(rows[0])
    assert _cells(rows[1]) == header, f"{where}: the separator has {_cells(rows[1])} cells, the header {header}"
    for offset, row in enumerate(rows[2:], start=2):
        assert _cells(row) == header, (
            f"{_rel(doc)}:{line + offset}: {_cells(row)} cells, the header has {header}")


def test_docs_are_found() -> None:
    assert len(DOCS) >= 5 and all(doc.is_file() for doc in DOCS)
    assert any(b.lang == "python" for b in BLOCKS) and any(b.lang in SHELL_LANGS for b in BLOCKS)


def test_the_checks_catch_broken_docs(tmp_path: Path, sample_folder: Path, fork_server: subprocess.Popen | None,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The machinery above fails on what it must fail on (so a green run means something)."""
    doc = tmp_path / "broken.md"
    doc.write_text(
        "| a | b |\n|---|---|\n| 1 | 2 | 3 |\n\n| loose | row |\n\n"
        "```\nno language\n```\n"
        "```python\nraise ValueError('boom')\n```\n"
        "```bash\npython -m optcc model.onnx --passes no-such-pass\nrm -rf /\n```\n"
        "```console\n$ python -m optcc missing.onnx \\\n    -O1  # exits 2\noutput line\n```\n")
    blocks = _blocks(doc)
    assert [(b.line, b.lang) for b in blocks] == [(7, ""), (10, "python"), (13, "bash"), (17, "console")]
    (first, rows), (second, loose) = _tables(doc)
    assert (first, second) == (1, 5) and [_cells(r) for r in rows] == [2, 2, 3] and len(loose) == 1
    assert _cells(r"| `a\|b` | c |") == 2
    assert _shell_commands(blocks[3]) == [(18, "python -m optcc missing.onnx -O1  # exits 2")]

    work = tmp_path / "work"
    shutil.copytree(sample_folder, work)
    with pytest.raises(AssertionError, match="ValueError: boom"):
        _run_python(blocks[1], work, fork_server)
    with pytest.raises(AssertionError, match="exited 2, the doc expects 0"):
        _run_shell(blocks[2], work, capsys)
    bad_line = dataclasses.replace(blocks[2], text="rm -rf /\n")
    with pytest.raises(pytest.fail.Exception, match="neither an optcc command"):
        _run_shell(bad_line, work, capsys)
    assert _run_shell(blocks[3], work, capsys) == (1, [])


def test_docs_samples_command_writes_the_sample_folder(tmp_path: Path) -> None:
    """The folder README and docs/cli.md tell a reader to make is the one the blocks run in."""
    done = subprocess.run([sys.executable, "-m", "fixtures.docs_samples", str(tmp_path / "try")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = sorted(str(p.relative_to(tmp_path / "try")) for p in (tmp_path / "try").rglob("*") if p.is_file())
    assert written == ["calib.npz", "inputs.npz", "model.onnx"]  # what README and docs/int8.md say
    assert (tmp_path / "try" / "model.onnx").read_bytes() == (ROOT / "fixtures" / "tinycnn.onnx").read_bytes()
