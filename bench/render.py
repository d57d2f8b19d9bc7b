"""Render a results file as a PNG plot (GB/s against size, one line per
implementation) and a markdown table, and optionally put the table in the
README between its bench-table markers:

    python bench/render.py [bench/results/<device>-<date>.json] [--readme README.md]

Without a file it takes the newest GPU results (CPU smoke files only when
asked for by name). The README only ever shows GPU results.
"""
import argparse
import json
import pathlib
import re

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def newest_gpu_results():
    files = [p for p in sorted(RESULTS_DIR.glob("*.json")) if not json.loads(p.read_text()).get("smoke")]
    return max(files, key=lambda p: json.loads(p.read_text())["date"]) if files else None


def markdown(data):
    lines = [f"Device: **{data['device']}**, {data['date']}; torch {data['torch']}, triton "
             f"{data['triton']}, CUDA {data['cuda']}; copy bandwidth "
             f"{data.get('copy_bandwidth_gbps') or 0:.0f} GB/s. Command: `{data['command']}`.",
             "" if not data.get("smoke") else f"\n**{data['note']}**\n", "",
             "| case | dtype | implementation | tensors | elements | ms (median) | GB/s | % of copy | peak extra MiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    rows = sorted(data["rows"], key=lambda r: (r["case"], r["dtype"], r["ms"]))
    for r in rows:
        peak = "" if r.get("peak_extra_mb") is None else f"{r['peak_extra_mb']:.0f}"
        lines.append(f"| {r['case']} | {r['dtype']} | {r['impl']} | {r['n_tensors']} | {r['numel']:,} | "
                     f"{r['ms']:.3f} | {r['gbps']:.0f} | {r['pct_of_copy_bw']:.0f}% | {peak} |")
    if data.get("absent"):
        lines += ["", "Absent (not importable in this run): " +
                  "; ".join(f"{k} ({v})" for k, v in sorted(data["absent"].items()))]
    return "\n".join(lines) + "\n"


def plot(data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(8, 5))
    series = {}
    for r in data["rows"]:
        if r["case"].startswith("one_tensor") or r["case"] == "kernel_sweep":
            series.setdefault(f"{r['impl']} ({r['dtype']})", []).append((r["numel"], r["gbps"]))
    for label, points in sorted(series.items()):
        points.sort()
        axis.plot(*zip(*points), marker="o", label=label)
    if data.get("copy_bandwidth_gbps"):
        axis.axhline(data["copy_bandwidth_gbps"], color="gray", linestyle="--", label="device copy")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("elements (one tensor)")
    axis.set_ylabel("GB/s (ADOPT's byte model)")
    axis.set_title(data["device"] + (" (CPU smoke run, not GPU results)" if data.get("smoke") else ""))
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", type=pathlib.Path)
    parser.add_argument("--readme", type=pathlib.Path)
    args = parser.parse_args()
    path = args.results or newest_gpu_results()
    if path is None:
        raise SystemExit(f"no GPU results in {RESULTS_DIR}: run bench/run_gpu.sh on a CUDA machine")
    data = json.loads(path.read_text())
    table = markdown(data)
    path.with_suffix(".md").write_text(table)
    plot(data, path.with_suffix(".png"))
    print(table)
    if args.readme:
        if data.get("smoke"):
            raise SystemExit("CPU smoke results never go into the README")
        text = args.readme.read_text()
        block = f"{START}\n{table}\n![GB/s by size](bench/results/{path.with_suffix('.png').name})\n{END}"
        args.readme.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text,
                                      flags=re.S))


if __name__ == "__main__":
    main()
