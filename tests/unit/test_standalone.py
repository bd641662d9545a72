"""Issue 12 point 1: the repository stands alone.

A clone of the committed tree, in a directory with nothing beside it, runs the tests
that read test data (the RPC captures, the per-release tables, the PKCS#11 3.1
mechanism and struct lists); and no tracked file depends on a path outside the tree."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA_TESTS = ["tests/unit/test_capture_vectors.py", "tests/unit/test_codec_captures.py",
              "tests/unit/test_param_kinds.py"]


def outside_names() -> re.Pattern[str]:
    """References to what lies beside the checkout (its sibling directories, relative
    or absolute) or to the checkout's own absolute path."""
    names = [str(ROOT) + "/"]
    # in a temporary directory the siblings are anyone's: their relative names only
    absolute = ROOT.parent not in (Path("/tmp"), Path("/var/tmp"))
    for sibling in ROOT.parent.iterdir():
        if sibling != ROOT and sibling.is_dir():
            names.append(f"../{sibling.name}/")
            if absolute:
                names.append(str(sibling) + "/")
    return re.compile("|".join(re.escape(n) for n in names))


def tracked_files() -> list[str]:
    r = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True,
                       text=True, check=True)
    return [f for f in r.stdout.splitlines() if f]


def test_no_tracked_file_points_outside_the_tree() -> None:
    outside = outside_names()
    offenders = []
    for name in tracked_files():
        path = ROOT / name
        if not path.is_file() or path.suffix in (".hex", ".lock"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for line in text.splitlines():
            if outside.search(line):
                offenders.append(f"{name}: {line.strip()[:100]}")
    assert offenders == []


def test_a_clone_alone_runs_the_data_tests(tmp_path: Path) -> None:
    alone = tmp_path / "nothing-beside" / "p11gate"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(alone)], check=True, timeout=120)
    assert [p.name for p in alone.parent.iterdir()] == ["p11gate"]  # nothing beside it
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    # the clone's own sources first: its tests must find its data, not ours
    env["PYTHONPATH"] = os.pathsep.join([str(alone / "src"), str(alone)])
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        *DATA_TESTS], cwd=alone, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout
