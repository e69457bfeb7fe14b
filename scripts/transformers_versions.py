"""Which transformers releases scripts/test.sh tests, asked of the package index at the time it runs.

    python scripts/transformers_versions.py --pins 4.57.6 5.23.0 [--all-versions]

Reads the supported range from pyproject.toml (`transformers>=4.57,<6`), lists the released versions with
`pip index versions transformers` and prints one line per environment to test:
- `full VERSION`: the whole suite, on each pinned version (requirements/tf4.txt, tf5.txt) and on the newest
  release in the range;
- `compat VERSION`: the compatibility subset (`pytest -m compat`), on the newest patch release of the first minor
  line of each major version in the range (4.57, 5.0), of every fifth minor line (5.5, 5.10, ...) and of the three
  newest minor lines; with --all-versions, of every minor line. Versions already in a `full` line are left out;
- `note TEXT`: releases past the range (a new major version), which are not tested.
Exits non-zero with a message naming the problem when the index cannot be asked: a silently shorter matrix
would hide exactly the new release it exists to catch.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
Version = tuple[int, int, int]


def parse(text: str) -> Version:
    major, minor, patch = (int(part) for part in text.split("."))
    return major, minor, patch


def show(version: Version) -> str:
    return ".".join(map(str, version))


def declared_range() -> tuple[tuple[int, int], int]:
    """(floor major.minor, ceiling major) of the `transformers>=A.B,<C` dependency in pyproject.toml."""
    # a plain search, not tomllib (Python 3.11+): the line is `"transformers>=4.57,<6",` in [project] dependencies
    text = (REPO_ROOT / "pyproject.toml").read_text()
    match = re.search(r'^\s*"transformers\s*>=\s*(\d+)\.(\d+)\s*,\s*<\s*(\d+)"', text, re.MULTILINE)
    if match:
        return (int(match[1]), int(match[2])), int(match[3])
    raise SystemExit("transformers_versions.py: pyproject.toml declares no `transformers>=A.B,<C` dependency")


def released_versions() -> list[Version]:
    """Every final (not pre-release) transformers version on the package index pip is configured with."""
    command = [sys.executable, "-m", "pip", "index", "versions", "transformers", "--disable-pip-version-check"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SystemExit(f"could not list transformers releases ({' '.join(command[1:])}): {error}") from error
    listed = re.search(r"^Available versions:(.*)$", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or listed is None:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SystemExit(
            f"could not list transformers releases ({' '.join(command[1:])} exited {proc.returncode}: "
            f"{' / '.join(detail) or 'no version list'}); the version matrix needs the package index"
        )
    found = [text.strip() for text in listed[1].split(",")]
    return sorted(parse(text) for text in found if re.fullmatch(r"\d+\.\d+\.\d+", text))


def plan(versions: list[Version], pins: list[Version], all_lines: bool) -> tuple[list[Version], list[Version]]:
    """(versions for the whole suite, versions for the compatibility subset)."""
    (floor_major, floor_minor), ceiling = declared_range()
    in_range = [v for v in versions if (v[0], v[1]) >= (floor_major, floor_minor) and v[0] < ceiling]
    if not in_range:
        raise SystemExit(
            f"the package index lists no transformers release in {floor_major}.{floor_minor} to <{ceiling}"
        )
    newest_patch = {}
    for version in in_range:  # sorted, so the last patch of each line wins
        newest_patch[version[:2]] = version
    lines = sorted(newest_patch)
    chosen = set(lines) if all_lines else set(lines[-3:])
    for major in {line[0] for line in lines}:
        chosen.add(min(line for line in lines if line[0] == major))  # the first minor line of each major
        chosen.update(line for line in lines if line[0] == major and line[1] % 5 == 0)
    full = list(dict.fromkeys([*pins, in_range[-1]]))
    compat = [newest_patch[line] for line in sorted(chosen) if newest_patch[line] not in full]
    return full, compat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pins", nargs="+", required=True, help="the pinned versions of the test environments")
    parser.add_argument("--all-versions", action="store_true", help="the subset on every minor line, not a spread")
    args = parser.parse_args()
    versions = released_versions()
    full, compat = plan(versions, [parse(pin) for pin in args.pins], args.all_versions)
    for version in full:
        print("full", show(version))
    for version in compat:
        print("compat", show(version))
    _, ceiling = declared_range()
    beyond = [v for v in versions if v[0] >= ceiling]
    if beyond:
        print(f"note transformers {show(beyond[-1])} is released, past the declared range <{ceiling}: not tested")


if __name__ == "__main__":
    main()
