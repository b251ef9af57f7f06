"""A run's HTML report from its run folder: learning curves per site, participation,
privacy spent, rounds, config, checkpoints. Plots are matplotlib PNGs embedded as data
URIs, so the file stands alone (no script, no external resource).

`run_sections` is shared with `fedrad report` (which adds sections made from a site's
local data) and the dashboard (which serves the same charts as PNG files).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from common import keys
from server.registry import RunFolder

Points = list[tuple[int, float]]
STATUS_COLOURS = {"ok": "#2e7d32", "-": "#e0e0e0"}  # anything else: not counted (red)


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return buffer.getvalue()


def img_tag(data: bytes, alt: str) -> str:
    return (f"<img alt='{html.escape(alt)}' "
            f"src='data:image/png;base64,{base64.b64encode(data).decode()}'>")


def _series(rounds: list[dict[str, Any]], part: str, metric: str) -> dict[str, Points]:
    out: dict[str, Points] = {}
    for row in rounds:
        for site_id, site in row["sites"].items():
            if metric in site[part]:
                out.setdefault(site_id, []).append((row["server_round"], site[part][metric]))
    return out


def curve_png(rounds: list[dict[str, Any]], part: str, metric: str, title: str,
              pooled: bool = False) -> bytes:
    """One line per site (and the pooled score) over rounds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for site_id, points in sorted(_series(rounds, part, metric).items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=site_id)
    if pooled:
        scored = [r for r in rounds if r["pooled_score"] == r["pooled_score"]]  # not NaN
        ax.plot([r["server_round"] for r in scored], [r["pooled_score"] for r in scored],
                marker="s", color="black", linestyle="--", label="pooled")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return png_bytes(fig)


def participation(rounds: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Site → its status word in each round ('-': not part of that round)."""
    sites = sorted({s for row in rounds for s in row["sites"]})
    return {s: [row["sites"].get(s, {}).get("status", "-") for row in rounds] for s in sites}


def participation_png(rounds: list[dict[str, Any]]) -> bytes:
    """Sites x rounds: green counted, red not counted (failed, dropped, rejected), grey
    absent."""
    from matplotlib.colors import to_rgb

    plt = pyplot()
    table = participation(rounds)
    grid = [[to_rgb(STATUS_COLOURS.get(cell, "#c62828")) for cell in cells]
            for cells in table.values()]
    fig, ax = plt.subplots(figsize=(max(3.0, 0.6 * len(rounds) + 2), 0.45 * len(table) + 1.2))
    if grid:
        ax.imshow(grid, aspect="auto")
    ax.set_yticks(range(len(table)), list(table))
    ax.set_xticks(range(len(rounds)), [str(r["server_round"]) for r in rounds])
    ax.set_xlabel("round")
    ax.set_title("participation (green counted, red not counted, grey absent)", fontsize=9)
    return png_bytes(fig)


def charts(run: RunFolder) -> dict[str, tuple[str, bytes]]:
    """name → (caption, PNG) of every chart a run's records allow."""
    rounds = run.rounds()
    if not rounds:
        return {}
    metric = rounds[-1]["score_metric"]
    out = {
        "score": (f"{metric} per site per round, and pooled",
                  curve_png(rounds, "evaluation", metric, f"{metric} (held-out, per site)",
                            pooled=True)),
        "participation": ("participation per round", participation_png(rounds)),
    }
    if any("train-loss" in s["train"] for r in rounds for s in r["sites"].values()):
        # only sites whose policy shares it (share-train-loss): it is not DP-noised
        out["loss"] = ("training loss per site per round",
                       curve_png(rounds, "train", "train-loss", "training loss per site"))
    if any("epsilon-total" in s["train"] for r in rounds for s in r["sites"].values()):
        out["privacy"] = ("privacy spent per site: ε per patient (DP-SGD samples and "
                          "clips each patient's images together; each site's ledger)",
                          curve_png(rounds, "train", "epsilon-total", "privacy spent (ε)"))
    return out


def best_model_lines(registry: dict[str, Any]) -> list[str]:
    """The run's best round (RUN:best), early stop, and its ratio to a pooled baseline."""
    best = registry.get("best")
    if not best:
        return ["<p>No evaluated round yet, so no best model.</p>"]
    run_id = html.escape(str(registry.get("run_id", "?")))
    text = (f"<p>Best model: <b>{run_id}:best</b> = round {best['round']}, pooled "
            f"{html.escape(best['metric'])} {best['score']:.3f}")
    baseline = registry.get("pooled_baseline")
    if baseline and baseline.get("metric") == best["metric"]:
        text += (f"; {best['score'] / baseline['score']:.3f} of the pooled baseline "
                 f"({baseline['score']:.3f}, {html.escape(str(baseline.get('source', '')))})")
    stopped = registry.get("stopped_early")
    if stopped:
        text += (f". Stopped early after round {stopped['after_round'] + 1}: no better "
                 f"model in {stopped['patience']} round(s) (early-stop-patience)")
    return [text + ".</p>"]


def privacy_lines(config: dict[str, Any], epsilon: dict[str, float],
                  rounds: list[dict[str, Any]]) -> list[str]:
    """ε per site, and in distributed DP which guarantee is which (client.distributed_dp):
    the σ of the secure sum (charged to the sites' budgets) and each site's own share."""
    parts = ["<h2>Privacy spent per site</h2>"]
    floor = {site: points[-1][1] for site, points in
             _series(rounds, "train", keys.EPSILON_FLOOR).items()}
    distributed = config.get("dp-mode") == "distributed"
    if distributed:
        parts.append(
            "<p>Distributed DP: each site added its share of the noise and the secure sum "
            "carries all of it. <b>ε (sum)</b> holds while every site of each masked sum "
            "(at least secagg-min-sites = "
            f"{html.escape(str(config.get('secagg-min-sites', '?')))}) added its share; "
            "it is what the sites' budgets are charged. <b>ε (own share)</b> is the floor "
            "each site holds on its own noise alone, whatever the others did.</p>")
    parts.append(f"<table><tr><th>site</th><th>{'ε (sum)' if distributed else 'ε'}</th>"
                 + ("<th>ε (own share), this run</th>" if floor else "") + "</tr>")
    for site_id, value in sorted(epsilon.items()):
        cell = f"<td>{floor[site_id]:.3f}</td>" if site_id in floor else \
            ("<td>-</td>" if floor else "")
        parts.append(f"<tr><td>{html.escape(site_id)}</td><td>{value:.3f}</td>{cell}</tr>")
    parts.append("</table>")
    return parts


def _curve_key(point: dict[str, Any]) -> tuple[str, str, str, float]:
    epsilon = point.get("epsilon")
    return (str(point["mode"]), str(point["start"]), str(point["trainable"]),
            float("inf") if epsilon is None else float(epsilon))


def dp_curve_lines(config: dict[str, Any], registry: dict[str, Any]) -> list[str]:
    """What DP costs in quality: the recorded utility-vs-ε curve (bench/dp_utility.py
    --record), with the point of this run's settings named."""
    if not config.get("dp-enabled", True):
        return []
    curve = registry.get("dp_curve")
    if not curve:
        return ["<p>No utility-vs-ε curve is recorded for this run: "
                "<code>python bench/dp_utility.py --record RUN_DIR</code> measures what DP "
                "costs on these sites against pooled training without DP.</p>"]
    mine = (str(config.get("dp-mode", "local")),
            "prior" if config.get("init-weights") else "scratch",
            str(config.get("dp-trainable", "all")),
            float(config.get("dp-target-epsilon", 0.0)))
    parts = ["<h2>What DP costs in quality</h2>",
             f"<p>Best validation score ÷ the pooled no-DP baseline, range over seeds "
             f"({html.escape(str(curve.get('source', '')))}). This run's settings: "
             f"{html.escape(' / '.join(str(x) for x in mine[:3]))}, ε {mine[3]:g}"]
    points = sorted(curve.get("points", []), key=_curve_key)
    match = [p for p in points if _curve_key(p) == mine]
    parts[-1] += (f": measured at {match[0]['ratio_min']:.3f}-{match[0]['ratio_max']:.3f} of "
                  "pooled.</p>" if match else ": not on the recorded curve.</p>")
    parts.append("<table><tr><th>dp-mode</th><th>start</th><th>dp-trainable</th><th>ε</th>"
                 "<th>÷ pooled</th></tr>")
    for point in points:
        key = _curve_key(point)
        style = " style='font-weight:bold'" if key == mine else ""
        epsilon = "no DP" if point.get("epsilon") is None else f"{key[3]:g}"
        parts.append(f"<tr{style}><td>{html.escape(key[0])}</td><td>{html.escape(key[1])}"
                     f"</td><td>{html.escape(key[2])}</td><td>{epsilon}</td>"
                     f"<td>{point['ratio_min']:.3f}-{point['ratio_max']:.3f}</td></tr>")
    parts.append("</table>")
    return parts


def run_sections(run: RunFolder) -> list[str]:
    """The HTML body of a run's report, from its run folder alone."""
    rounds = run.rounds()
    registry = run.read_json("registry.json") or {}
    config = run.read_json("config.json") or {}
    epsilon = run.read_json("epsilon.json") or {}
    parts = [
        f"<h1>fedrad run {html.escape(str(registry.get('run_id', '?')))}</h1>",
        f"<p>Status: <b>{html.escape(str(registry.get('status', '?')))}</b>; "
        f"{len(rounds)} of {html.escape(str(config.get('num-rounds', '?')))} rounds recorded; "
        f"strategy {html.escape(str(config.get('strategy', 'fedavg')))}.</p>",
    ]
    parts += best_model_lines(registry)
    parts.append("<h2>Learning curves, participation, privacy</h2>")
    parts += [f"<figure>{img_tag(png, caption)}<figcaption>{html.escape(caption)}"
              "</figcaption></figure>" for caption, png in charts(run).values()]
    if rounds:
        parts.append("<h2>Rounds</h2><table><tr><th>round</th><th>sites counted</th>"
                     "<th>pooled score</th><th>wall s</th><th>slowest site s</th>"
                     "<th>overhead s</th></tr>")
        for row in rounds:
            parts.append(
                f"<tr><td>{row['server_round']}</td>"
                f"<td>{row['sites_trained']}/{row['sites_expected']}</td>"
                f"<td>{row['score_metric']} {row['pooled_score']:.3f}</td>"
                f"<td>{row['wall_seconds']:.1f}</td>"
                f"<td>{row['slowest_site_seconds']:.1f}</td>"
                f"<td>{row['overhead_seconds']:.1f}</td></tr>")
        parts.append("</table><h2>Participation</h2><table><tr><th>site</th>" + "".join(
            f"<th>{r['server_round']}</th>" for r in rounds) + "</tr>")
        for site, cells in participation(rounds).items():
            parts.append(f"<tr><td>{html.escape(site)}</td>" + "".join(
                f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    cross = run.read_json("cross-site.json")
    if cross and rounds:
        metric = rounds[-1]["score_metric"]
        columns = sorted({s for row in cross.values() for s in row})
        parts.append(f"<h2>Cross-site validation ({html.escape(metric)})</h2><p>Rows: the "
                     "model (global, or one site's local model of the last round); columns: "
                     "the site whose held-out patients it was evaluated on.</p><table><tr>"
                     "<th>model</th>" + "".join(f"<th>{html.escape(s)}</th>" for s in columns)
                     + "</tr>")
        for model, row in cross.items():
            scores = "".join(f"<td>{row[s][metric]:.3f}</td>" if metric in row.get(s, {})
                             else "<td>-</td>" for s in columns)
            parts.append(f"<tr><td>{html.escape(model)}</td>{scores}</tr>")
        parts.append("</table>")
    parts += privacy_lines(config, epsilon, rounds)
    parts += dp_curve_lines(config, registry)
    parts.append("<h2>Run configuration</h2><table>")
    for key, value in sorted(config.items()):
        parts.append(f"<tr><td>{html.escape(key)}</td><td>{html.escape(str(value))}</td></tr>")
    parts.append("</table><h2>Checkpoints</h2><table><tr><th>round</th><th>sha256</th></tr>")
    for rnd, entry in sorted(registry.get("checkpoints", {}).items(), key=lambda kv: int(kv[0])):
        parts.append(f"<tr><td>{rnd}</td><td><code>{entry['sha256']}</code></td></tr>")
    parts.append("</table>")
    return parts


# A report is self-contained: inline styles and data: images, nothing loaded or run.
PAGE_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def page(title: str, body: list[str], refresh: int | None = None) -> str:
    head = "<meta charset='utf-8'>" + f"<meta http-equiv='Content-Security-Policy' " \
        f"content=\"{PAGE_CSP}\">" + (f"<meta http-equiv='refresh' content='{refresh}'>"
                                      if refresh else "")
    return "\n".join([
        f"<!doctype html><html><head>{head}<title>{html.escape(title)}</title>",
        "<link rel='icon' href='data:,'>",  # no favicon request
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px}figure{display:inline-block;margin:.5em}"
        "figcaption{font-size:80%;color:#555}</style></head><body>",
        *body, "</body></html>"])


def write_report(run: RunFolder, extra: list[str] | None = None,
                 path: Path | None = None) -> Path:
    """Write the report (default: report.html in the run folder); return its path."""
    path = path or run.root / "report.html"
    path.write_text(page(f"fedrad run {run.run_id}", run_sections(run) + (extra or [])))
    return path
