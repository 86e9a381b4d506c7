"""Griffe extension: render ecoptim's plain-text docstrings faithfully in Markdown.

ecoptim's docstrings are plain text (no Google/NumPy sections): prose, then equations or tables indented
under the line that introduces them, often without a blank line in between. Markdown would fold such an
indented run into the preceding paragraph; this extension turns every indented run into a code block (blank
line before, four more spaces of indentation), so the equations keep their lines and alignment. An indented
line right after a bullet (``* ...`` / ``- ...``) is that bullet's continuation and is left alone.
"""
from __future__ import annotations

import re
from typing import Any

import griffe

_BULLET = re.compile(r"^\s*([*-]|\d+\.)\s")


def code_blocks_for_indented_runs(text: str) -> str:
    """The docstring text with each indented run of lines made a Markdown code block."""
    out: list[str] = []
    in_block = False
    in_bullet = False
    lines = text.split("\n")
    for i, line in enumerate(lines):
        indented = line.startswith((" ", "\t")) and line.strip() != ""
        if not line.strip():
            # a blank line inside a block ends it only if the next non-blank line is not indented
            nxt = next((l for l in lines[i + 1:] if l.strip()), "")
            if in_block and nxt.startswith((" ", "\t")):
                out.append("")
                continue
            in_block = False
            in_bullet = False
            out.append(line)
            continue
        if indented and (in_block or not in_bullet):
            if not in_block:
                if out and out[-1].strip():
                    out.append("")
                in_block = True
            out.append("    " + line)
            continue
        if in_block:
            out.append("")
            in_block = False
        in_bullet = bool(_BULLET.match(line)) or (in_bullet and indented)
        out.append(line)
    return "\n".join(out)


class PlainDocstrings(griffe.Extension):
    """Apply ``code_blocks_for_indented_runs`` to every docstring Griffe loads."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = code_blocks_for_indented_runs(obj.docstring.value)
