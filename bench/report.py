"""The report: percentiles of the latency histograms, the tables, the verdicts."""

from __future__ import annotations

import math
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

BINS_PER_S = 10_000  # latency histograms have 0.1 ms bins


def percentiles(hist: Counter[int], points: tuple[float, ...] = (50, 99)) -> dict[str, float | None]:
    """p50/p99/max in ms from a histogram of 0.1 ms bins (each bin reported at its upper edge)."""
    total = sum(hist.values())
    out: dict[str, float | None] = {f"p{p:g}": None for p in points}
    out["max"] = None
    out["n"] = total
    if not total:
        return out
    keys = sorted(hist)
    targets = [(p, math.ceil(total * p / 100.0)) for p in points]
    seen = 0
    ti = 0
    for k in keys:
        seen += hist[k]
        while ti < len(targets) and seen >= targets[ti][1]:
            out[f"p{targets[ti][0]:g}"] = round((k + 1) * 1000.0 / BINS_PER_S, 1)
            ti += 1
    out["max"] = round((keys[-1] + 1) * 1000.0 / BINS_PER_S, 1)
    return out


def fmt(value: Any, width: int) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:,.1f}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return text.rjust(width)


def render(report: dict[str, Any]) -> str:
    lines = []
    cols = [("system", 9), ("procs", 5), ("N", 6), ("rate", 6), ("offered/s", 11), ("delivered/s", 11),
            ("lost", 10), ("skip", 5), ("dup", 5), ("p50", 8), ("p99", 8), ("max", 8), ("fan p99", 8),
            ("srv CPU s", 9), ("CPU%", 6), ("us/line", 7), ("peak MB", 8), ("cli CPU s", 9),
            ("cli core%", 9), ("resync", 6),
            ("retry", 5), ("other", 5)]
    lines.append("Fan-out (latency = line emitted by LogPublisher -> received by the watcher, ms; "
                 "'fan p99' = Redis PUBLISH -> received)")
    lines.append(" ".join(name.rjust(w) for name, w in cols))
    for r in report["fanout"]:
        cores = r["core_busy_pct"]
        client_core = max((v["busy"] for k, v in cores.items() if k != "cpu0"), default=None)
        row = [
            "DeployHub" if r["system"] == "deployhub" else "naive", r.get("workers", 1),
            r["watchers"], r["rate"],
            r["offered_lines_per_s"], r["delivered_lines_per_s"], r["lost_lines"],
            r.get("lost_skipped_lines"), r["duplicate_or_reordered_lines"], r["latency_ms"]["p50"], r["latency_ms"]["p99"],
            r["latency_ms"]["max"], r["fanout_latency_ms"]["p99"], r["server_cpu_s"],
            r["server_cpu_pct_of_window"], r["server_cpu_us_per_line"], r["server_peak_rss_mb"],
            r["client_cpu_s"], client_core, r["resyncs"],
            r["connect_retries"], r["other_load_cores"],
        ]
        lines.append(" ".join(fmt(v, w) for v, (_n, w) in zip(row, cols)))
    if report["ratios"]:
        lines.append("")
        lines.append("DeployHub / naive relay, same load")
        lines.append(f"{'N':>6} {'rate':>6} {'delivered x':>11} {'DH p99 ms':>10} {'naive p99 ms':>12} "
                     f"{'DH lost':>10} {'naive lost':>12}")
        for q in report["ratios"]:
            lines.append(
                f"{q['watchers']:>6,} {q['rate']:>6,} {fmt(q['delivered_ratio'], 11)} "
                f"{fmt(q['deployhub_p99_ms'], 10)} {fmt(q['naive_p99_ms'], 12)} "
                f"{fmt(q['deployhub_lost'], 10)} {fmt(q['naive_lost'], 12)}"
            )
    if report["idle"]:
        lines.append("")
        lines.append("Idle subscribed connections (server RSS delta / connections)")
        lines.append(f"{'system':>9} {'conns':>7} {'RSS before MB':>13} {'RSS after MB':>12} "
                     f"{'KB/conn':>8} {'Redis conns +':>13} {'connect s':>9}")
        for r in report["idle"]:
            lines.append(
                f"{'DeployHub' if r['system'] == 'deployhub' else 'naive':>9} {r['subscribed']:>7,} "
                f"{r['rss_before_mb']:>13.1f} {r['rss_after_mb']:>12.1f} {r['kb_per_connection']:>8.1f} "
                f"{r['server_redis_connections_added']:>13} {r['connect_s']:>9.1f}"
            )
    if report.get("storm"):
        lines.append("")
        lines.append("Connect storm (all sockets connect + subscribe at once; failures retried with web/live.js backoff)")
        lines.append(f"{'system':>9} {'sockets':>8} {'subscribed':>10} {'failed tries':>12} {'all in, s':>9}  first error")
        for r in report["storm"]:
            lines.append(
                f"{'DeployHub' if r['system'] == 'deployhub' else 'naive':>9} {r['sockets']:>8,} "
                f"{r['subscribed']:>10,} {r['failed_attempts']:>12,} {r['all_subscribed_s']:>9.1f}  "
                f"{(r['errors'] or [''])[0][:60]}"
            )
    if report.get("finish"):
        lines.append("")
        lines.append("A deployment ends (final status published) while sockets watch its project")
        lines.append(f"{'system':>9} {'sockets':>8} {'got status':>10} {'resync msgs':>11} "
                     f"{'busy for s':>10} {'srv CPU s':>9} {'Too many connections':>21}")
        for r in report["finish"]:
            lines.append(
                f"{'DeployHub':>9} {r['subscribed']:>8,} {r['got_final_status']:>10,} "
                f"{r['resync_messages']:>11,} {fmt(r['still_busy_after_s'], 10)} "
                f"{r['server_cpu_s']:>9.2f} {r['too_many_connections']:>21,}"
            )
    lines.append("")
    lines.append("Targets")
    for t in report["targets"]:
        lines.append(f"  [{t['status']:>4}] {t['target']}: {t['detail']}")
    return "\n".join(lines)


def judge(report: dict[str, Any]) -> list[dict[str, str]]:
    dh = [r for r in report["fanout"] if r["system"] == "deployhub"]
    out = []
    if dh:
        bad = [r for r in dh if r["lost_lines"] or r["duplicate_or_reordered_lines"] or r["bad_frames"]
               or r["full_check_errors"] or r["subscribed"] < r["watchers"]]
        never = [r for r in dh if r.get("lost_skipped_lines") or r["duplicate_or_reordered_lines"]
                 or r["bad_frames"] or r["full_check_errors"]]
        out.append({
            "target": "zero lines lost (and no duplicates / reordering) for DeployHub",
            "status": "MET" if not bad else "MISS",
            "detail": "all configurations clean" if not bad else "; ".join(
                f"N={r['watchers']} rate={r['rate']}: {r['lost_lines']:,} lines not received "
                f"by the end of the drain window "
                f"({r.get('lost_skipped_lines', 0):,} skipped, {r.get('lost_late_lines', 0):,} still "
                f"queued/late), dup {r['duplicate_or_reordered_lines']}, bad frames {r['bad_frames']}, "
                f"full-check errors {r['full_check_errors']}, subscribed {r['subscribed']}/{r['watchers']}"
                for r in bad) + ("" if never else
                                 "; no line was ever skipped, duplicated or reordered"),
        })
    match = [r for r in dh if r["watchers"] == 1000 and r["rate"] == 2000]
    if match:
        p99 = match[0]["latency_ms"]["p99"]
        out.append({
            "target": "p99 < 100 ms at 1,000 watchers x 2,000 lines/s",
            "status": "MET" if p99 is not None and p99 < 100 else "MISS",
            "detail": f"p99 {p99} ms (PUBLISH->receipt p99 {match[0]['fanout_latency_ms']['p99']} ms)",
        })
    else:
        out.append({"target": "p99 < 100 ms at 1,000 watchers x 2,000 lines/s", "status": "n/a",
                    "detail": "configuration not run"})
    for r in (r for r in dh if r["watchers"] == 10000 and r["rate"] == 200):
        p99 = r["latency_ms"]["p99"]
        ok = p99 is not None and p99 < 100 and not r["lost_lines"]
        out.append({
            "target": f"10,000 watchers x 200 lines/s, {r.get('workers', 1)} process(es): p99 < 100 ms, nothing lost",
            "status": "MET" if ok else "MISS",
            "detail": f"p99 {p99} ms, {r['lost_lines']:,} lost, {r['server_cpu_us_per_line']} us "
                      f"server CPU per line",
        })
    idle = {r["system"]: r for r in report["idle"]}
    if "deployhub" in idle and "naive" in idle:
        mine, theirs = idle["deployhub"]["kb_per_connection"], idle["naive"]["kb_per_connection"]
        out.append({
            "target": "idle memory per socket at most the naive relay's",
            "status": "MET" if mine <= theirs else "MISS",
            "detail": f"DeployHub {mine} KB, naive {theirs} KB per connection",
        })
    ratios = [q for q in report["ratios"] if q["watchers"] == 1000]
    if ratios:
        ok = all(q["delivered_ratio"] is not None and q["delivered_ratio"] >= 5 for q in ratios)
        out.append({
            "target": ">= 5x the naive relay's delivered lines/s at 1,000 watchers",
            "status": "MET" if ok else "MISS",
            "detail": ", ".join(f"{q['rate']} lines/s: {q['delivered_ratio']}x" for q in ratios),
        })
    else:
        out.append({"target": ">= 5x the naive relay's delivered lines/s at 1,000 watchers",
                    "status": "n/a", "detail": "configuration not run"})
    return out


def ratios(fanout: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    by = {(r["system"], r["watchers"], r["rate"]): r for r in fanout}
    for (system, n, rate), dh in by.items():
        naive = by.get(("naive", n, rate))
        if system != "deployhub" or naive is None:
            continue
        out.append({
            "watchers": n, "rate": rate,
            "delivered_ratio": round(dh["delivered_lines_per_s"] / naive["delivered_lines_per_s"], 1)
            if naive["delivered_lines_per_s"] else None,
            "deployhub_delivered_per_s": dh["delivered_lines_per_s"],
            "naive_delivered_per_s": naive["delivered_lines_per_s"],
            "deployhub_p50_ms": dh["latency_ms"]["p50"], "naive_p50_ms": naive["latency_ms"]["p50"],
            "deployhub_p99_ms": dh["latency_ms"]["p99"], "naive_p99_ms": naive["latency_ms"]["p99"],
            "deployhub_lost": dh["lost_lines"], "naive_lost": naive["lost_lines"],
        })
    return out


def git_state(root: Path) -> dict[str, Any]:
    """What was measured: the commit, and which files differed from it (others edit live)."""
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True,
                                  timeout=10, check=False).stdout.rstrip("\n")  # porcelain lines start with a space
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "modified": [line[3:] for line in git("status", "--porcelain", "--", "deployhub", "worker").splitlines()],
    }
