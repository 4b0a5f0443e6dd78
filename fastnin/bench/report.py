"""Results: the machine's description, the table (terminal and Markdown), JSON, the speedup chart,
the comparison of two result files, and the pytest JUnit summary of the GPU check."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

SCHEMA = 1


# ----------------------------------------------------------------------------------------------
# The machine and the code
# ----------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def gpu_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def slug(text: str, limit: int = 48) -> str:
    t = re.sub(r"\((r|tm)\)|\bcpu\b @.*|\(.*?cores.*?\)", "", text.lower())
    t = re.sub(r"[^a-z0-9]+", "-", t).strip("-")
    return (t[:limit].rstrip("-")) or "device"


def device_slug(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return slug(torch.cuda.get_device_name(dev))
    return "cpu-" + slug(cpu_name()).removeprefix("cpu-")


def commit() -> str:
    """FASTNIN_COMMIT, else `git rev-parse --short HEAD` in the current directory or in the
    checkout this package was imported from, else "unknown"."""
    env = os.environ.get("FASTNIN_COMMIT", "").strip()
    if env:
        return re.sub(r"[^A-Za-z0-9._-]", "", env)[:40] or "unknown"
    here = Path(__file__).resolve().parents[2]
    for cwd in (Path.cwd(), here):
        try:
            out = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return "unknown"


def meta(device, argv: list[str] | None = None) -> dict:
    try:
        import triton

        triton_v = triton.__version__
    except Exception:  # noqa: BLE001
        triton_v = None
    import fastnin

    from . import timing
    from .runner import Settings

    dev = torch.device(device)
    cpu_settings = Settings.for_device("cpu")
    return {
        "schema": SCHEMA,
        "device": device_name(dev),
        "device_type": dev.type,
        "driver": gpu_driver() if dev.type == "cuda" else None,
        "cuda": torch.version.cuda if dev.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton_v,
        "python": platform.python_version(),
        "fastnin": getattr(fastnin, "__version__", None),
        "backends": fastnin.available_backends(),
        "commit": commit(),
        "command": "python -m fastnin.bench "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "timing": "CUDA events per call, median, after warm-up; inputs rotated over > 2x L2"
        if dev.type == "cuda"
        else "time.perf_counter per call, median, after warm-up; providers interleaved in rounds; "
        f"calls under {cpu_settings.warm_below_s * 1e3:g} ms: {cpu_settings.warm_calls} untimed calls at the start "
        "of each turn",
        "peak_memory": "torch.cuda.max_memory_allocated above the allocation before the call"
        if dev.type == "cuda"
        else "peak RSS: " + timing.CPU_PEAK_METHOD,
        "tf32": {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        }
        if dev.type == "cuda"
        else None,
    }


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _f(v, fmt="{:.3g}", none="-") -> str:
    if v is None:
        return none
    if isinstance(v, float) and (v != v):
        return "nan"
    return fmt.format(v)


def _ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _rate(row: dict, d: dict) -> str:
    if d.get("images_s") is not None:
        return f"{d['images_s']:.1f} img/s"
    if d.get("tflops") is not None:
        return f"{d['tflops']:.3g} TFLOP/s"
    if d.get("gbs") is not None:
        s = f"{d['gbs']:.3g} GB/s"
        if d.get("bw_frac") is not None:
            s += f" ({100 * d['bw_frac']:.0f}%)"
        return s
    return "-"


def provider_names(rows: list[dict]) -> list[str]:
    order = []
    for r in rows:
        for n in r["providers"]:
            if n not in order:
                order.append(n)
    # fastnin first, then eager, eager-cl, compile
    rank = {"eager": 1, "eager-cl": 2, "compile": 3}
    return sorted(order, key=lambda n: (rank.get(n, 0), order.index(n)))


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: one row per (case, dtype)."""
    provs = provider_names(rows)
    fast = [p for p in provs if p.startswith("fastnin")]
    multi_dtype = len({r["dtype"] for r in rows}) > 1
    head = ["case"] + (["dtype"] if multi_dtype else []) + ["shape"] + [f"{p} ms" for p in provs]
    for p in fast:
        tag = p.removeprefix("fastnin-") + " " if len(fast) > 1 else ""
        head += [f"{tag}x eager", f"{tag}x compile", f"{tag}rate", f"{tag}err"]
    head += ["eager err", "targets"]
    cells = []
    for r in rows:
        line = [r["case"]] + ([r["dtype"]] if multi_dtype else []) + [r["shape"]]
        for p in provs:
            e = r["providers"].get(p)
            line.append(
                "-" if e is None else _ms(e["ms"]) if e.get("ms") is not None else "skip" if e.get("skipped") else "ERR"
            )
        for p in fast:
            d = r["fastnin"].get(p, {})
            e = r["providers"].get(p, {})
            line += [
                _f(d.get("vs_eager"), "{:.2f}x"),
                _f(d.get("vs_compile"), "{:.2f}x"),
                _rate(r, d),
                _f(e.get("max_err"), "{:.1e}"),
            ]
        line.append(_f(r["providers"].get("eager", {}).get("max_err"), "{:.1e}"))
        tg = r.get("targets") or []
        line.append(
            " ".join(
                ("ok" if t["met"] else "MISS" if t["met"] is False else "?") + f"({t['threshold']:g} {t['metric']})"
                for t in tg
            )
            or "-"
        )
        cells.append(line)
    return head, cells


def text_table(head: list[str], cells: list[list[str]]) -> str:
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    for c in cells:
        out.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
    return "\n".join(out)


def md_table(head: list[str], cells: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in cells]
    return "\n".join(out)


def notes(result: dict) -> list[str]:
    """What a reader needs besides the table: what each column means, what was not run, and every
    provider error and missed target."""
    n = [
        "times: median ms per call; `x eager`: eager time in its faster layout (NCHW or channels_last) "
        "over fastnin's; `x compile`: torch.compile's over fastnin's; rate: TFLOP/s (mlpconv), "
        "GB/s of least traffic (lrn, gap; % of the device copy bandwidth on GPU), images/s (models); "
        "err: the largest over the output and every gradient of max |ours - ref| / max |ref|, ref the "
        "float64 reference on the same inputs (models: the logits, and for train the parameter gradients, "
        "in eval mode); eager err: torch eager's (NCHW) by the same measure, the yardstick.",
    ]
    n += result.get("notes", [])
    for r in result["rows"]:
        for p, e in r["providers"].items():
            if e.get("error"):
                n.append(f"ERROR {r['case']} [{r['dtype']}] {p}: {e['error']}")
        for t in r.get("targets") or []:
            if t["met"] is False:
                v = _f(t["value"], "{:.2f}")
                n.append(f"target missed: {r['case']} [{r['dtype']}] {t['provider']}: {v} {t['label']}")
    seen = set()
    for r in result["rows"]:
        for p, e in r["providers"].items():
            if e.get("note") and (p, e["note"]) not in seen:
                seen.add((p, e["note"]))
                n.append(f"{p}: {e['note']}")
    budget_skips = [
        f"{r['case']} [{r['dtype']}]" for r in result["rows"] for e in r["providers"].values() if e.get("skipped")
    ]
    if budget_skips:
        n.append(f"torch.compile skipped for lack of time (--budget) on: {', '.join(budget_skips)}")
    for s in result.get("skipped", []):
        n.append(f"skipped {s['case']} [{s['dtype']}]: {s['reason']}")
    return n


def render_text(result: dict) -> str:
    m = result["meta"]
    head, cells = table(result["rows"])
    lines = [
        f"fastnin bench on {m['device']} | torch {m['torch']} | triton {m['triton']} | commit {m['commit']}",
        text_table(head, cells),
    ]
    lines += ["  " + x for x in notes(result)]
    if result.get("compare"):
        lines += ["", compare_text(result["compare"])]
    if result.get("parity"):
        lines += ["", parity_md(result["parity"])]
    return "\n".join(lines)


def render_markdown(result: dict) -> str:
    m = result["meta"]
    head, cells = table(result["rows"])
    out = [
        f"# fastnin benchmark: {m['device']}",
        "",
        f"- command: `{m['command']}`",
        f"- commit: `{m['commit']}`, date {m['date']}, host {m['host']}",
        f"- device: {m['device']}"
        + (f", driver {m['driver']}, CUDA {m['cuda']}" if m.get("driver") or m.get("cuda") else ""),
        f"- torch {m['torch']}, triton {m['triton']}, python {m['python']}, fastnin {m['fastnin']}; "
        f"backends {m['backends']}",
        f"- timing: {m['timing']}",
        f"- peak memory: {m['peak_memory']}",
    ]
    if result.get("copy_bandwidth"):
        out.append(f"- device copy bandwidth (read + write): {result['copy_bandwidth'] / 1e9:.0f} GB/s")
    if result.get("providers"):
        out.append("- providers: " + "; ".join(f"`{k}`: {v}" for k, v in result["providers"].items()))
    if result.get("complete") is False:
        out.append("- **incomplete**: the run stopped before its end; these are the cases measured so far")
    out += ["", md_table(head, cells), ""]
    out += [f"- {x}" for x in notes(result)]
    mem = memory_md(result["rows"])
    if mem:
        out += ["", "## Peak memory (MiB above the inputs)", "", mem]
    if result.get("compare"):
        out += ["", "## Compared with an earlier run", "", compare_md(result["compare"])]
    if result.get("parity"):
        out += ["", "## Parity tests (pytest)", "", parity_md(result["parity"])]
    return "\n".join(out) + "\n"


def memory_md(rows: list[dict]) -> str:
    provs = provider_names(rows)
    cells = []
    for r in rows:
        vals = [r["providers"].get(p, {}).get("peak_mem") for p in provs]
        if all(v is None for v in vals):
            continue
        cells.append([f"{r['case']} [{r['dtype']}]"] + [_f(None if v is None else v / 2**20, "{:.1f}") for v in vals])
    return md_table(["case"] + provs, cells) if cells else ""


# ----------------------------------------------------------------------------------------------
# JSON, files, chart
# ----------------------------------------------------------------------------------------------


def write_json(result: dict, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")


def load_json(path) -> dict:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "rows" not in data or "meta" not in data:
        raise ValueError(f"{path}: not a fastnin.bench result file (no 'rows' / 'meta')")
    return data


def results_paths(result: dict, results_dir, device) -> tuple[Path, Path]:
    base = Path(results_dir) / f"{device_slug(device)}-{result['meta']['commit']}"
    return base.with_suffix(".json"), base.with_suffix(".md")


def plot(result: dict, path) -> None:
    """A bar chart of fastnin's speedup over eager (best layout) and over torch.compile per case."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib (pip install 'fastnin[bench]')") from e
    rows = result["rows"]
    labels = [f"{r['case']} {r['dtype']}" for r in rows]
    series = []
    for p in [p for p in provider_names(rows) if p.startswith("fastnin")]:
        for metric, what in (("vs_eager", "eager"), ("vs_compile", "compile")):
            vals = [r["fastnin"].get(p, {}).get(metric) for r in rows]
            if any(v is not None for v in vals):
                series.append((f"{p} vs {what}", [v if v is not None else 0.0 for v in vals]))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.8))
    width = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series):
        ax.bar([x + i * width for x in range(len(rows))], vals, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup (x)")
    m = result["meta"]
    title = f"fastnin speedup (x, higher is better)\n{m['device']}, torch {m['torch']}, commit {m['commit']}"
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# --compare
# ----------------------------------------------------------------------------------------------


def compare(new: dict, old: dict) -> dict:
    """Per (case, dtype, fastnin provider) in both runs: the speedups and times before and after."""
    index = {(r["case"], r["dtype"]): r for r in old["rows"]}
    out = []
    for r in new["rows"]:
        o = index.get((r["case"], r["dtype"]))
        if o is None:
            continue
        for p, d in r["fastnin"].items():
            od = o.get("fastnin", {}).get(p)
            if not od:
                continue
            item = {"case": r["case"], "dtype": r["dtype"], "provider": p}
            for k in ("vs_eager", "vs_compile"):
                a, b = od.get(k), d.get(k)
                item[f"old_{k}"], item[f"new_{k}"] = a, b
                item[f"change_{k}"] = b / a if a and b else None
            a, b = o["providers"].get(p, {}).get("ms"), r["providers"].get(p, {}).get("ms")
            item["old_ms"], item["new_ms"] = a, b
            item["time_ratio"] = b / a if a and b else None
            out.append(item)
    return {"old_commit": old["meta"].get("commit"), "old_device": old["meta"].get("device"), "rows": out}


def _compare_cells(cmp: dict) -> tuple[list[str], list[list[str]]]:
    head = ["case", "dtype", "provider", "old x eager", "new x eager", "change"]
    head += ["old x compile", "new x compile", "old ms", "new ms"]
    cells = [
        [
            c["case"],
            c["dtype"],
            c["provider"],
            _f(c["old_vs_eager"], "{:.2f}x"),
            _f(c["new_vs_eager"], "{:.2f}x"),
            _f(c["change_vs_eager"], "{:.2f}"),
            _f(c["old_vs_compile"], "{:.2f}x"),
            _f(c["new_vs_compile"], "{:.2f}x"),
            _ms(c["old_ms"]),
            _ms(c["new_ms"]),
        ]
        for c in cmp["rows"]
    ]
    return head, cells


def compare_text(cmp: dict) -> str:
    head, cells = _compare_cells(cmp)
    return f"compared with commit {cmp['old_commit']} on {cmp['old_device']} (change = new/old speedup):\n" + (
        text_table(head, cells) if cells else "  no case in common"
    )


def compare_md(cmp: dict) -> str:
    head, cells = _compare_cells(cmp)
    return f"Against commit `{cmp['old_commit']}` on {cmp['old_device']} (change = new / old speedup).\n\n" + (
        md_table(head, cells) if cells else "No case in common."
    )


# ----------------------------------------------------------------------------------------------
# --pytest-junit: the parity tests' outcome, every failure and error with its message
# ----------------------------------------------------------------------------------------------


def junit_summary(path) -> dict:
    p = Path(path)
    if not p.is_file():
        return {"file": str(path), "missing": True, "failures": []}
    try:
        root = ET.parse(p).getroot()
    except ET.ParseError as e:
        return {"file": str(path), "unreadable": str(e), "failures": []}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
    fails = []
    for s in suites:
        for k in tot:
            try:
                tot[k] += type(tot[k])(s.get(k, 0) or 0)
            except ValueError:
                pass
        for tc in s.iter("testcase"):
            for kind in ("failure", "error"):
                for el in tc.findall(kind):
                    text = (el.text or "").strip()
                    fails.append(
                        {
                            "test": f"{tc.get('classname', '')}::{tc.get('name', '')}",
                            "kind": kind,
                            "message": (el.get("message") or "").strip()[:2000],
                            "detail": text[-4000:],
                        }
                    )
    return {"file": str(path), **tot, "failed": fails}


def parity_md(par: dict) -> str:
    if par.get("missing"):
        return f"No pytest JUnit file at `{par['file']}` (the test step did not run)."
    if par.get("unreadable"):
        return f"Unreadable pytest JUnit file `{par['file']}`: {par['unreadable']}"
    lines = [
        f"{par['tests']} tests, {par['failures']} failed, {par['errors']} errors, {par['skipped']} skipped "
        f"({par['time']:.0f} s)."
    ]
    for f in par["failed"]:
        msg = f["message"].splitlines()[0] if f["message"] else (f["detail"].splitlines() or [""])[-1]
        lines.append(f"- {f['kind'].upper()} `{f['test']}`: {msg[:500]}")
    return "\n".join(lines)
