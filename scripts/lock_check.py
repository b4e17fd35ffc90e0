"""Check that a fresh install from the lock resolves to exactly the locked versions.

Usage: python scripts/lock_check.py [constraints.txt]   (what `scripts/lock.sh --check` runs)

Creates a throwaway venv with this interpreter's Python, asks pip for a dry run of
`pip install -c LOCK -e ".[dev]"` with a JSON report (metadata only, nothing installed), and
compares every package pip would install with the lock. Exit 0 when all match, 1 otherwise.
Why a dry run in a new venv: the tested .venv already satisfies everything, so only an empty
environment shows what a newcomer's install (or CI on a new machine) would pick.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import venv
from pathlib import Path
from urllib.parse import unquote

from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def read_lock(path: Path) -> dict[str, Version]:
    """`name==version` lines of a constraints file (comments and blanks skipped)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def dry_run(lock: Path, workdir: Path) -> list[dict]:
    """pip's installation report for the locked install in an empty venv."""
    env_dir, report = workdir / "venv", workdir / "report.json"
    venv.create(env_dir, with_pip=True)
    cmd = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--quiet"]
    cmd += ["--report", str(report), "-c", str(lock), "-e", f"{ROOT}[dev]"]
    done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    for line in done.stderr.splitlines():  # this machine's missing file:// indexes are noise
        if not line.startswith("WARNING: Location"):
            print(line, file=sys.stderr)
    if done.returncode != 0:
        raise SystemExit(f"error: pip could not resolve the locked install ({done.returncode})")
    return json.loads(report.read_text())["install"]


def compare(pins: dict[str, Version], chosen: list[dict]) -> list[str]:
    """One line per package whose chosen version differs from (or is missing in) the lock."""
    problems = []
    for item in chosen:
        name = canonicalize_name(item["metadata"]["name"])
        version = Version(item["metadata"]["version"])
        if name == "cfsp":
            continue
        if name not in pins:
            problems.append(f"{name} {version}: not in the lock")
        elif Version(version.public) != pins[name]:
            problems.append(f"{name} {version}: the lock says {pins[name]}")
    return problems


def main(argv: list[str]) -> int:
    lock = Path(argv[0] if argv else ROOT / "constraints.txt").resolve()
    pins = read_lock(lock)
    with tempfile.TemporaryDirectory(prefix="cfsp-lock-check-") as tmp:
        chosen = dry_run(lock, Path(tmp))
    problems = compare(pins, chosen)
    for item in chosen:
        if canonicalize_name(item["metadata"]["name"]) == "torch":
            url = item.get("download_info", {}).get("url", "?")
            print(f"torch {item['metadata']['version']} from {unquote(url.rsplit('/', 1)[-1])}")
    for line in problems:
        print(f"mismatch: {line}", file=sys.stderr)
    unused = len(pins) - (len(chosen) - 1)
    print(
        f"{len(chosen) - 1} packages resolved, {len(problems)} differ from the lock "
        f"({len(pins)} pinned, {unused} pinned but not needed on this platform)"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
