"""pytest-benchmark suite of fastnin: `pytest benchmarks --benchmark-only`.

The cases, providers and setup are fastnin.bench's (the main job `python -m fastnin.bench` runs
the same ones). Each test benchmarks one (case, dtype, provider); within a case the torch
providers run first, so that a fastnin test finds their medians from this same run and records
its speedups in `extra_info` (a baseline filtered out with -k is measured on the spot instead).

Environment:
  FASTNIN_BENCH_QUICK=1     tiny shapes, few rounds, no torch.compile (CI: well under a minute)
  FASTNIN_BENCH_FULL=1      every case and model (else the default set of python -m fastnin.bench)
  FASTNIN_BENCH_DEVICE      cpu or cuda (default: cuda if available)
  FASTNIN_BENCH_DTYPES      comma-separated (default: fp32 on the CPU; fp32,bf16,fp16 on the GPU)
  FASTNIN_BENCH_COMPILE=0/1 torch.compile provider (default: on, except in quick mode)

Targets of the issues (e.g. LRN forward >= 8x torch on the CPU) are recorded as extra_info
`target` / `meets_target`, never asserted: a timing on a shared machine is not a test failure.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

from fastnin.bench import cases as cases_mod
from fastnin.bench import providers as prov_mod
from fastnin.bench import report, runner, timing

QUICK = timing.environ_flag("FASTNIN_BENCH_QUICK")
FULL = timing.environ_flag("FASTNIN_BENCH_FULL")
DEVICE = os.environ.get("FASTNIN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
GPU = torch.device(DEVICE).type == "cuda"
_dt = os.environ.get("FASTNIN_BENCH_DTYPES")
DTYPES = [runner.parse_dtype(d) for d in _dt.split(",")] if _dt else (["fp32", "bf16", "fp16"] if GPU else ["fp32"])
COMPILE = timing.environ_flag("FASTNIN_BENCH_COMPILE", default=not QUICK)
SETTINGS = runner.Settings.quick() if QUICK else runner.Settings.for_device(DEVICE)

# Baselines before fastnin within a case (pytest keeps parametrization order).
PROVIDERS = sorted(
    prov_mod.all_providers(DEVICE, COMPILE) if not (GPU and not torch.cuda.is_available()) else [],
    key=lambda p: (p.is_fastnin, p.name),
)


def bench_cases(group: str) -> list[cases_mod.Case]:
    cs = [c for c in cases_mod.all_cases(DEVICE, quick=QUICK) if c.group == group]
    return [c for c in cs if FULL or QUICK or c.default]


def params(group: str):
    """(case, dtype, provider) triples as pytest params, ids like `lrn-alexnet.lrn1-fwd-fp32-eager`."""
    out = []
    for dt in DTYPES:
        for c in bench_cases(group):
            for p in PROVIDERS:
                out.append(pytest.param(c, dt, p, id=f"{c.id.replace(' ', '-')}-{dt}-{p.name}"))
    return out


_measured: dict[tuple[str, str, str], float] = {}  # (case id, dtype, provider) -> median seconds
_copy_bw: list[float | None] = []


def _versions() -> dict:
    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = None
    return {
        "device": report.device_name(DEVICE),
        "torch": torch.__version__,
        "triton": tv,
        "python": platform.python_version(),
    }


def _copy_bandwidth():
    if not _copy_bw:
        _copy_bw.append(runner.copy_bandwidth(DEVICE))
    return _copy_bw[0]


def _timed(fn):
    if GPU:
        def run():
            fn()
            torch.cuda.synchronize()

        return run
    return fn


def _median_elsewhere(case, dtype, provider) -> float | None:
    """A baseline's median from this run, measured now if its own test did not run."""
    key = (case.id, dtype, provider.name)
    if key not in _measured:
        try:
            prep = cases_mod.prepare(case, provider, DEVICE, runner.DTYPES[dtype])
            t = timing.time_fn(
                prep.fn,
                DEVICE,
                warmup=SETTINGS.warmup + (provider.kind == "compile"),
                min_reps=SETTINGS.min_reps,
                max_reps=SETTINGS.max_reps,
                target_s=SETTINGS.target_s,
            )
            _measured[key] = t.median
        except Exception:  # noqa: BLE001 - a failing baseline leaves the ratio unknown
            _measured[key] = None
    return _measured[key]


def run_benchmark(benchmark, case: cases_mod.Case, dtype: str, provider: prov_mod.Provider) -> None:
    benchmark.group = f"{case.id} {dtype}"
    info = benchmark.extra_info
    info.update(_versions())
    info.update(case=case.id, shape=case.shape, dtype=dtype, provider=provider.name, quick=QUICK)
    prep = cases_mod.prepare(case, provider, DEVICE, runner.DTYPES[dtype])
    fn = _timed(prep.fn)
    try:
        for _ in range(SETTINGS.warmup + (provider.kind == "compile")):
            fn()
    except NotImplementedError as e:
        # The dispatcher has no kernel of this op for this device in this build (an op still being
        # written): nothing to time. A wrong result or any other error fails the test.
        pytest.skip(f"{provider.name}: no kernel here: {str(e).splitlines()[0][:200]}")
    one = timing.sample(fn, "cpu", 1)[0]  # wall time incl. the synchronize on the GPU
    rounds = timing.reps_for(one, SETTINGS.target_s, SETTINGS.min_reps, SETTINGS.max_reps)
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None else one
    _measured[(case.id, dtype, provider.name)] = median
    if prep.shape:
        info["shape"] = prep.shape
    info["median_ms"] = median * 1e3
    info["peak_memory_bytes"] = timing.peak_memory(prep.fn, DEVICE)
    info["peak_memory_method"] = "torch.cuda.max_memory_allocated" if GPU else "peak RSS: " + timing.CPU_PEAK_METHOD
    err = prep.error()
    info["max_rel_err"] = None if err is None else err["rel"]
    info["max_abs_err"] = None if err is None else err["abs"]

    # Throughput and speedups, through the main job's own derivation.
    row = {
        "group": case.group,
        "batch": case.batch,
        "dtype": dtype,
        "flops": case.flops(),
        "bytes": case.bytes(runner.DTYPES[dtype]) if case.group == "ops" else None,
        "providers": {provider.name: {"ms": median * 1e3}},
    }
    info.update({k: v for k, v in runner.rates(row, median * 1e3, _copy_bandwidth()).items() if v is not None})
    if not provider.is_fastnin:
        return
    for base in (prov_mod.EAGER, prov_mod.EAGER_CL) + ((prov_mod.compile_provider(DEVICE),) if COMPILE else ()):
        m = _median_elsewhere(case, dtype, base)
        row["providers"][base.name] = {"ms": None if m is None else m * 1e3}
    runner.derive(row, _copy_bandwidth(), targets_on=not QUICK, case=case, device=DEVICE)
    d = row["fastnin"].get(provider.name, {})
    info["speedup_vs_eager"] = d.get("vs_eager")  # eager in its faster layout
    info["speedup_vs_eager_nchw"] = d.get("vs_eager_nchw")
    info["speedup_vs_eager_channels_last"] = d.get("vs_eager_cl")
    info["speedup_vs_compile"] = d.get("vs_compile")
    if not COMPILE:
        info["compile_note"] = "torch.compile not measured (FASTNIN_BENCH_COMPILE=0 or quick mode)"
    tg = row["targets"]
    if tg:
        info["target"] = "; ".join(t["label"] for t in tg)
        info["target_values"] = [t["value"] for t in tg]
        met = [t["met"] for t in tg]
        info["meets_target"] = None if None in met else all(met)


@pytest.fixture
def bench_run(benchmark):
    def run(case, dtype, provider):
        run_benchmark(benchmark, case, dtype, provider)

    return run


def pytest_generate_tests(metafunc):
    """Parametrize every test taking (case, dtype, provider) over its module's GROUP ("ops" or
    "models"): a hook rather than `from conftest import ...`, which would find tests/conftest.py
    when both folders are collected in one run."""
    if {"case", "dtype", "provider"} <= set(metafunc.fixturenames):
        metafunc.parametrize("case,dtype,provider", params(metafunc.module.GROUP))

