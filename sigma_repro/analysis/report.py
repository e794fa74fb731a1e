"""Write an analysis result: Markdown table + CSV beside a PNG, with provenance."""

from __future__ import annotations

import csv
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sigma_repro import provenance


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(out_dir: str | Path, name: str, *, title: str, claim: str, method: str,
                 rows: list[dict[str, Any]], findings: str, figure: str | None = None) -> Path:
    """``<out_dir>/<name>.md`` and ``.csv``; returns the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    with (out / f"{name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    machine = provenance.machine_info()
    table = "\n".join(
        ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        + ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    )
    md = [
        f"# {title}",
        "",
        f"**Paper's claim.** {claim}",
        "",
        f"**What we measured.** {method}",
        "",
        f"**Findings.** {findings}",
        "",
        *([f"![{name}]({figure})", ""] if figure else []),
        table,
        "",
        f"Command: `sigma-repro {shlex.join(sys.argv[1:])}`; git sha {provenance.git_sha()}; "
        f"{machine['cpu_model']} ({machine['cpu_cores']} cores, {machine['device_name']}), torch "
        f"{machine['torch_version']}; {datetime.now(timezone.utc).date().isoformat()}. "
        f"Data: `{name}.csv`.",
        "",
    ]
    path = out / f"{name}.md"
    path.write_text("\n".join(md))
    return path
