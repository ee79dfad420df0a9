"""Every code block of the README and of ``docs/`` runs in a test.

- ``python`` blocks run as written on 4 gloo ranks (one spawned world, as under ``torchrun --nproc_per_node
  4``): each page's blocks in order in one namespace, the way a reader runs them one after the other, so a
  page's first block sets up what the others use. Blocks check their own results (``assert``, or a helper
  that raises), so a wrong result fails here, not only an exception. The README's quick start is run by
  ``test_readme.py`` (2 ranks, under torchrun, exactly as its text says).
- ``bash`` blocks: every command's arguments are parsed by the entry point it names (``python -m M``,
  ``torchrun ... -m M``, ``deepspeed ... --module M``, ``launch/run.sh M``, ``sbatch launch/slurm.sbatch M``),
  with the entry point's own validation where it has a ``parse_args`` (the launcher's own options are not
  checked); ``make`` commands are dry-run (``make -n``). The commands' full runs are in their own tests
  (``test_demo``, ``test_train``, ``test_deepspeed``, ...) at small sizes; at the GPU sizes shown they are not run.
- ``text`` blocks (output, file trees) are not code. A block with any other label, or none, fails the test.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import os
import re
import shlex
import subprocess
import traceback
from pathlib import Path

import pytest

from launch.spawn import run_world

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LANGUAGES = ("python", "bash", "text")
WORLD = 4
FENCE = re.compile(r"^```(\S*)\n(.*?)^```\s*$", re.S | re.M)


def code_blocks(page: Path):
    """``(label, first line number, code)`` of every fenced block, except the README's quick start."""
    text = page.read_text()
    out = []
    for match in FENCE.finditer(text):
        if text[:match.start()].endswith("<!-- quickstart -->\n"):
            continue
        out.append((match.group(1), text.count("\n", 0, match.start()) + 2, match.group(2)))
    return out


def name(page: Path) -> str:
    return str(page.relative_to(REPO))


# ------------------------------------------------------------------------------------------- python

def run_pages(rank, world_size, pages):
    """Every python block of ``pages``, page by page: {page: None or the first failure}."""
    os.environ["LOCAL_RANK"] = str(rank)  # what torchrun sets (DeepSpeed's engine reads it); one node
    outcomes = {}
    for page in pages:
        namespace, environ = {"__name__": "__main__"}, dict(os.environ)
        outcomes[page] = None
        for label, line, code in code_blocks(REPO / page):
            if label != "python":
                continue
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    exec(compile(code, f"{page}:{line}", "exec"), namespace)
            except BaseException:
                outcomes[page] = (f"{page}:{line}: rank {rank}:\n{traceback.format_exc()}\n"
                                  f"printed:\n{printed.getvalue()}")
                break
        os.environ.clear()
        os.environ.update(environ)
    return outcomes


def pages_with(label):
    return [name(page) for page in PAGES if any(b[0] == label for b in code_blocks(page))]


@functools.lru_cache(maxsize=None)
def world():
    return run_world(WORLD, run_pages, pages_with("python"), timeout=420, pg_timeout_s=60)


def test_every_block_has_a_known_label():
    bad = [f"{name(page)}:{line}: {label or '(none)'}" for page in PAGES for label, line, _ in code_blocks(page)
           if label not in LANGUAGES]
    assert not bad, f"label every code block {LANGUAGES}: {bad}"


def test_there_are_pages_with_python_to_run():
    assert "docs/ring.md" in pages_with("python") and len(pages_with("python")) >= 8, pages_with("python")


@pytest.mark.parametrize("page", pages_with("python"))
def test_python_blocks_run_as_written(page):
    failures = [outcome[page] for outcome in world() if outcome[page] is not None]
    assert not failures, failures[0]


# --------------------------------------------------------------------------------------------- bash

class _Parsed(Exception):
    """Raised by the patched ``ArgumentParser.parse_args`` once the arguments parsed: the entry point stops there."""


def shell_commands(code):
    """The commands of a bash block: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):  # environment assignments
            words = words[1:]
        if words:
            commands.append(words)
    return commands


def entry_point(words):
    """``(module, its arguments)`` of a command that runs one of this project's entry points, else None."""
    first = words[0]
    if first in ("python", "python3") and words[1:2] == ["-m"]:
        return words[2], words[3:]
    if first == "torchrun" and "-m" in words:
        at = words.index("-m")
        return words[at + 1], words[at + 2:]
    if first == "deepspeed" and "--module" in words:
        at = words.index("--module")
        return words[at + 1], words[at + 2:]
    if first == "launch/run.sh":
        return words[1], words[2:]
    if first == "sbatch" and words[1:2] == ["launch/slurm.sbatch"]:
        return words[2], words[3:]
    return None


def parse_with(module_name, args):
    """None when ``module_name`` accepts ``args``, else the error. A module with ``parse_args(argv)`` is asked
    directly (that also runs its config's validation); otherwise its ``main(argv)`` runs with argparse stopping
    it once the arguments parsed (before any process group or work)."""
    module = importlib.import_module(module_name)
    errors = io.StringIO()
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        real(self, argv, namespace)
        raise _Parsed

    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            if hasattr(module, "parse_args"):
                module.parse_args(args)
                return None
            argparse.ArgumentParser.parse_args = parse_then_stop
            try:
                module.main(args)
            finally:
                argparse.ArgumentParser.parse_args = real
            return f"{module_name}.main ran without parsing its arguments"
    except _Parsed:
        return None
    except SystemExit as stop:
        return None if stop.code in (0, None) else f"exit {stop.code}: {errors.getvalue()[-800:]}"
    except Exception as error:  # a config's validation
        return f"{type(error).__name__}: {error}"


def check_command(words):
    if words[0] == "make":
        proc = subprocess.run(["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
        return None if proc.returncode == 0 else proc.stderr[-800:]
    found = entry_point(words)
    if found is None:
        return "not a command this test knows how to check (make, python -m, torchrun, deepspeed, launch/*)"
    for script in ("launch/run.sh", "launch/slurm.sbatch"):
        if script in words and not (REPO / script).is_file():
            return f"{script} does not exist"
    return parse_with(*found)


SHELL = [(name(page), line, words) for page in PAGES for label, line, code in code_blocks(page) if label == "bash"
         for words in shell_commands(code)]


def test_there_are_commands_to_check():
    assert len(SHELL) >= 30, len(SHELL)


@pytest.mark.parametrize("page,line,words", SHELL, ids=[f"{p}:{line}:{' '.join(w)[:50]}" for p, line, w in SHELL])
def test_shell_commands_are_accepted_by_their_entry_points(page, line, words, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # as on a login node: no launcher around
        monkeypatch.delenv(key, raising=False)
    error = check_command(words)
    assert error is None, f"{page}:{line}: {' '.join(words)}: {error}"


def test_a_wrong_option_is_caught():
    assert parse_with("launch.demo", ["--no-such-option"]) is not None
    assert parse_with("launch.train", ["--steps", "many"]) is not None
    assert parse_with("launch.demo", ["--seqlen", "4096"]) is None


# -------------------------------------------------------------------------------------------- links

def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path):
    text = FENCE.sub("", page.read_text())
    return {slug(match.group(1)) for match in re.finditer(r"^#+ (.*)$", text, re.M)}


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        text = FENCE.sub("", page.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists() or (anchor and anchor not in anchors(resolved)):
                broken.append(f"{name(page)}: {target}")
    assert not broken, broken
