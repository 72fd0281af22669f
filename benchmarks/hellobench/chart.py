"""Stacked pull/create/run bars (medians) per image and mode from a hellobench JSON,
in the style of upstream's HelloBench histogram; also prints a markdown table. The PNG is
written beside the JSON (``results/hellobench.json`` -> ``results/hellobench.png``).

    python -m benchmarks.hellobench.chart [benchmarks/results/hellobench.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import RESULTS
from benchmarks.hellobench.images import EXTRA_MODES
from benchmarks.hellobench.images import MODES as DEFAULT_MODES

MODES = DEFAULT_MODES + EXTRA_MODES


def table(doc: dict) -> str:
    s = doc["summary"]
    nets = [n["name"] for n in doc["networks"]]
    images = list(doc["images"])
    lines = []
    for net in nets:
        meas = next(n for n in doc["networks"] if n["name"] == net)
        lines.append(
            f"\n**{net}** (measured: connect {meas['connect_s_median'] * 1e3:.1f} ms, "
            f"{meas['throughput_mbit_s']:.0f} Mbit/s)\n"
        )
        lines.append(
            "| image | mode | n | pull s | create s | run s | total s (median) | total s (p95) "
            "| MB fetched |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for img in images:
            for m in MODES:
                k = f"{net}/{img}/{m}"
                if k not in s:
                    continue
                v = s[k]
                cells = [v[f]["median"] for f in ("pull_s", "create_s", "run_s", "total_s")]
                cells.append(v["total_s"]["p95"])
                row = " | ".join(f"{c:.2f}" for c in cells)
                mb = v["fetched_bytes"]["median"] / 1e6
                lines.append(f"| {img} | {m} | {v['n']} | {row} | {mb:.1f} |")
            tot = {
                m: s[f"{net}/{img}/{m}"]["total_s"]["median"]
                for m in MODES
                if f"{net}/{img}/{m}" in s
            }
            g, lg = tot.get("go-opt"), tot.get("legacy")
            ratios = [
                f"{m}/go-opt **{tot[m] / g:.2f}**"
                for m in ("ours-all-opt", "ours-on-go-opt", "ours-opt", "ours-opt9")
                if m in tot and g
            ]
            lim = doc.get("limits", {}).get(f"{net}/{img}")
            if lim:
                ratios.append(
                    f"limit {lim['limit_s']:.2f} s ({lim['bytes'] / 1e6:.1f} MB, "
                    f"{lim['rtts']} RTT, local start {lim['local_start_s']:.2f} s)"
                )
                if "ours-all-opt" in tot:
                    r = tot["ours-all-opt"] / lim["limit_s"]
                    ratios.append(f"ours-all-opt/limit **{r:.2f}**")
            if "ours-opt" in tot and lg:
                ratios.append(f"ours-opt/legacy **{tot['ours-opt'] / lg:.2f}**")
            if ratios:
                lines.append(f"| {img} | ratios | | | | | {', '.join(ratios)} | | |")
    return "\n".join(lines)


def chart(doc: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = doc["summary"]
    nets = [n["name"] for n in doc["networks"]]
    images = list(doc["images"])
    fig, axes = plt.subplots(1, len(nets), figsize=(6 * len(nets), 4.5), squeeze=False)
    colors = {"pull_s": "#4c72b0", "create_s": "#dd8452", "run_s": "#55a868"}
    for ax, net in zip(axes[0], nets, strict=False):
        labels, x = [], 0
        xt = []
        for img in images:
            for m in MODES:
                k = f"{net}/{img}/{m}"
                if k not in s:
                    continue
                bottom = 0.0
                for f, c in colors.items():
                    v = s[k][f]["median"]
                    ax.bar(x, v, bottom=bottom, color=c, label=f[:-2] if not labels else None)
                    bottom += v
                labels.append(f"{img}\n{m}")
                xt.append(x)
                x += 1
            x += 0.6
        ax.set_xticks(xt)
        ax.set_xticklabels(labels, rotation=70, fontsize=7)
        ax.set_ylabel("seconds (median)")
        ax.set_title(f"HelloBench, {net}")
        ax.legend(fontsize=8)
    m = doc["machine"]
    fig.suptitle(
        f"{doc['date']} · {m['cpu']} · {m['cores']} cores · {m['kernel']} (shared, noisy)",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="?", default=str(RESULTS / "hellobench.json"))
    path = Path(ap.parse_args(argv).json)
    doc = json.loads(path.read_text())
    print(table(doc))
    try:
        chart(doc, path.with_suffix(".png"))
        print(f"\nchart: {path.with_suffix('.png')}", file=sys.stderr)
    except ImportError:
        print("matplotlib missing: no PNG", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
