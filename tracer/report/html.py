"""The HTML report: one self-contained file (inline CSS and SVG, no scripts, nothing
fetched), with the same tables as stdout and the figure."""
from __future__ import annotations

import html

from tracer import __version__
from tracer.model.units import fmt_ns
from tracer.report import tables
from tracer.report.load import Capture

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1700px;
       color: #1a1a1a; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
p.context { color: #555; margin: 0.2em 0; font-size: 0.95em; }
p.losses { font-weight: 600; margin: 0.4em 0; }
div.warning { background: #fdecee; border-left: 5px solid #b00020; color: #7a0016;
              padding: 0.5em 0.8em; margin: 0.5em 0; font-weight: 600; }
ul.notes { color: #444; font-size: 0.95em; }
table { border-collapse: collapse; margin: 0.6em 0; font-variant-numeric: tabular-nums;
        font-size: 0.9em; }
th, td { padding: 0.2em 0.7em; border-bottom: 1px solid #ddd; text-align: right; }
th.name, td.name { text-align: left; }
thead th { border-bottom: 2px solid #888; background: #f4f4f4; }
figure { margin: 1em 0; } figure svg { width: 100%; height: auto; }
p.legend, footer { color: #555; font-size: 0.85em; }
"""


def render_html(captures: list[Capture], svg: str) -> str:
    esc = html.escape
    title = "vftrace report: " + " vs ".join(c.label for c in captures)
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
             f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
             f"<h1>{esc(title)}</h1>"]
    # Missing data first, then the figure, then the numbers behind it.
    for cap in captures:
        for n in tables.notes(cap):
            if n.warning:
                parts.append(f"<div class=\"warning\">WARNING: {esc(cap.label)}: "
                             f"{esc(n.text)}</div>")
    parts.append(f"<figure>\n{svg}\n</figure>")
    if len(captures) > 1 and (groups := tables.comparison_groups(captures)):
        parts.append("<section>\n<h2>Comparison</h2>")
        parts.append(tables.html_table(("CAPTURE", *tables.HEADER),
                                       [(c.label, *tables.cells(g, c)) for c, g in groups],
                                       names=2))
        parts.append("</section>")
    for cap in captures:
        parts.append(f"<section>\n<h2>{esc(cap.label)} <small>({esc(str(cap.path))})</small>"
                     f"</h2>")
        parts.append(f"<p class=\"context\">{esc(tables.context_line(cap))}</p>")
        if (line := tables.probes_line(cap)) is not None:
            parts.append(f"<p class=\"context\">{esc(line)}</p>")
        if (line := tables.exact_line(cap)) is not None:
            parts.append(f"<p class=\"own\">{esc(line)}</p>")
        if (line := tables.own_cost_line(cap)) is not None:
            parts.append(f"<p class=\"own\">{esc(line)}</p>")
        parts.append(f"<p class=\"losses\">VF switches: {cap.records} &middot; budget "
                     f"{esc(fmt_ns(cap.budget_ns))} &middot; "
                     f"{esc(tables.losses_line(cap))}</p>")
        notes = tables.notes(cap)
        for n in notes:
            if n.warning:
                parts.append(f"<div class=\"warning\">WARNING: {esc(n.text)}</div>")
        if plain := [n for n in notes if not n.warning]:
            parts.append("<ul class=\"notes\">" + "".join(
                f"<li>{esc(n.text)}</li>" for n in plain) + "</ul>")
        groups = tables.capture_groups(cap)
        if groups:
            parts.append(tables.html_table(tables.HEADER,
                                           [tables.cells(g, cap) for g in groups]))
        else:
            parts.append("<p>No switches in this capture.</p>")
        if exits := tables.exit_rows(cap):
            parts.append(tables.html_table(tables.EXIT_HEADER,
                                           [tables.exit_cells(r) for r in exits]))
        parts.append("</section>")
    parts.append(f"<p class=\"legend\">{esc(tables.LEGEND)}</p>")
    parts.append(f"<footer>Made by vftrace {esc(__version__)} report.</footer>\n"
                 "</body>\n</html>\n")
    return "\n".join(parts)
