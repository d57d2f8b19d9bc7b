"""Render a results file as a PNG plot (GB/s against size, one line per
implementation) and a markdown table of every row, and optionally put a
summary in the README between its bench-table markers:

    python bench/render.py [bench/results/<device>-<date>.json] [--readme README.md]

The summary: step times on the headline parameter sets, the kernel alone at
the largest size of its sweep, and the fastest launch configurations; the
full table (<results>.md) is linked from it. Without a file it takes the
newest GPU results (CPU smoke files only when asked for by name). The README
only ever shows GPU results.
"""
import argparse
import json
import pathlib
import re

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
# common.headline_sets() on a GPU, for results files that predate the "headline_sets" key.
HEADLINE_SETS = ["gpt2_124m", "llama_1b", "one_tensor_2^26", "small_tensors_x1000"]
COLUMNS = ("| case | dtype | implementation | tensors | elements | ms (median) | GB/s | % of copy | peak extra MiB |\n"
           "|---|---|---|---:|---:|---:|---:|---:|---:|")


def newest_gpu_results():
    files = [p for p in sorted(RESULTS_DIR.glob("*.json")) if not json.loads(p.read_text()).get("smoke")]
    return max(files, key=lambda p: json.loads(p.read_text())["date"]) if files else None


def _number(value, spec, suffix=""):
    return "" if value is None else f"{value:{spec}}{suffix}"


def table(rows):
    lines = [COLUMNS]
    for r in sorted(rows, key=lambda r: (r["case"], r["dtype"], r["ms"])):
        lines.append(f"| {r['case']} | {r['dtype']} | {r['impl']} | {r['n_tensors']} | {r['numel']:,} | "
                     f"{_number(r.get('ms'), '.3f')} | {_number(r.get('gbps'), '.0f')} | "
                     f"{_number(r.get('pct_of_copy_bw'), '.0f', '%')} | {_number(r.get('peak_extra_mb'), '.0f')} |")
    return "\n".join(lines)


def summary_sections(data):
    """(title, rows) of the README's summary."""
    rows = [r for r in data["rows"] if "case" in r and "impl" in r]
    headline = data.get("headline_sets") or HEADLINE_SETS
    sweep = [r for r in rows if r["case"] == "kernel_sweep"]
    largest = max((r["numel"] for r in sweep), default=None)
    fastest = []
    for dtype in sorted({r["dtype"] for r in rows if r["case"] == "block_sweep"}):
        configs = sorted((r for r in rows if r["case"] == "block_sweep" and r["dtype"] == dtype),
                         key=lambda r: r["ms"])
        fastest += configs[:3]
    return [("Step time on the headline parameter sets (`optimizer.step()`, every implementation measured)",
             [r for r in rows if r["case"] in headline]),
            (f"The kernel alone, one tensor of {largest or 0:,} elements, every variant",
             [r for r in sweep if r["numel"] == largest]),
            ("Launch configuration (BLOCK_SIZE x num_warps, one tensor): the 3 fastest per dtype", fastest)]


def markdown(data, summary=False, full_table_name=None):
    lines = [f"Device: **{data['device']}**, {data['date']}; torch {data['torch']}, triton "
             f"{data['triton']}, CUDA {data['cuda']}; copy bandwidth "
             f"{data.get('copy_bandwidth_gbps') or 0:.0f} GB/s. Command: `{data['command']}`.",
             "" if not data.get("smoke") else f"\n**{data['note']}**\n"]
    if summary:
        for title, rows in summary_sections(data):
            if rows:
                lines += ["", f"{title}:", "", table(rows)]
        if full_table_name:
            lines += ["", f"Every row ({len(data['rows'])}): [bench/results/{full_table_name}]"
                          f"(bench/results/{full_table_name})."]
    else:
        lines += ["", table([r for r in data["rows"] if "case" in r and "impl" in r])]
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
        if r.get("case", "").startswith("one_tensor") or r.get("case") == "kernel_sweep":
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
    axis.legend(fontsize=6, ncol=2)
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
    full = markdown(data)
    path.with_suffix(".md").write_text(full)
    plot(data, path.with_suffix(".png"))
    print(full)
    if args.readme:
        if data.get("smoke"):
            raise SystemExit("CPU smoke results never go into the README")
        text = args.readme.read_text()
        block = (f"{START}\n{markdown(data, summary=True, full_table_name=path.with_suffix('.md').name)}\n"
                 f"![GB/s by size](bench/results/{path.with_suffix('.png').name})\n{END}")
        args.readme.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text,
                                      flags=re.S))


if __name__ == "__main__":
    main()
