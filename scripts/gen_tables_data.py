#!/usr/bin/env python3
"""Writes src/p11gate/codec/tables_data.py from tests/vectors/tables.json (the per-release
p11-kit tables: attribute value classes, parameterless mechanisms, serializers).

    python3 scripts/gen_tables_data.py            # rewrite the module
    python3 scripts/gen_tables_data.py --check    # exit 1 if the module is out of date
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "vectors" / "tables.json"
TARGET = ROOT / "src" / "p11gate" / "codec" / "tables_data.py"

HEADER = '''"""Per-release p11-kit RPC tables (generated from tests/vectors/tables.json by
scripts/gen_tables_data.py; do not edit by hand).

Attribute value classes, parameterless mechanisms (NOPARAM) and mechanisms with a
parameter serializer (SER) for p11-kit 0.24.1 and 0.26.4. Data only; see tables.py.
"""

# fmt: off
'''


def _set(name: str, values: list[int]) -> str:
    items = [f"{v:#x}," for v in sorted(values)]
    lines, line = [], "   "
    for it in items:
        if len(line) + 1 + len(it) > 92:
            lines.append(line)
            line = "   "
        line += " " + it
    lines.append(line)
    return f"{name}: frozenset[int] = frozenset({{\n" + "\n".join(lines) + "\n})\n"


def _dict(name: str, values: dict[str, str]) -> str:
    body = "".join(f'    {int(k, 16):#x}: "{v}",\n'
                   for k, v in sorted(values.items(), key=lambda kv: int(kv[0], 16)))
    return f"{name}: dict[int, str] = {{\n{body}}}\n"


def render() -> str:
    data = json.loads(SOURCE.read_text())
    out = [HEADER]
    for name, values in data.items():
        if name.startswith("_"):
            continue
        out.append(_dict(name, values) if isinstance(values, dict) else _set(name, values))
    return "".join(out) + "# fmt: on\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run scripts/gen_tables_data.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
