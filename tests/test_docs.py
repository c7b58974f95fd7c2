"""The documentation stands on its own and keeps up with the code.

- every relative link in a Markdown file of the repository resolves to a file
  inside it (a clone from a public host has nothing beside it);
- every command and option of the CLI appears in docs/cli.md.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import click

from conftest import REPO
from pipcook_sandbox.runner.cli import main

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _markdown_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.md"], capture_output=True, text=True, cwd=REPO, check=True)
    return [REPO / name for name in out.stdout.split()]


def test_every_relative_link_stays_inside_the_repository():
    bad = []
    root = REPO.resolve()
    files = _markdown_files()
    assert files
    for md in files:
        for target in LINK.findall(md.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same page
            path = (md.parent / target.split("#", 1)[0]).resolve()
            if not path.is_relative_to(root) or not path.exists():
                bad.append(f"{md.relative_to(REPO)}: {target}")
    assert not bad, "links that leave the repository or point nowhere: " + ", ".join(bad)


def _commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in sorted(group.commands.items()):
        full = f"{prefix}{name}"
        found.append((full, command))
        if isinstance(command, click.Group):
            found += _commands(command, full + " ")
    return found


def test_docs_cli_names_every_command_and_option():
    text = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    missing = []
    for full, command in _commands(main):
        if command.hidden:
            continue
        if f"pipcook-sandbox {full}" not in text:
            missing.append(f"command '{full}'")
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                names = [o for o in param.opts + param.secondary_opts if o.startswith("--")]
                if names and not any(re.search(re.escape(o) + r"(?![\w-])", text) for o in names):
                    missing.append(f"{full} {names[0]}")
    assert not missing, "docs/cli.md does not mention: " + ", ".join(missing)
