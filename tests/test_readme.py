"""The README is the front door: short, the two commands first, and no link that leads nowhere.

CI (``.ci/run``) runs the second line of the README's first code block, so that block is pinned here exactly.
``mkdocs build --strict`` checks the links between the docs pages; this also covers the README, which is not
part of the site, and links from ``docs/`` to files outside the site.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_BYTES = 12_000
COMMANDS = ['pip install -e ".[app]" && ecoptim compare',
            'pip install -e ".[test]" && python -m pytest -q tests']

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(text: str) -> list[str]:
    """Targets of the Markdown links and images in ``text`` that point into the repository (code excluded)."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    targets = []
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("#", "/")):
            continue  # a URL (https:, mailto:), an anchor on the same page, or a site-absolute path
        targets.append(target)
    return targets


def test_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, (f"README.md is {size} bytes, over {MAX_README_BYTES}: move the detail to a "
                                      "page under docs/ and link it")


def test_readme_opens_with_a_title_and_one_line() -> None:
    lines = README.read_text(encoding="utf-8").split("\n")
    assert re.fullmatch(r"# \S.*", lines[0]), f"the first line must be the title, got {lines[0]!r}"
    assert lines[1] == "", "a blank line must follow the title"
    assert lines[2].strip() and not lines[2].startswith(("#", "```")), "one line saying what ecoptim is"
    assert lines[3] == "", "the one-line description must be a single line"


def test_readme_first_code_block_is_the_two_commands() -> None:
    block = FENCE.search(README.read_text(encoding="utf-8"))
    assert block is not None, "README.md has no code block"
    body = block.group(0).split("\n")[1:-1]
    assert body == COMMANDS, f"the first code block must be exactly {COMMANDS}, got {body}"


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    missing = []
    for target in relative_links(path.read_text(encoding="utf-8")):
        file_part = target.split("#", 1)[0]
        if file_part and not (path.parent / file_part).exists():
            missing.append(target)
    assert not missing, f"{path.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_link_finder_sees_links_and_skips_code() -> None:
    text = ("[a](docs/x.md) ![b](img.png) [c](https://example.org) [d](#here) `[e](code.md)`\n"
            "```\n[f](fenced.md)\n```\n[g](y.md#part)")
    assert relative_links(text) == ["docs/x.md", "img.png", "y.md#part"]


MAIN_JOB_RESULTS = ROOT / "docs" / "results" / "seeds" / "int4_3000.json"


def _readme_result_rows() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Result"):text.index("## Benchmark")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| INT4")]


def test_readme_result_table_is_the_main_jobs_recorded_output() -> None:
    """Every number of the README's result table is the one the run wrote (docs/results/seeds/int4_3000.json)."""
    import json
    summary = json.loads(MAIN_JOB_RESULTS.read_text())["summary"]
    rows = _readme_result_rows()
    assert len(rows) == len(summary) == 3
    for row, s in zip(rows, summary):
        assert row[1] == f"{s['final_val_loss']:.4f} +- {s['final_val_loss_sd']:.4f}"
        d = s["diff_vs_mw_sr"]
        if s["method"] != "int4_mw_sr":
            assert row[2] == f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"
        assert row[3] == f"{s['bytes_per_param']:.2f}"


def test_the_main_jobs_defaults_are_the_recorded_runs_settings() -> None:
    """`ecoptim compare` with no options is the command whose results the README shows: the same model, data,
    methods, format, steps, LR, seeds and optimizer settings as the recorded run."""
    import json
    from ecoptim.app import cli
    parser = cli.build_parser()
    args = parser.parse_args(["compare"])
    cfg, methods = cli._resolve(parser, args)
    data = cli._load_data(parser, args, args.corpus)
    config = cli._run_config(args, cfg, methods, data, args.corpus)
    recorded = json.loads(MAIN_JOB_RESULTS.read_text())["config"]
    assert config == recorded
