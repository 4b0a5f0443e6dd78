"""fastnin's main job: `python -m fastnin.bench` (also `fastnin-bench`).

Times fastnin's ops and models against torch on the device at hand and prints one row per case:
each provider's median time, fastnin's speedup over torch eager (its faster layout) and over
torch.compile, its throughput, its max error against the float64 reference, and the issues'
targets where the case is one of theirs.

    python -m fastnin.bench                      # the default cases (under 2 minutes on 2 CPU cores)
    python -m fastnin.bench --quick              # tiny shapes, seconds (CI)
    python -m fastnin.bench --full               # every case, torch.compile included
    python -m fastnin.bench --ops lrn,gap --models none --json out.json --plot out.png
    python -m fastnin.bench --compare old.json   # speedup change against an earlier result file
    python -m fastnin.bench --device cuda --full --results-dir benchmarks/results --pytest-junit junit.xml

The modules: cases (the cases and their setup), providers (who runs them), timing (clocks and
peak memory), runner (the measurement loop), report (table, JSON, Markdown, chart, comparison).
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]

DEFAULT_CPU_BUDGET_S = 100.0


def _csv(s: str | None) -> list[str] | None:
    if s is None:
        return None
    return [p.strip() for p in s.split(",") if p.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastnin.bench",
        description="Time fastnin's fused ops and models against torch eager and torch.compile.",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        help="comma-separated fp32, bf16, fp16 (default: fp32 on the CPU; fp32,bf16 on the GPU, with --full also fp16)",
    )
    p.add_argument("--batch", type=int, default=None, help="batch size of every case (default: per case and device)")
    p.add_argument("--ops", default=None, help="comma-separated: mlpconv, lrn, gap, case-name parts (cifar), all, none")
    p.add_argument(
        "--models", default=None, help="comma-separated model names (nin, nin_cifar10, alexnet_lrn, ...), all, none"
    )
    p.add_argument(
        "--providers",
        default=None,
        help="comma-separated subset: fastnin, fastnin-<backend>, eager, eager-cl, compile "
        "(fastnin-triton on the CPU means the Triton interpreter: only when named)",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions: seconds (CI)")
    p.add_argument("--full", action="store_true", help="every case and model; torch.compile on the CPU too")
    comp = p.add_mutually_exclusive_group()
    comp.add_argument("--compile", dest="compile", action="store_true", default=None, help="include torch.compile")
    comp.add_argument("--no-compile", dest="compile", action="store_false", help="leave torch.compile out")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the results as Markdown")
    p.add_argument("--plot", metavar="PATH", help="write a PNG chart of the speedups (matplotlib)")
    p.add_argument("--compare", metavar="OLD_JSON", help="show the speedup change against an earlier --json file")
    p.add_argument(
        "--results-dir",
        metavar="DIR",
        help="write DIR/<device>-<short commit>.json and .md (commit: FASTNIN_COMMIT or git rev-parse)",
    )
    p.add_argument(
        "--pytest-junit",
        metavar="XML",
        help="a pytest --junitxml file whose counts and every failure/error go into the results (the GPU check)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="S",
        help="skip the remaining cases after S seconds (torch.compile deferred to the end); the plain "
        "default CPU run has 100, 'inf' lifts it",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    if args.quick and args.full:
        print("--quick and --full exclude each other", file=sys.stderr)
        return 2

    # Imports after parsing, so that --help is instant.
    import torch

    from . import cases as cases_mod
    from . import providers as prov_mod
    from . import report, runner

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        print(f"--device: {e}", file=sys.stderr)
        return 2
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here", file=sys.stderr)
        return 2
    gpu = dev.type == "cuda"
    try:
        if args.dtype:
            dtypes = [runner.parse_dtype(d) for d in _csv(args.dtype)]
        else:
            dtypes = ["fp32", "bf16", "fp16"] if gpu and args.full else ["fp32", "bf16"] if gpu else ["fp32"]
        if args.batch is not None and args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2

    # torch.compile: on the GPU by default; on the CPU only with --full, since compiling each case
    # takes 10-60 s on a 2-core machine and the default run must stay under 2 minutes.
    with_compile = args.compile if args.compile is not None else (not args.quick and (gpu or args.full))
    all_cases = cases_mod.all_cases(device, args.batch, args.quick)
    chosen = cases_mod.select(all_cases, _csv(args.ops), _csv(args.models), args.full or args.quick)
    notes: list[str] = []
    if any(c.group == "models" for c in chosen) and cases_mod.models_module() is None:
        notes.append("models: skipped, fastnin.models is not part of this install")
        chosen = [c for c in chosen if c.group != "models"]
    if not with_compile:
        notes.append(
            "torch.compile: not run"
            + (" (only with --full or --compile on the CPU: compiling each case takes 10-60 s here)" if not gpu else "")
        )
    wanted = _csv(args.providers)
    include_interp = bool(wanted and "fastnin-triton" in wanted)
    try:
        provs = prov_mod.select(prov_mod.all_providers(device, with_compile, include_interp), wanted)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    if not chosen:
        print("no case selected (see --ops / --models)", file=sys.stderr)
        return 2

    old = None
    if args.compare:  # read before the run, so that a bad file fails at once
        try:
            old = report.load_json(args.compare)
        except (OSError, ValueError) as e:
            print(f"--compare: {e}", file=sys.stderr)
            return 2

    settings = runner.Settings.quick() if args.quick else runner.Settings.for_device(device)
    settings.budget_s = args.budget
    plain_default = not (args.quick or args.full or args.ops or args.models or args.budget is not None)
    if plain_default and not gpu:
        # The default run promises to end within 2 minutes on a 2-core CPU (about 90 s measured on
        # an idle one); on a busy machine the cases left at 100 s are skipped, and listed.
        settings.budget_s = DEFAULT_CPU_BUDGET_S
    targets_on = not args.quick and args.batch is None
    t0 = time.perf_counter()
    result = {
        "meta": report.meta(device, argv_used),
        "providers": {p.name: p.describe() for p in provs},
        "settings": {**settings.__dict__, "quick": args.quick, "full": args.full, "dtypes": dtypes},
        "copy_bandwidth": None,
        "rows": [],
        "skipped": [],
        "notes": notes,
        "elapsed_s": None,
    }
    if args.pytest_junit:
        result["parity"] = report.junit_summary(args.pytest_junit)

    def write_files(final: bool) -> list[str]:
        result["elapsed_s"] = round(time.perf_counter() - t0, 2)
        result["complete"] = final
        written = []
        if args.json:
            report.write_json(result, args.json)
            written.append(args.json)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(report.render_markdown(result))
            written.append(args.markdown)
        if args.results_dir:
            js, md = report.results_paths(result, args.results_dir, device)
            report.write_json(result, js)
            md.write_text(report.render_markdown(result))
            written += [str(js), str(md)]
        return written

    def checkpoint(rows, skipped):
        # Files rewritten after every case: a run stopped by a timeout keeps what it measured.
        result["rows"], result["skipped"] = rows, skipped
        write_files(final=False)

    rows, skipped, copy_bw = runner.run_all(
        chosen,
        provs,
        device,
        dtypes,
        settings,
        targets_on,
        progress=not args.no_progress,
        checkpoint=checkpoint if (args.json or args.markdown or args.results_dir) else None,
    )
    result.update(rows=rows, skipped=skipped, copy_bandwidth=copy_bw)
    if old is not None:
        result["compare"] = report.compare(result, old)
    written = write_files(final=True)

    print(report.render_text(result))
    print(f"({result['elapsed_s']:.1f} s)")
    if args.plot:
        report.plot(result, args.plot)
        written.append(args.plot)
    for w in written:
        print(f"wrote {w}")
    # Failing providers are results (in the table); the exit status says only whether the run ran.
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
