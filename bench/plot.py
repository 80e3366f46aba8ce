"""The cost-growth plot: latency p50 and peak RSS against clients and against body size.

matplotlib is a bench-only extra (`pip install matplotlib`): `write_plot` returns a
message instead of failing when it is missing. Draws off-screen (Agg backend).
"""

COLORS = {"direct": "#888888", "dario": "#d9480f", "nginx": "#1c7ed6"}


def write_plot(figures, path):
    """Write a 2x2 PNG to `path`; returns a one-line message saying what happened."""
    try:
        import matplotlib
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = figures.get("growth_clients", [])
    bodies = figures.get("growth_bodies", [])
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [
        (axes[0][0], "throughput", clients, "p50_ms", "latency p50 (ms) vs concurrent clients", True),
        (axes[0][1], "throughput", clients, "rss_peak_mb", "peak RSS (MB) vs concurrent clients", False),
        (axes[1][0], "bodies", bodies, "p50_ms", "latency p50 (ms) vs request body, 1 client", True),
        (axes[1][1], "bodies", bodies, "rss_peak_mb", "peak RSS (MB) vs request body, 1 client", False),
    ]
    for ax, section, keys, field, title, with_direct in panels:
        for column, color in COLORS.items():
            if column == "direct" and not with_direct:
                continue
            data = figures.get(section, {}).get(column) or {}
            xs = [k for k in keys if str(k) in data]
            if not xs:
                continue
            ys = [data[str(k)][field] for k in xs]
            ax.plot([str(x) for x in xs], ys, marker="o", color=color, label=column)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        if field == "p50_ms":
            ax.set_yscale("log")
    fig.suptitle("dario cost growth (direct = simulator, nginx = one-hop floor)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"
