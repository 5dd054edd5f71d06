"""The README's commands and flags exist in the CLI (docs whose flags don't match the code are a bug)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from llm360.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


def test_every_command_and_flag_in_the_readme_exists():
    root = build_parser()
    commands = _subparsers(root)
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    code = "\n".join(blocks + spans)
    uses = re.findall(r"(?:^|[\s(])(?:-m llm360\.cli|llm360) ([a-z-]+)((?: [a-z|\\]+)?)([^\n]*)", code, flags=re.M)
    assert len(uses) > 15
    for cmd, sub, rest in uses:
        assert cmd in commands, f"README names `llm360 {cmd}`, which does not exist"
        parser = commands[cmd]
        nested = _subparsers(parser)
        sub = sub.strip()
        if nested:
            for alt in sub.split("\\|") if sub else []:
                if alt in nested:
                    parser = nested[alt]
            if sub and sub in nested:
                parser = nested[sub]
        flags = _flags(parser) | {f for p in _subparsers(parser).values() for f in _flags(p)}
        if nested:
            flags |= {f for p in nested.values() for f in _flags(p)}
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest):
            assert flag in flags, f"README: `llm360 {cmd} {sub}` has no flag {flag}"
