"""From measured figures to the one table, the targets and the SUMMARY line.

`build_rows(figures)` makes one `Row` per line of the table: the three columns (direct,
dario, nginx) as numbers and as text, dario against direct and against nginx, and, on
rows that carry one of the project's targets, the target and whether dario met it.
`render` lays the rows out as text; `summary` writes the closing line; `as_json` keeps
every number. Pure functions of the figures: nothing here measures or prints.
"""

import dataclasses

COLUMNS = ("direct", "dario", "nginx")


@dataclasses.dataclass
class Row:
    key: str
    label: str
    values: dict                       # column -> number or None (what the JSON keeps)
    cells: dict                        # column -> text
    vs_direct: str = ""
    vs_nginx: str = ""
    target: str = ""
    met: object = None                 # True / False / None (no target, or not measurable)
    extra: dict = dataclasses.field(default_factory=dict)


def _num(value, digits=2):
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def _plus_ms(value):
    return "" if value is None else f"{value:+.2f} ms"


def _cells(values, fmt=_num):
    return {c: fmt(values.get(c)) if values.get(c) is not None else "-" for c in COLUMNS}


def _get(tree, *path):
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _added(values):
    d, g = values.get("direct"), values.get("dario")
    return g - d if d is not None and g is not None else None


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def latency_rows(fig):
    rows = []
    values = {}
    for stat, limit in (("p50", 1.0), ("p99", 3.0)):
        values[stat] = {c: _get(fig, "latency", c, f"{stat}_ms") for c in COLUMNS}
        added = _added(values[stat])
        nginx_added = None
        if values[stat]["nginx"] is not None and values[stat]["direct"] is not None:
            nginx_added = values[stat]["nginx"] - values[stat]["direct"]
        over_nginx = (values[stat]["dario"] - values[stat]["nginx"]
                      if values[stat]["nginx"] is not None and values[stat]["dario"] is not None else None)
        rows.append(Row(
            f"latency_{stat}_ms", f"latency {stat}, 1 client, non-stream (ms)", values[stat],
            _cells(values[stat]), vs_direct=_plus_ms(added), vs_nginx=_plus_ms(over_nginx),
            target=f"added <= {limit:g} ms", met=added is not None and added <= limit,
            extra={"added_ms": added, "nginx_added_ms": nginx_added}))
    dario_added = _added(values["p50"])
    nginx_added = rows[0].extra["nginx_added_ms"]
    ratio = _ratio(dario_added, nginx_added) if nginx_added and nginx_added > 0 else None
    rows.append(Row(
        "added_p50_vs_nginx", "added p50: dario / nginx", {"direct": None, "dario": ratio, "nginx": None},
        {"direct": "-", "dario": f"{_num(dario_added)} ms", "nginx": f"{_num(nginx_added)} ms"},
        vs_nginx=f"{ratio:.1f}x" if ratio is not None else "", target="<= 2x",
        met=(ratio <= 2) if ratio is not None else None,
        extra={"dario_added_ms": dario_added, "nginx_added_ms": nginx_added}))
    return rows


def throughput_rows(fig, clients_list=(16, 64)):
    rows = []
    for clients in clients_list:
        tp = {c: _get(fig, "throughput", c, str(clients)) for c in COLUMNS}
        rps = {c: tp[c]["rps"] if tp[c] else None for c in COLUMNS}
        errors = {c: tp[c]["errors"] if tp[c] else None for c in COLUMNS}
        share = _ratio(rps["dario"], rps["direct"])
        cells = {c: f"{rps[c]:.0f} ({errors[c]} err)" if tp[c] else "-" for c in COLUMNS}
        met = share is not None and share >= 0.70 and errors["dario"] == 0 if clients == 16 else None
        rows.append(Row(
            f"throughput_{clients}_rps", f"throughput, {clients} clients (req/s)", rps, cells,
            vs_direct=f"{100 * share:.0f}%" if share is not None else "",
            vs_nginx=f"{100 * _ratio(rps['dario'], rps['nginx']):.0f}%" if rps["nginx"] else "",
            target=">= 70% of direct, 0 err" if clients == 16 else "", met=met,
            extra={"errors": errors, "pct_of_direct": 100 * share if share is not None else None,
                   "server_cpu_pct": {c: tp[c]["server_cpu_pct"] if tp[c] else None for c in COLUMNS},
                   "client_cpu_pct": {c: tp[c]["client_cpu_pct"] if tp[c] else None for c in COLUMNS}}))
    tp = {c: _get(fig, "throughput", c, "16") for c in COLUMNS}
    server = {c: tp[c]["server_cpu_pct"] if tp[c] else None for c in COLUMNS}
    def cpu_cell(c):
        if not tp[c]:
            return "-"
        server_part = (f"sim {tp[c]['server_cpu_pct']:.0f}%" if c == "direct" else
                       f"{c} {tp[c]['server_cpu_pct']:.0f}% + sim {tp[c]['sim_cpu_pct']:.0f}%")
        return f"{server_part}, clients {tp[c]['client_cpu_pct']:.0f}%"

    rows.append(Row(
        "cpu_16", "  CPU at 16 clients (% of all cores)", server, {c: cpu_cell(c) for c in COLUMNS},
        extra={"client_cpu_pct": {c: tp[c]["client_cpu_pct"] if tp[c] else None for c in COLUMNS},
               "sim_cpu_pct": {c: tp[c]["sim_cpu_pct"] if tp[c] else None for c in COLUMNS}}))
    return rows


def stream_rows(fig):
    rows = []
    lag_max, coalesced, missing = {}, {}, {}
    for framing in ("chunked", "close"):
        st = {c: _get(fig, "streams", c, framing) for c in COLUMNS}
        ttfb = {c: st[c]["ttfb_p50_ms"] if st[c] else None for c in COLUMNS}
        added = _added(ttfb)
        rows.append(Row(f"ttfb_{framing}_ms", f"stream TTFB p50, {framing} upstream (ms)", ttfb,
                        _cells(ttfb), vs_direct=_plus_ms(added)))
        lag = {c: st[c]["lag_median_ms"] if st[c] else None for c in COLUMNS}
        p99 = {c: st[c]["lag_p99_ms"] if st[c] else None for c in COLUMNS}
        mx = {c: st[c]["lag_max_ms"] if st[c] else None for c in COLUMNS}
        rows.append(Row(f"lag_{framing}_ms", f"relay lag median / p99 / max, {framing} (ms)", lag,
                        {c: f"{_num(lag[c])} / {_num(p99[c])} / {_num(mx[c])}" if st[c] else "-"
                         for c in COLUMNS},
                        vs_direct=_plus_ms(_added(lag)), extra={"p99_ms": p99, "max_ms": mx}))
        for c in COLUMNS:
            if st[c]:
                lag_max[c] = max(lag_max.get(c, 0.0), st[c]["lag_max_ms"] or 0.0)
                coalesced[c] = coalesced.get(c, 0) + st[c]["coalesced_reads"]
                missing[c] = missing.get(c, 0) + st[c]["events_expected"] - st[c]["events_received"]
    full = {c: lag_max.get(c) for c in COLUMNS}
    rows.append(Row("lag_max_ms", "relay lag max, both framings (ms)", full, _cells(full),
                    target="< 5 ms", met=full["dario"] is not None and full["dario"] < 5))
    merged = {c: coalesced.get(c) for c in COLUMNS}
    rows.append(Row("coalesced_reads", "reads holding >1 text event (missing events)", merged,
                    {c: f"{merged[c]} ({missing[c]})" if merged[c] is not None else "-" for c in COLUMNS},
                    target="0 (0)",
                    met=merged["dario"] == 0 and missing.get("dario") == 0 if merged["dario"] is not None else False,
                    extra={"missing_events": missing}))
    return rows


def held_rows(fig):
    held = {c: _get(fig, "held", c) for c in COLUMNS}
    count = next((h["streams"] for h in held.values() if h), 0)
    errors = {c: held[c]["errors"] if held[c] else None for c in COLUMNS}
    peak = {c: held[c]["rss_peak_mb"] if held[c] and c != "direct" else None for c in COLUMNS}
    after = {c: held[c]["rss_after_mb"] if held[c] and c != "direct" else None for c in COLUMNS}
    before = {c: held[c]["rss_before_mb"] if held[c] and c != "direct" else None for c in COLUMNS}
    idle = _get(fig, "startup", "idle_rss_mb")
    cells = {c: (f"{errors[c]} err" + (f", {_num(peak[c], 1)} MB" if peak[c] is not None else ""))
             if held[c] else "-" for c in COLUMNS}
    near = None
    if after["dario"] is not None and before["dario"] is not None:
        near = after["dario"] <= 1.25 * before["dario"]
    fds = {c: (held[c]["fds_before"], held[c]["fds_after"]) if held[c] and c != "direct" else None
           for c in COLUMNS}
    return [
        Row("held_streams", f"{count} held streams: errors, peak RSS", {"direct": errors["direct"],
            "dario": errors["dario"], "nginx": errors["nginx"]}, cells,
            target="0 err, RSS < 120 MB",
            met=errors["dario"] == 0 and peak["dario"] is not None and peak["dario"] < 120,
            extra={"rss_peak_mb": peak, "threads_peak": held["dario"]["threads_peak"] if held["dario"] else None}),
        Row("held_rss_after_mb", "RSS before -> after held streams (MB; open fds)", after,
            {c: f"{_num(before[c], 1)} -> {_num(after[c], 1)} ({fds[c][0]}->{fds[c][1]} fds)"
             if after[c] is not None else "-" for c in COLUMNS},
            target="after <= 1.25 x before", met=near,
            extra={"rss_before_mb": before, "fds": fds, "startup_idle_rss_mb": idle}),
    ]


def halt_rows(fig):
    halt = _get(fig, "halt")
    if not halt:
        return []
    return [
        Row("halt_late", f"halt-to-block: late requests ({halt['runs']} runs, {halt['clients']} clients)",
            {"direct": None, "dario": halt["late_total"], "nginx": None},
            {"direct": "-", "dario": f"{halt['late_total']} (in {halt['runs_with_late']}/{halt['runs']} runs)",
             "nginx": "-"},
            target="0 in every run", met=halt["runs_with_late"] == 0),
        Row("halt_in_flight", "  in flight at halt (sent before, arrived after)",
            {"direct": None, "dario": halt["in_flight_total"], "nginx": None},
            {"direct": "-", "dario": f"{halt['in_flight_total']} (max {halt['in_flight_max']}/run)",
             "nginx": "-"},
            extra={"blocked_after": halt["blocked_after_total"], "sent_after": halt["sent_after_total"]}),
    ]


def guard_rows(fig):
    """Money that escaped a budget under mixed hostile traffic; memory under stalled load."""
    rows = []
    money = _get(fig, "budget_escape")
    if money:
        within = money["escaped_usd"] <= money["one_reservation_usd"]
        rows.append(Row(
            "budget_escaped_usd",
            f"$ escaped a ${money['budget_usd']:g} budget ({money['requests']} mixed, {money['clients']} clients)",
            {"direct": None, "dario": money["escaped_usd"], "nginx": None},
            {"direct": "-", "dario": f"${money['escaped_usd']:.3f} (billed ${money['upstream_billed_usd']:.2f})",
             "nginx": "-"},
            target=f"<= 1 reservation (${money['one_reservation_usd']:.3f})", met=within,
            extra={k: v for k, v in money.items() if k != "escaped_usd"}))
    mem = _get(fig, "stalled_memory")
    if mem and "peak_rss_mb" in mem:
        # What the totals count, plus what every connection costs anyway (its thread's
        # stack, its buffered reader): about 70 KiB each measured, 96 KiB allowed.
        bound = mem["idle_rss_mb"] + mem["heads_total_mb"] + mem["bodies_total_mb"] + mem["connections"] * 96 / 1024
        rows.append(Row(
            "stalled_rss_mb", f"{mem['connections']} stalled max heads/bodies: peak RSS (MB)",
            {"direct": None, "dario": mem["peak_rss_mb"], "nginx": None},
            {"direct": "-", "dario": f"{_num(mem['idle_rss_mb'], 1)} -> {_num(mem['peak_rss_mb'], 1)}",
             "nginx": "-"},
            target=f"< idle + totals + 96 KiB/conn ({bound:.0f} MB)",
            met=mem["peak_rss_mb"] < bound and mem["health_after"],
            extra=dict(mem)))
    return rows


def team_rows(fig):
    """--store=redis: the file store against the Redis store, in the same run."""
    t = _get(fig, "team")
    if not t:
        return []
    lat, tput = t["latency"], t["throughput"]
    rows = []
    for store in ("file", "redis"):
        rows.append(Row(
            f"team_{store}_latency", f"{store} store: added p50 / p99, 1 client (ms)",
            {"direct": None, "dario": lat[store]["added_p50_ms"], "nginx": None},
            {"direct": "-", "dario": f"+{lat[store]['added_p50_ms']:.2f} / +{lat[store]['added_p99_ms']:.2f}",
             "nginx": "-"}, extra={"added_p99_ms": lat[store]["added_p99_ms"]}))
        rps = tput[store]["rps"]
        rows.append(Row(f"team_{store}_rps", f"{store} store: throughput, 16 clients (req/s)",
                        {"direct": None, "dario": rps, "nginx": None},
                        {"direct": "-", "dario": f"{rps:.0f} ({tput[store]['errors']} err)", "nginx": "-"}))
    halt = t["halt"]
    rows.append(Row("team_halt_late", f"cross-gateway halt-to-block: late requests ({halt['runs']} runs)",
                    {"direct": None, "dario": halt["late_total"], "nginx": None},
                    {"direct": "-", "dario": f"{halt['late_total']} (in {halt['runs_with_late']}/{halt['runs']} runs)",
                     "nginx": "-"}, target="0 in every run", met=halt["runs_with_late"] == 0))
    money = t["budget"]
    rows.append(Row("team_budget_escaped_usd",
                    f"$ escaped a ${money['budget_usd']:g} budget over {money['gateways']} gateways",
                    {"direct": None, "dario": money["escaped_usd"], "nginx": None},
                    {"direct": "-", "dario": f"${money['escaped_usd']:.3f} (billed ${money['upstream_billed_usd']:.2f})",
                     "nginx": "-"},
                    target=f"<= 1 reservation (${money['one_reservation_usd']:.3f})",
                    met=money["escaped_usd"] <= money["one_reservation_usd"]))
    return rows


def growth_rows(fig):
    """Cost growth: latency p50 and RSS against clients, then against request body size."""
    rows = []
    settings = [(f"{n} client{'s' if n > 1 else ''}", ("throughput", str(n)))
                for n in fig.get("growth_clients", [])]
    settings += [(f"{label} body", ("bodies", label)) for label in fig.get("growth_bodies", [])]
    for label, (section, key) in settings:
        data = {c: _get(fig, section, c, key) for c in COLUMNS}
        p50 = {c: data[c]["p50_ms"] if data[c] else None for c in COLUMNS}
        rss = {c: data[c]["rss_peak_mb"] if data[c] and c != "direct" else None for c in COLUMNS}
        added = _added(p50)
        cells = {c: "-" if p50[c] is None else
                 f"{_num(p50[c])} ms" + (f" {_num(rss[c], 1)} MB" if rss[c] is not None else "")
                 for c in COLUMNS}
        rows.append(Row(f"growth_{section}_{key}", f"cost: p50, peak RSS @ {label}", p50, cells,
                        vs_direct=_plus_ms(added),
                        extra={"added_ms": added, "rss_peak_mb": rss}))
    return rows


def startup_rows(fig):
    st = _get(fig, "startup")
    if not st:
        return []
    return [
        Row("startup_ms", f"start-up to first /health 200 (ms, median of {st['runs']})",
            {"direct": None, "dario": st["startup_ms"], "nginx": None},
            {"direct": "-", "dario": _num(st["startup_ms"], 0), "nginx": "-"},
            target="< 300 ms", met=st["startup_ms"] < 300),
        Row("idle_rss_mb", "idle RSS after start-up (MB)",
            {"direct": None, "dario": st["idle_rss_mb"], "nginx": _get(fig, "nginx_idle_rss_mb")},
            {"direct": "-", "dario": _num(st["idle_rss_mb"], 1), "nginx": _num(_get(fig, "nginx_idle_rss_mb"), 1)},
            target="< 40 MB", met=st["idle_rss_mb"] < 40),
    ]


def build_rows(fig):
    return (latency_rows(fig) + throughput_rows(fig) + stream_rows(fig) + held_rows(fig)
            + halt_rows(fig) + guard_rows(fig) + team_rows(fig) + growth_rows(fig) + startup_rows(fig))


def render(rows, has_nginx=True):
    """The table as text: fixed-width columns, a header, one line per row."""
    header = ("measurement", "direct", "dario", "nginx", "dario vs direct", "vs nginx", "target", "met")
    lines = []
    for row in rows:
        met = "" if not row.target else {True: "PASS", False: "FAIL", None: "n/a"}[row.met]
        nginx = row.cells["nginx"] if has_nginx else "skipped"
        lines.append((row.label, row.cells["direct"], row.cells["dario"], nginx,
                      row.vs_direct, row.vs_nginx, row.target, met))
    widths = [max(len(str(line[i])) for line in [header] + lines) for i in range(len(header))]

    def fmt(line):
        # Label and target left-aligned, figures right-aligned.
        cells = [str(cell).rjust(width) if 0 < i < 6 else str(cell).ljust(width)
                 for i, (cell, width) in enumerate(zip(line, widths))]
        return " | ".join(cells).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule] + [fmt(line) for line in lines])


def summary(rows, fig):
    """The one closing line: targets met, then the headline figures."""
    targeted = [row for row in rows if row.target and row.met is not None]
    met = sum(1 for row in targeted if row.met)
    by_key = {row.key: row for row in rows}
    parts = []
    lat = by_key.get("latency_p50_ms")
    if lat and lat.extra["added_ms"] is not None:
        parts.append(f"added p50 {lat.extra['added_ms']:.2f} ms, p99 "
                     f"{by_key['latency_p99_ms'].extra['added_ms']:.2f} ms")
    tput = by_key.get("throughput_16_rps")
    if tput and tput.extra["pct_of_direct"] is not None:
        parts.append(f"tput16 {tput.extra['pct_of_direct']:.0f}% of direct")
    lag = by_key.get("lag_max_ms")
    if lag and lag.values["dario"] is not None:
        parts.append(f"lag max {lag.values['dario']:.2f} ms")
    held = _get(fig, "held", "dario")
    if held:
        state = "ok" if held["errors"] == 0 else f"{held['errors']} err"
        parts.append(f"held {held['streams']} {state} RSS {held['rss_peak_mb']:.0f} MB")
    halt = _get(fig, "halt")
    if halt:
        parts.append(f"halt-to-block {halt['runs_with_late']}/{halt['runs']}")
    money = _get(fig, "budget_escape")
    if money:
        parts.append(f"escaped ${money['escaped_usd']:.3f} of ${money['budget_usd']:g}")
    mem = _get(fig, "stalled_memory")
    if mem and "peak_rss_mb" in mem:
        parts.append(f"stalled RSS {mem['peak_rss_mb']:.0f} MB")
    st = _get(fig, "startup")
    if st:
        parts.append(f"start {st['startup_ms']:.0f} ms, idle {st['idle_rss_mb']:.0f} MB")
    return f"SUMMARY: {met}/{len(targeted)} targets met ({', '.join(parts)})"


def as_json(rows):
    """Every row's numbers, keyed by row key, plus the target verdicts."""
    return {row.key: {"label": row.label, **{c: row.values.get(c) for c in COLUMNS},
                      "target": row.target or None, "met": row.met, **row.extra}
            for row in rows}
