"""A short, self-contained HTML report of a run (plots embedded as PNG)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from server.registry import RunFolder


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


Points = list[tuple[int, float]]


def _series(rounds: list[dict[str, Any]], part: str, metric: str) -> dict[str, Points]:
    out: dict[str, Points] = {}
    for row in rounds:
        for site_id, site in row["sites"].items():
            if metric in site[part]:
                out.setdefault(site_id, []).append((row["server_round"], site[part][metric]))
    return out


def _plot(rounds: list[dict[str, Any]], part: str, metric: str, title: str,
          pooled: bool = False) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for site_id, points in sorted(_series(rounds, part, metric).items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=site_id)
    if pooled:
        ax.plot([r["server_round"] for r in rounds], [r["pooled_score"] for r in rounds],
                marker="s", color="black", linestyle="--", label="pooled")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    data = _png(fig)
    plt.close(fig)
    return data


def write_report(run: RunFolder) -> Path:
    """Write report.html into the run folder; return its path."""
    rounds = run.rounds()
    registry = run.read_json("registry.json") or {}
    config = run.read_json("config.json") or {}
    epsilon = run.read_json("epsilon.json") or {}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fedrad run report</title>",
        "<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}</style>",
        "</head><body>",
        f"<h1>fedrad run {html.escape(str(registry.get('run_id', '?')))}</h1>",
        f"<p>Status: <b>{html.escape(str(registry.get('status', '?')))}</b>; "
        f"{len(rounds)} of {config.get('num-rounds', '?')} rounds completed.</p>",
    ]
    if rounds:
        metric = rounds[-1]["score_metric"]
        parts.append(f"<img alt='{metric} per round per site' src='data:image/png;base64,"
                     f"{_plot(rounds, 'evaluation', metric, f'{metric} per round', True)}'>")
        parts.append(f"<img alt='epsilon per site' src='data:image/png;base64,"
                     f"{_plot(rounds, 'train', 'epsilon-total', 'privacy spent (ε)')}'>")
        parts.append("<h2>Rounds</h2><table><tr><th>round</th><th>sites</th><th>pooled score</th>"
                     "<th>wall s</th><th>slowest site s</th><th>overhead s</th></tr>")
        for row in rounds:
            parts.append(
                f"<tr><td>{row['server_round']}</td>"
                f"<td>{row['sites_trained']}/{row['sites_expected']}</td>"
                f"<td>{row['score_metric']} {row['pooled_score']:.3f}</td>"
                f"<td>{row['wall_seconds']:.1f}</td>"
                f"<td>{row['slowest_site_seconds']:.1f}</td>"
                f"<td>{row['overhead_seconds']:.1f}</td></tr>"
            )
        parts.append("</table>")
    parts.append("<h2>Privacy spent per site</h2><table><tr><th>site</th><th>ε</th></tr>")
    for site_id, value in sorted(epsilon.items()):
        parts.append(f"<tr><td>{html.escape(site_id)}</td><td>{value:.3f}</td></tr>")
    parts.append("</table><h2>Run configuration</h2><table>")
    for key, value in sorted(config.items()):
        parts.append(f"<tr><td>{html.escape(key)}</td><td>{html.escape(str(value))}</td></tr>")
    parts.append("</table><h2>Checkpoints</h2><table><tr><th>round</th><th>sha256</th></tr>")
    for rnd, entry in sorted(registry.get("checkpoints", {}).items(), key=lambda kv: int(kv[0])):
        parts.append(f"<tr><td>{rnd}</td><td><code>{entry['sha256']}</code></td></tr>")
    parts.append("</table></body></html>")
    path = run.root / "report.html"
    path.write_text("\n".join(parts))
    return path
