"""The task perspective of one app as a self-contained HTML page ('scalebox-hpc report').

Every figure is aggregated in PostgreSQL (the report_* queries of db/reporting.sql, read
through db.reporting.Reporting.report) from one narrow copy of the app's attempts;
Python only lays out what comes back, as inline SVG: no JavaScript, no network, nothing
to install to view the page, and its size does not grow with the number of tasks. A
Gantt chart of a million attempts cannot draw them all: each worker's row is shaded by
the share of every time bin it was busy (all attempts count), and bars are drawn for
each worker's longest successful and longest failed attempts only; every failed attempt
still shows as a tick in its bin.
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import asdict
from datetime import datetime, timezone

from . import __version__
from .db.connection import Database
from .db.reporting import ReportSnapshot, Reporting
from .db.rows import StageBucket, TimeBin
from .states import Code, meaning, status_name

# The stages of an attempt: (label, start column, end column of task_exec, what it is).
# report_exec_table (db/reporting.sql) computes the same durations in SQL, under these names.
STAGES = {
    "queue_wait": ("queue wait", "t_ready", "t_claimed", "ready → claimed by a worker"),
    "batch_wait": ("held in batch", "t_claimed", "t_received", "claimed → received: waiting in the worker's batch"),
    "check_hook": ("check", "t_check_start", "t_check_end", "the module's check hook"),
    "stage_in": ("stage-in", "t_stagein_start", "t_stagein_end", "input transfer before the program"),
    "run": ("run", "t_program_start", "t_program_end", "program start → end"),
    "stage_out": ("stage-out", "t_stageout_start", "t_stageout_end", "program end → its output files read"),
    "committing": ("commit", "t_stageout_end", "t_completed", "output read → completion committed (in batches)"),
    "forward": ("forward", "t_forward_start", "t_forward_end", "cross-site forward of the results"),
}
# Red and grey mean failed and lost: modules get the other colours (Tableau 10).
MODULE_COLOURS = ["#4e79a7", "#f28e2b", "#59a14f", "#76b7b2", "#edc948", "#b07aa1", "#9c755f",
                  "#ff9da7", "#17becf", "#bcbd22"]
FAILED_COLOUR, LOST_COLOUR = "#d62728", "#7f7f7f"
# report_stage_buckets: bucket k (1..2600) holds durations d with log10(d) in
# [LOG_LOW + (k - 1) / FINE, LOG_LOW + k / FINE); the histograms merge them by quarter decade.
LOG_LOW, LOG_HIGH, FINE, COARSE = -6, 7, 200, 4


# ---------------------------------------------------------------- the figures
def collect(database: Database, app_id: int, *, bins: int = 200, gantt_rows: int = 100,
            gantt_bars: int = 3000, slowest: int = 20) -> dict:
    """Every figure of the report, as plain JSON-able data."""
    with Reporting(database).report(app_id) as snap:
        app = asdict(snap.app)
        if app["started_at"]:
            app["elapsed_seconds"] = ((app["finished_at"] or datetime.now(timezone.utc))
                                      - app["started_at"]).total_seconds()
        modules = {}
        for i, m in enumerate(snap.modules()):
            modules[m.id] = {"id": m.id, "name": m.name, "site": m.site,
                             "colour": MODULE_COLOURS[i % len(MODULE_COLOURS)],
                             "tasks": {}, "total": 0, "attempts": 0, "retries": 0, "failed_attempts": 0,
                             "lost": 0, "run_seconds": 0.0, "busy_seconds": 0.0}
        by_name = {m["name"]: m for m in modules.values()}
        for row in snap.module_status(60):
            if row.status is not None:
                by_name[row.module]["tasks"][status_name(row.status)] = row.n
                by_name[row.module]["total"] += row.n
        for a in snap.module_attempts():
            modules[a.module_id].update(attempts=a.attempts, retries=a.retries, failed_attempts=a.failed_attempts,
                                        lost=a.lost, run_seconds=a.run_seconds, busy_seconds=a.busy_seconds)
        span = snap.span()
        t0, t1 = span.t0, span.t1
        # Few attempts in many bins would draw noise: about five attempts a bin at least.
        bins = max(20, min(bins, sum(m["attempts"] for m in modules.values()) // 5))
        width = max((t1 - t0) / bins, 1e-3) if t0 is not None else 1.0
        series = _time_series(snap.time_bins(t0, width, bins), bins, width) if t0 is not None else ({}, {})
        workers = _gantt_workers(snap, series[1], gantt_rows)
        per_worker = max(2, gantt_bars // (2 * max(len(workers), 1)))
        bars = [asdict(b) for b in snap.gantt_bars([w["id"] for w in workers], per_worker)]
        stages, histograms = _stage_figures(
            [(stage, bucket) for stage in STAGES for bucket in snap.stage_buckets(stage)], modules)
        codes = [{"module": modules[c.module_id]["name"], "code": c.code, "attempts": c.attempts, "final": c.final,
                  "meaning": meaning(c.code)} for c in snap.exit_codes()]
        slow = [{"task_id": a.task_id, "attempt": a.attempt, "module": modules[a.module_id]["name"], "code": a.code,
                 "host": a.host, "worker_id": a.worker_id, "run": a.run, "queue_wait": a.queue_wait,
                 "busy": a.busy, "body": a.body} for a in snap.slowest(slowest)]

    for mid, m in modules.items():
        m["series"] = series[0].get(mid)
        ok = m["tasks"].get("OK", 0)
        m["ok"] = ok
        m["failed"] = sum(n for name, n in m["tasks"].items() if name.startswith("FAILED"))
        active = _active_seconds(m["series"], width)
        m["ok_per_second"] = ok / active if active else None
    totals = {k: sum(m[k] for m in modules.values())
              for k in ("total", "ok", "failed", "attempts", "retries", "failed_attempts", "lost",
                        "run_seconds", "busy_seconds")}
    return {"app": app, "generated_at": datetime.now(timezone.utc), "version": __version__,
            "modules": list(modules.values()), "totals": totals,
            "span": {"t0": t0, "t1": t1, "bins": bins, "bin_seconds": width},
            "gantt": {"workers": workers, "bars": bars, "per_worker": per_worker,
                      "workers_total": len(series[1])},
            "stages": stages, "histograms": histograms, "codes": codes, "slowest": slow}


def _stage_figures(rows: list[tuple[str, StageBucket]], modules: dict) -> tuple[list[dict], dict]:
    """Per module and stage: count, total, mean, min, max and percentiles; and per stage
    and module, attempts per quarter decade of duration (for the histograms)."""
    groups: dict[tuple[int, str], list[StageBucket]] = {}
    for stage, b in rows:
        groups.setdefault((b.module_id, stage), []).append(b)
    stages, histograms = [], {}
    for (mid, stage), buckets in sorted(groups.items()):
        buckets.sort(key=lambda b: b.bucket)
        n, total = sum(b.n for b in buckets), sum(b.total for b in buckets)
        figures = {"module": modules[mid]["name"], "stage": stage, "n": n, "total": total, "mean": total / n,
                   "min": buckets[0].low, "max": buckets[-1].high}
        figures.update({f"p{q}": _percentile(buckets, n, q / 100) for q in (50, 90, 99)})
        stages.append(figures)
        counts = histograms.setdefault(stage, {}).setdefault(figures["module"], {})
        for b in buckets:
            coarse = 0 if b.bucket == 0 else min((b.bucket - 1) // (FINE // COARSE) + 1,
                                                 (LOG_HIGH - LOG_LOW) * COARSE + 1)
            counts[coarse] = counts.get(coarse, 0) + b.n
    return stages, histograms


def _percentile(buckets: list[StageBucket], n: int, q: float) -> float:
    """As percentile_cont(q): linear between the values of ranks floor and ceil of
    q * (n - 1), each placed within its bucket between the bucket's exact min and max
    (exact where a bucket holds one or two values; else off by less than a bucket)."""
    def value(rank: int) -> float:
        before = 0
        for b in buckets:
            if rank < before + b.n:
                return b.low if b.n == 1 else b.low + (b.high - b.low) * (rank - before) / (b.n - 1)
            before += b.n
        return buckets[-1].high

    rank = q * (n - 1)
    below = math.floor(rank)
    low = value(below)
    return low + (value(below + 1) - low) * (rank - below) if rank > below else low


def _mean_running(cells: dict[int, TimeBin], bins: int, width: float) -> list[float]:
    """Mean number of attempts running in each bin, from per-bin starts and ends and the
    time left in the bin after each (report_time_bins)."""
    running, out = 0, []
    for b in range(bins):
        cell = cells.get(b)
        if cell is None:
            out.append(max(0.0, running))
            continue
        out.append(max(0.0, running + (cell.start_rest - cell.end_rest) / width))
        running += cell.starts - cell.ends
    return out


def _time_series(rows: list[TimeBin], bins: int, width: float) -> tuple[dict, dict]:
    """Per module: ok and failed attempts ending per second and mean running, per bin;
    per worker: busy share and failed attempts ending, per bin."""
    per_module: dict[int, dict[int, TimeBin]] = {}
    per_worker: dict[int, dict[int, TimeBin]] = {}
    for cell in rows:
        if cell.per_module:
            per_module.setdefault(cell.module_id, {})[cell.bin] = cell
        elif cell.worker_id is not None:
            per_worker.setdefault(cell.worker_id, {})[cell.bin] = cell

    def ended_ok(cells: dict[int, TimeBin]) -> tuple[list[int], list[int]]:
        return [cells[b].ends if b in cells else 0 for b in range(bins)], \
               [cells[b].ok if b in cells else 0 for b in range(bins)]

    modules, workers = {}, {}
    for mid, cells in per_module.items():
        ended, ok = ended_ok(cells)
        modules[mid] = {"ok_per_second": [n / width for n in ok],
                        "failed_per_second": [(e - n) / width for e, n in zip(ended, ok)],
                        "running": _mean_running(cells, bins, width)}
    for wid, cells in per_worker.items():
        ended, ok = ended_ok(cells)
        workers[wid] = {"busy": _mean_running(cells, bins, width), "ended": ended,
                        "failed": [e - n for e, n in zip(ended, ok)]}
    return modules, workers


def _active_seconds(series: dict | None, width: float) -> float:
    """Time from a module's first to its last busy bin."""
    if not series:
        return 0.0
    busy = [b for b, v in enumerate(series["running"]) if v > 0]
    return (busy[-1] - busy[0] + 1) * width if busy else 0.0


def _gantt_workers(snap: ReportSnapshot, series: dict, limit: int) -> list[dict]:
    """The workers the Gantt shows: the busiest `limit`, in module and id order."""
    rows = [asdict(w) for w in snap.workers()]
    shown = sorted(rows, key=lambda w: -w["busy_seconds"])[:limit]
    shown.sort(key=lambda w: (w["module_id"], w["id"]))
    for w in shown:
        w.update(series.get(w["id"], {"busy": [], "ended": [], "failed": []}))
    return shown


# ---------------------------------------------------------------- the page
def render(data: dict) -> str:
    app, totals = data["app"], data["totals"]
    title = f"app {app['id']} ({app['name']})"
    colours = {m["name"]: m["colour"] for m in data["modules"]}
    meta = [f"status <b>{_e(app['status'])}</b>", f"site {_e(app['site'])}",
            f"created {_when(app['created_at'])}", f"started {_when(app['started_at'])}",
            f"finished {_when(app['finished_at'])}"]
    if app.get("elapsed_seconds") is not None:
        meta.append(f"wall time {duration_text(app['elapsed_seconds'])}")
    cards = [("tasks", f"{totals['total']:,}"), ("ok", f"{totals['ok']:,}"), ("failed", f"{totals['failed']:,}"),
             ("attempts", f"{totals['attempts']:,}"), ("retries", f"{totals['retries']:,}"),
             ("lost (123)", f"{totals['lost']:,}"), ("program run time", duration_text(totals["run_seconds"])),
             ("worker busy time", duration_text(totals["busy_seconds"]))]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>scalebox-hpc report: {_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>Report of {_e(title)}</h1>", f'<p class="meta">{" · ".join(meta)}</p>',
        f'<p class="meta">result: <code>{_e(app["result"] if app["result"] is not None else "none")}</code>'
        + (f" · {_e(app['message'])}" if app.get("message") else "") + "</p>",
        '<div class="cards">' + "".join(f'<div class="card"><div class="v">{v}</div><div class="k">{_e(k)}</div></div>'
                                        for k, v in cards) + "</div>",
        "<h2>Modules</h2>", _module_table(data),
        "<h2>Timeline per worker</h2>", _gantt(data, colours),
        "<h2>Throughput and concurrency</h2>", _throughput(data),
        "<h2>Where the time goes: stage durations</h2>", _stages(data, colours),
        "<h2>Retries and failures by exit code</h2>", _codes_table(data, colours),
        f"<h2>Slowest attempts (program run time, top {len(data['slowest'])})</h2>", _slowest_table(data),
        f'<p class="meta">generated {_when(data["generated_at"])} by scalebox-hpc {_e(data["version"])}; '
        "details of one task: <code>scalebox-hpc task show TASK_ID</code>. The figures of this page are "
        "also in the JSON block <code>#report-data</code> of its source.</p>",
        '<script type="application/json" id="report-data">' + figures_json(data).replace("</", "<\\/") + "</script>",
        "</body></html>"]
    return "\n".join(parts)


def figures_json(data: dict, **kw) -> str:
    """The report's figures (without the per-bin series) as JSON."""
    figures = {k: v for k, v in data.items() if k not in ("gantt", "histograms")}
    figures["modules"] = [{k: v for k, v in m.items() if k != "series"} for m in data["modules"]]
    figures["gantt"] = {k: data["gantt"][k] for k in ("per_worker", "workers_total")}
    figures["gantt"]["workers_shown"] = len(data["gantt"]["workers"])
    figures["gantt"]["bars"] = len(data["gantt"]["bars"])
    return json.dumps(figures, default=_json_default, **kw)


def _json_default(value):
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#222;
     margin:24px auto;max-width:1200px;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
.meta{color:#555;margin:2px 0}code{background:#f3f3f3;padding:0 3px;border-radius:3px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:96px}
.card .v{font-size:20px;font-weight:600}.card .k{color:#666;font-size:12px}
table{border-collapse:collapse;margin:6px 0 10px}
th,td{padding:3px 7px;border-bottom:1px solid #eee;text-align:left;white-space:nowrap}
th{background:#f7f7f7;font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.bar{display:inline-block;height:10px;background:#d62728;vertical-align:-1px}
.charts{display:flex;flex-wrap:wrap;gap:8px}.note{color:#555;font-size:13px;max-width:1100px}
svg{font:11px system-ui,"DejaVu Sans",sans-serif;display:block}svg text{fill:#333}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _when(value) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S %Z}".strip() if isinstance(value, datetime) else "–"


def duration_text(seconds: float | None) -> str:
    """A duration for people: 340 µs, 12.5 ms, 3.2 s, 4 min 10 s, 2 h 5 min, 3 d 4 h."""
    if seconds is None:
        return "–"
    s = float(seconds)
    sign, a = ("-" if s < 0 else ""), abs(s)
    if a == 0:
        return "0 s"
    if a < 1e-3:
        return f"{sign}{a * 1e6:.0f} µs"
    if a < 1:
        return f"{sign}{a * 1e3:.3g} ms"
    if a < 60:
        return f"{sign}{a:.3g} s"
    for big, small, size, limit in (("min", "s", 1, 3600), ("h", "min", 60, 86400), ("d", "h", 3600, math.inf)):
        if a < limit:
            whole, rest = divmod(round(a / size), 60 if big != "d" else 24)
            return f"{sign}{whole} {big}" + (f" {rest} {small}" if rest else "")
    raise AssertionError("unreachable")


def _num(value, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _swatch(colour: str) -> str:
    return f'<span class="sw" style="background:{colour}"></span>'


def _table(headers: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    head = "".join(f'<th{" class=n" if i in numeric else ""}>{_e(h)}</th>' for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _module_table(data: dict) -> str:
    run_stats = {s["module"]: s for s in data["stages"] if s["stage"] == "run"}
    rows = []
    for m in [*data["modules"], dict(data["totals"], name="all", colour="#fff", tasks={}, ok_per_second=None)]:
        waiting = m["tasks"].get("READY", 0) + m["tasks"].get("INITIAL", 0)
        active = m["tasks"].get("QUEUED", 0) + m["tasks"].get("RUNNING", 0)
        stats = run_stats.get(m["name"], {})
        rows.append([_swatch(m["colour"]) + _e(m["name"]), _num(m["total"]), _num(m["ok"]), _num(m["failed"]),
                     _num(waiting) if m["tasks"] else "", _num(active) if m["tasks"] else "",
                     _num(m["attempts"]), _num(m["retries"]), _num(m["failed_attempts"]), _num(m["lost"]),
                     duration_text(m["run_seconds"]), duration_text(stats.get("mean")), duration_text(stats.get("p50")),
                     duration_text(stats.get("p99")), _num(m["ok_per_second"], 2)])
    return _table(["module", "tasks", "ok", "failed", "ready", "running", "attempts", "retries",
                   "failed attempts", "lost", "run time", "mean run", "p50 run", "p99 run", "ok tasks/s"],
                  rows, set(range(1, 15))) + (
        '<p class="note">Tasks by their current state; attempts are every execution (retries: attempts after '
        "a task's first; lost: attempts whose worker died, code 123). ok tasks/s over the module's active time.</p>")


# -- SVG ----------------------------------------------------------------------------------------
def _step(raw: float) -> float:
    """A round step (1, 2 or 5 times a power of ten) of at least `raw`."""
    if raw <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw - 1e-12)


TIME_STEPS = [1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900,
              1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800]


def _time_axis(x0: float, width: float, span: float, y_top: float, y_bottom: float) -> list[str]:
    """Vertical grid lines and labels of elapsed time (seconds from the first attempt)."""
    step = next((s for s in TIME_STEPS if s >= span / 8), _step(span / 8))
    out, t = [], 0.0
    while t <= span * 1.0001:
        x = x0 + t / span * width
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y_top}" y2="{y_bottom}" stroke="#e6e6e6"/>'
                   f'<text x="{x:.1f}" y="{y_bottom + 14}" text-anchor="middle">{_e(duration_text(t))}</text>')
        t += step
    return out


def _legend(items: list[tuple[str, str]], x: float, y: float, dashed: set[str] = frozenset()) -> str:
    out = []
    for label, colour in items:
        dash = ' stroke-dasharray="4 3"' if label in dashed else ""
        out.append(f'<line x1="{x:.0f}" x2="{x + 16:.0f}" y1="{y - 4}" y2="{y - 4}" stroke="{colour}" '
                   f'stroke-width="2.5"{dash}/><text x="{x + 20:.0f}" y="{y}">{_e(label)}</text>')
        x += 30 + 7 * len(label)
    return "".join(out)


def _line_chart(lines: list[tuple[str, str, list[float], bool]], span: float, y_label: str,
                width: int = 1160, height: int = 250) -> str:
    """lines: (label, colour, value per bin, dashed) over [0, span] seconds."""
    left, right, top, bottom = 64, 16, 26, 34
    pw, ph = width - left - right, height - top - bottom
    ytop, grid = _value_axis(max((v for _l, _c, vals, _d in lines for v in vals), default=0), 5,
                             left, pw, top, ph)
    out = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">', *grid]
    out += _time_axis(left, pw, span, top, top + ph)
    out.append(f'<text x="{left}" y="14" font-weight="600">{_e(y_label)}</text>')
    for _label, colour, values, dashed in lines:
        n = len(values)
        points = " ".join(f"{left + (b + 0.5) / n * pw:.1f},{top + ph - v / ytop * ph:.1f}"
                          for b, v in enumerate(values))
        dash = ' stroke-dasharray="4 3"' if dashed else ""
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6"{dash} points="{points}"/>')
    out.append(_legend([(label, colour) for label, colour, _v, _d in lines], left + 30 + 7 * len(y_label), 14,
                       {label for label, _c, _v, dashed in lines if dashed}))
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/></svg>')
    return "".join(out)


def _value_axis(ymax: float, ticks: int, left: float, pw: float, top: float, ph: float) -> tuple[float, list[str]]:
    """The top of a value axis from 0 to about ymax in round steps, and its grid lines and labels."""
    step = _step((ymax or 1) / ticks)
    ytop = math.ceil((ymax or 1) / step - 1e-9) * step
    digits = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    out, k = [], 0
    while k * step <= ytop + 1e-9:
        py = top + ph - k * step / ytop * ph
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py:.1f}" y2="{py:.1f}" stroke="#e6e6e6"/>'
                   f'<text x="{left - 5}" y="{py + 4:.1f}" text-anchor="end">{k * step:,.{digits}f}</text>')
        k += 1
    return ytop, out


def _throughput(data: dict) -> str:
    span = data["span"]["bins"] * data["span"]["bin_seconds"]
    mods = [m for m in data["modules"] if m["series"]]
    if not mods:
        return '<p class="note">No attempt has run yet.</p>'
    rate = [(m["name"], m["colour"], m["series"]["ok_per_second"], False) for m in mods]
    rate += [(f"{m['name']} failed", m["colour"], m["series"]["failed_per_second"], True)
             for m in mods if any(m["series"]["failed_per_second"])]
    running = [(m["name"], m["colour"], m["series"]["running"], False) for m in mods]
    return (_line_chart(rate, span, "attempts ending per second (solid: ok, dashed: failed)")
            + _line_chart(running, span, "attempts running (mean over each interval)")
            + f'<p class="note">{data["span"]["bins"]} intervals of {duration_text(data["span"]["bin_seconds"])} '
            f"from the first attempt's start ({_when(_epoch(data['span']['t0']))}).</p>")


def _epoch(t: float | None):
    return datetime.fromtimestamp(t, timezone.utc) if t is not None else None


def _gantt(data: dict, colours: dict) -> str:
    g, span_info = data["gantt"], data["span"]
    if not g["workers"]:
        return '<p class="note">No attempt has run on a worker yet.</p>'
    t0, bins = span_info["t0"], span_info["bins"]
    span = bins * span_info["bin_seconds"]
    n = len(g["workers"])
    rh = 16 if n <= 40 else 11 if n <= 80 else 7
    left, width, top = 230, 1160, 8
    pw = width - left - 16
    height = top + n * rh + 24
    module_of = {}
    out = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']
    out += _time_axis(left, pw, span, top, top + n * rh)
    row_of = {}
    cell = pw / bins
    name_of = {m["id"]: m["name"] for m in data["modules"]}
    for i, w in enumerate(g["workers"]):
        row_of[w["id"]] = i
        y = top + i * rh
        module = name_of.get(w["module_id"], "?")
        module_of[w["id"]] = module
        colour = colours.get(module, "#999")
        if rh >= 11:
            label = f"w{w['id']} {w['host'] or '?'}" + (f" job {w['slurm_job_id']}" if w["slurm_job_id"] else "")
            out.append(f'<text x="{left - 12}" y="{y + rh - 3}" text-anchor="end">{_e(label[:40])}</text>')
        out.append(f'<rect x="{left - 8}" y="{y + 1}" width="5" height="{rh - 2}" fill="{colour}">'
                   f"<title>{_e(module)}</title></rect>")
        # Busy share, in quarters, one rect per run of equal shade.
        levels = [min(4, round(v * 4)) for v in w["busy"]]
        b = 0
        while b < len(levels):
            e = b
            while e + 1 < len(levels) and levels[e + 1] == levels[b]:
                e += 1
            if levels[b]:
                out.append(f'<rect x="{left + b * cell:.1f}" y="{y + 1}" width="{(e - b + 1) * cell:.1f}" '
                           f'height="{rh - 2}" fill="{colour}" fill-opacity="{0.1 + 0.075 * levels[b]:.2f}"/>')
            b = e + 1
        for b, (nfail, ended) in enumerate(zip(w["failed"], w["ended"])):
            if nfail:     # the darker, the larger the failed share (full from one in four)
                out.append(f'<rect x="{left + b * cell:.1f}" y="{y}" width="{max(cell, 1.5):.1f}" '
                           f'height="{max(2, rh // 4)}" fill="{FAILED_COLOUR}" '
                           f'fill-opacity="{0.25 + 0.75 * min(1.0, 4 * nfail / ended):.2f}">'
                           f"<title>{nfail} of {ended} attempts failed</title></rect>")
    for bar in g["bars"]:
        i = row_of[bar["worker_id"]]
        x = left + (bar["start"] - t0) / span * pw
        w = max(0.8, (bar["end"] - bar["start"]) / span * pw)
        code = bar["code"]
        fill = colours.get(module_of[bar["worker_id"]], "#999") if code == 0 else \
            LOST_COLOUR if code == Code.LEASE_LOST else FAILED_COLOUR
        tip = (f"task {bar['task_id']} attempt {bar['attempt']} · {module_of[bar['worker_id']]} · code {code} · "
               f"{duration_text(bar['end'] - bar['start'])} from +{duration_text(bar['start'] - t0)}"
               + (f" (program {duration_text(bar['run'])})" if bar["run"] is not None else ""))
        out.append(f'<rect x="{x:.1f}" y="{top + i * rh + 2}" width="{w:.1f}" height="{rh - 4}" fill="{fill}" '
                   f'stroke="#fff" stroke-width="0.3"><title>{_e(tip)}</title></rect>')
    out.append("</svg>")
    legend = " ".join(f"{_swatch(m['colour'])}{_e(m['name'])}" for m in data["modules"])
    shown = f"{n} of {g['workers_total']} workers (the busiest)" if n < g["workers_total"] else f"all {n} workers"
    return "".join(out) + (
        f'<p class="note">{legend} {_swatch(FAILED_COLOUR)}failed {_swatch(LOST_COLOUR)}lost (123). '
        f"One row per worker ({shown}), time from the first attempt. The shade of a row is the share of each of "
        f"the {bins} intervals the worker was busy (every attempt counts). Bars: each worker's "
        f"{g['per_worker']} longest successful and {g['per_worker']} longest failed attempts "
        f"({len(g['bars']):,} bars; hover one for its task). A red tick marks an interval in which attempts "
        "failed (the darker, the larger their share).</p>")


def _stages(data: dict, colours: dict) -> str:
    recorded = {s["stage"] for s in data["stages"]}
    rows = []
    for stage, (label, _start, _end, what) in STAGES.items():
        for s in (s for s in data["stages"] if s["stage"] == stage):
            rows.append([_e(label), _swatch(colours[s["module"]]) + _e(s["module"]), _num(s["n"]),
                         *(duration_text(s[k]) for k in ("total", "mean", "p50", "p90", "p99", "max"))])
    missing = [label for stage, (label, *_rest) in STAGES.items() if stage not in recorded]
    charts = [_histogram(label, what, data["histograms"][stage], colours)
              for stage, (label, _start, _end, what) in STAGES.items() if stage in data["histograms"]]
    return (_table(["stage", "module", "attempts", "total", "mean", "p50", "p90", "p99", "max"], rows,
                   set(range(2, 9)))
            + '<p class="note">'
            + "; ".join(f"<b>{_e(label)}</b>: {_e(what)}" for label, _start, _end, what in STAGES.values())
            + "." + (f" Not recorded in this run: {_e(', '.join(missing))}." if missing else "")
            + " Queue wait and held in batch compare the database's clock with the worker's.</p>"
            + '<div class="charts">' + "".join(charts) + "</div>")


def _histogram(label: str, what: str, per_module: dict[str, dict[int, int]], colours: dict,
               width: int = 570, height: int = 210) -> str:
    """Attempts per duration bucket (log scale), one step line per module."""
    left, right, top, bottom = 52, 12, 24, 34
    pw, ph = width - left - right, height - top - bottom
    used = [b for counts in per_module.values() for b in counts]
    lo, hi = max(0, min(used) - 1), min((LOG_HIGH - LOG_LOW) * COARSE + 1, max(used) + 1)

    def x_of(bucket: float) -> float:
        return left + (bucket - lo) / (hi + 1 - lo) * pw

    ytop, grid = _value_axis(max(n for counts in per_module.values() for n in counts.values()), 4,
                             left, pw, top, ph)
    out = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">', *grid,
           f'<text x="{left}" y="14" font-weight="600">{_e(label)}</text>'
           f'<text x="{left + 12 + 7 * len(label)}" y="14" fill="#666">{_e(what)}</text>']
    decades = [d for d in range(LOG_LOW, LOG_HIGH + 1) if lo <= 1 + (d - LOG_LOW) * COARSE <= hi + 1]
    for decade in decades:
        x = x_of(1 + (decade - LOG_LOW) * COARSE)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" stroke="#ddd"/>')
        if len(decades) <= 8 or (decade - decades[0]) % 2 == 0:     # room for a label a decade, or every other
            label = duration_text(10.0 ** decade) if decade < 0 else f"{10 ** decade:,} s"
            anchor = "end" if x > left + pw - 16 else "middle"
            out.append(f'<text x="{x:.1f}" y="{top + ph + 14}" text-anchor="{anchor}">{_e(label)}</text>')
    for module, counts in per_module.items():
        points = []
        for b in range(lo, hi + 1):
            py = top + ph - counts.get(b, 0) / ytop * ph
            points += [f"{x_of(b):.1f},{py:.1f}", f"{x_of(b + 1):.1f},{py:.1f}"]
        out.append(f'<polyline fill="none" stroke="{colours[module]}" stroke-width="1.6" points="{" ".join(points)}">'
                   f"<title>{_e(module)}</title></polyline>")
    out.append(f'<text x="{left + pw}" y="{top + ph + 28}" text-anchor="end" fill="#666">attempts per '
               f"quarter decade of duration</text></svg>")
    return "".join(out)


def _codes_table(data: dict, colours: dict) -> str:
    if not data["codes"]:
        return '<p class="note">No attempt has ended yet.</p>'
    most = max(c["attempts"] for c in data["codes"])
    rows = [[_swatch(colours[c["module"]]) + _e(c["module"]), _e(c["code"]), _e(c["meaning"]), _num(c["attempts"]),
             _num(c["attempts"] - c["final"]) if c["code"] else "", _num(c["final"]),
             f'<span class="bar" style="width:{max(1, round(200 * c["attempts"] / most))}px;'
             f'background:{colours[c["module"]] if c["code"] == 0 else FAILED_COLOUR}"></span>']
            for c in data["codes"]]
    return _table(["module", "code", "meaning", "attempts", "then retried", "final", ""], rows, {1, 3, 4, 5}) + (
        '<p class="note">then retried: attempts with this code after which the task ran again (or waits to); '
        "final: tasks whose last attempt ended with this code.</p>")


def _slowest_table(data: dict) -> str:
    rows = [[_e(s["task_id"]), _e(s["attempt"]), _e(s["module"]), _e(s["code"]), _e(s["host"] or "–"),
             _e(s["worker_id"] if s["worker_id"] is not None else "–"),
             *(duration_text(s[k]) for k in ("run", "queue_wait", "busy")), f"<code>{_e(s['body'])}</code>"]
            for s in data["slowest"]]
    return _table(["task", "attempt", "module", "code", "host", "worker", "run", "queue wait", "on worker", "body"],
                  rows, {0, 1, 3, 6, 7, 8})


def write(database: Database, app_id: int, path: str, **options) -> dict:
    """Collect the figures and write the page; returns the figures."""
    data = collect(database, app_id, **options)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(render(data))
    return data
