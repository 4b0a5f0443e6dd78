"""Run cases x providers x dtypes and gather one result row per (case, dtype).

Per case, every provider is prepared and warmed up first (torch.compile compiles then), its peak
memory measured on one call, then the providers are timed in interleaved rounds (A B C, A B C, ...)
so that a change in the machine's load during the case falls on all of them alike (a case whose
targets are checked gets more rounds, Settings.target_rounds; on the CPU a short call is
repeated untimed at the start of each turn, Settings.warm_calls), and finally
each one's error against the float64 reference is taken. A provider that fails is reported in its
row (its "error" field) and the run goes on.
"""

from __future__ import annotations

import gc
import time
import traceback
from dataclasses import dataclass, replace

import torch

from . import timing
from .cases import Case, clear_reference_cache, prepare
from .providers import Provider

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float64": "fp64"}


def parse_dtype(name: str) -> str:
    n = name.strip().lower()
    n = ALIASES.get(n, n)
    if n not in DTYPES:
        raise ValueError(f"--dtype: unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return n


@dataclass
class Settings:
    warmup: int = 1
    rounds: int = 3  # interleaved timing rounds per case
    # per provider, over all rounds. 5, not 3: a model's training step (~0.3 s on the CPU) got only
    # the minimum, and medians of 3 moved AlexNet's step by 1.6x between runs (176-180 ms when
    # timed 12 times in a loop, 190-320 ms as medians of 3 in the bench).
    min_reps: int = 5
    max_reps: int = 60
    target_s: float = 0.3  # seconds of samples per provider and case
    budget_s: float | None = None  # skip the remaining cases past this many seconds
    # Cases with a target on this device and dtype: at least this many rounds, each with at least
    # one call of every provider. With the defaults above a ~110 ms case got 7 calls a provider in
    # 3 rounds, and a burst of this shared VM's noise in one round moved its median: CIFAR block 2
    # fwd+bwd over eager came out 1.004-1.128x (channels_last) in 8 runs, against 1.050-1.069x with
    # 12 rounds of one call each, the two settings alternated in one process.
    target_rounds: int = 12
    # CPU: a provider whose call takes less than warm_below_s makes warm_calls untimed calls at the
    # start of each of its turns in a round (its sizing call, made cold, is not a sample either).
    # Why: the previous providers' inputs evict its input from the caches, and the first calls
    # after a switch time that transition. GAP's 64x384x13x13 forward (16.6 MB, 2-core AMD EPYC,
    # 32 MiB L3), medians over 10-12 rounds of 12 calls by position in the turn, ms: fastnin NCHW
    # 0.85 0.44 0.22 0.18 0.17 0.16 ... 0.16, eager 0.68 0.38 0.23 0.20 0.20 0.20 ... 0.19. With
    # 5 calls a turn the median fell on the third call, so it timed how fast the L3 refilled.
    # 0 on the GPU, where the inputs rotate so that every call is timed cold instead.
    warm_calls: int = 4
    warm_below_s: float = 0.01

    @classmethod
    def quick(cls) -> Settings:
        return cls(warmup=1, rounds=1, min_reps=3, max_reps=8, target_s=0.01)

    def for_targets(self) -> Settings:
        """The settings of a case whose targets are checked: finer interleaving, more calls."""
        rounds = max(self.rounds, self.target_rounds)
        return replace(self, rounds=rounds, min_reps=max(self.min_reps, self.target_rounds))

    @classmethod
    def for_device(cls, device) -> Settings:
        # GPU: per-call CUDA-event times are steady; 0.1 s of samples is tens to hundreds of calls.
        return cls(target_s=0.1, max_reps=200, warm_calls=0) if torch.device(device).type == "cuda" else cls()


def _err_text(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:240]


def copy_bandwidth(device) -> float | None:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), the yardstick of the
    memory-bound ops on the GPU; None on the CPU."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    n = 256 * 2**20
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    t = timing.time_fn(lambda: b.copy_(a), dev, warmup=3, min_reps=10, max_reps=50, target_s=0.2)
    del a, b
    return 2 * n / t.median


def run_case(case: Case, providers: list[Provider], device, dtype_name: str, settings: Settings) -> dict:
    dtype = DTYPES[dtype_name]
    row = {
        "case": case.id,
        "name": case.name,
        "group": case.group,
        "op": case.op,
        "mode": case.mode,
        "shape": case.shape,
        "batch": case.batch,
        "dtype": dtype_name,
        "flops": case.flops(),
        "bytes": case.bytes(dtype) if case.group == "ops" else None,
        "providers": {},
    }
    clear_reference_cache()
    prepared = {}
    for p in providers:
        entry: dict = {"ms": None}
        row["providers"][p.name] = entry
        try:
            prep = prepare(case, p, device, dtype)
            t0 = time.perf_counter()
            for _ in range(settings.warmup + (1 if p.kind == "compile" else 0)):
                prep.fn()
            timing._sync(device)
            entry["warmup_s"] = time.perf_counter() - t0
            entry["peak_mem"] = timing.peak_memory(prep.fn, device)
            entry["sets"] = prep.sets
            if prep.shape:
                row["shape"] = prep.shape
            if prep.note:
                entry["note"] = prep.note
            prepared[p.name] = prep
        except Exception as e:  # noqa: BLE001 - a failing provider is a result, not a crash
            entry["error"] = _err_text(e)
            entry["traceback"] = traceback.format_exc(limit=6)
    # Interleaved timing rounds; the first timed call of each sizes its share.
    samples: dict[str, list[float]] = {n: [] for n in prepared}
    reps: dict[str, int] = {}
    warm: dict[str, int] = {}  # untimed calls at the start of each turn (Settings.warm_calls)
    for r in range(settings.rounds):
        for name, prep in list(prepared.items()):
            try:
                if name not in reps:
                    first = timing.sample(prep.fn, device, 1)
                    warm[name] = settings.warm_calls if first[0] < settings.warm_below_s else 0
                    if not warm[name]:
                        samples[name] += first
                    total = timing.reps_for(first[0], settings.target_s, settings.min_reps, settings.max_reps)
                    reps[name] = max(1, -(-(total - (0 if warm[name] else 1)) // settings.rounds))
                for _ in range(warm[name]):
                    prep.fn()
                if warm[name]:
                    timing._sync(device)
                samples[name] += timing.sample(prep.fn, device, reps[name])
            except Exception as e:  # noqa: BLE001
                row["providers"][name]["error"] = _err_text(e)
                del prepared[name]
    for name, prep in prepared.items():
        entry = row["providers"][name]
        t = timing.summarize(samples[name])
        entry.update(ms=t.median * 1e3, min_ms=t.min * 1e3, iqr_ms=t.iqr * 1e3, n=t.n)
        try:
            err = prep.error()
            entry["max_err"] = None if err is None else err["rel"]
            entry["max_abs_err"] = None if err is None else err["abs"]
        except Exception as e:  # noqa: BLE001
            entry["max_err"] = None
            entry["error"] = "error check: " + _err_text(e)
    prepared.clear()
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return row


def rates(row: dict, ms: float, copy_bw: float | None) -> dict:
    """Throughput of one provider at `ms` per call: TFLOP/s (mlpconv), GB/s of least traffic and
    its fraction of the copy bandwidth (lrn, gap), images/s (models)."""
    t = ms / 1e3
    d = {}
    if row.get("flops"):
        d["tflops"] = row["flops"] / t / 1e12
    if row.get("bytes"):
        d["gbs"] = row["bytes"] / t / 1e9
        d["bw_frac"] = row["bytes"] / t / copy_bw if copy_bw else None
    if row.get("group") == "models":
        d["images_s"] = row["batch"] / t
    return d


def derive(row: dict, copy_bw: float | None, targets_on: bool, case: Case | None = None, device="cpu") -> dict:
    """Speedups, throughput and targets of each fastnin provider in a row."""
    provs = row["providers"]

    def ms(name):
        e = provs.get(name)
        return e["ms"] if e and e.get("ms") else None

    eager = [m for m in (ms("eager"), ms("eager-cl")) if m]
    eager_best = min(eager) if eager else None
    row["eager_best_ms"] = eager_best
    derived = {}
    for name, e in provs.items():
        if not name.startswith("fastnin") or not e.get("ms"):
            continue
        d = {
            "vs_eager": eager_best / e["ms"] if eager_best else None,
            "vs_eager_nchw": ms("eager") / e["ms"] if ms("eager") else None,
            "vs_eager_cl": ms("eager-cl") / e["ms"] if ms("eager-cl") else None,
            "vs_compile": ms("compile") / e["ms"] if ms("compile") else None,
        }
        d.update(rates(row, e["ms"], copy_bw))
        derived[name] = d
    row["fastnin"] = derived
    row["targets"] = []
    if targets_on and case is not None:
        dev = torch.device(device).type
        for tgt in case.targets:
            if tgt.device != dev or row["dtype"] not in tgt.dtypes:
                continue
            for name, d in derived.items():
                v = d.get(tgt.metric)
                row["targets"].append(
                    {
                        "provider": name,
                        "metric": tgt.metric,
                        "threshold": tgt.threshold,
                        "label": tgt.label(),
                        "value": v,
                        "met": None if v is None else bool(v >= tgt.threshold),
                    }
                )
    return row


def run_all(
    cases: list[Case],
    providers: list[Provider],
    device,
    dtypes: list[str],
    settings: Settings,
    targets_on: bool,
    progress: bool = True,
    checkpoint=None,
) -> tuple[list[dict], list[dict], float | None]:
    """Returns (rows, skipped, copy bandwidth). `checkpoint(rows, skipped)`, if given, is called
    after every case (so that a run killed by a timeout leaves its results so far).

    With a time budget, torch.compile (whose max-autotune compilation can take a minute per case)
    is deferred: every case is first measured without it, then compile is added case by case,
    those with a compile target first, while the budget lasts; the rest say so in `skipped`."""
    copy_bw = None
    try:
        copy_bw = copy_bandwidth(device)
    except Exception:  # noqa: BLE001 - a yardstick, not a result
        pass
    deferred = [p for p in providers if p.kind == "compile"] if settings.budget_s is not None else []
    first = [p for p in providers if p not in deferred]
    rows, skipped = [], []
    tasks = [(dt, c) for dt in dtypes for c in cases]
    bar = _progress(len(tasks) * (1 + bool(deferred)), progress)
    t0 = time.perf_counter()

    def over_budget() -> bool:
        return settings.budget_s is not None and time.perf_counter() - t0 > settings.budget_s

    def settings_for(case: Case, dtype: str) -> Settings:
        dev = torch.device(device).type
        targeted = targets_on and any(t.device == dev and dtype in t.dtypes for t in case.targets)
        return settings.for_targets() if targeted else settings

    done: list[tuple[dict, Case]] = []
    for dt, case in tasks:
        if bar is not None:
            bar.set_postfix_str(f"{case.id} {dt}", refresh=False)
        if over_budget():
            skipped.append({"case": case.id, "dtype": dt, "reason": f"time budget of {settings.budget_s:g} s spent"})
        else:
            try:
                row = run_case(case, first, device, dt, settings_for(case, dt))
                rows.append(derive(row, copy_bw, targets_on, case, device))
                done.append((row, case))
            except Exception as e:  # noqa: BLE001
                skipped.append({"case": case.id, "dtype": dt, "reason": _err_text(e)})
        if bar is not None:
            bar.update(1)
        if checkpoint is not None:
            checkpoint(rows, skipped)
    if deferred:
        order = sorted(done, key=lambda rc: (not any(t.metric == "vs_compile" for t in rc[1].targets), rc[1].group))
        for row, case in order:
            if bar is not None:
                bar.set_postfix_str(f"compile {case.id} {row['dtype']}", refresh=False)
            if over_budget():
                for p in deferred:
                    row["providers"][p.name] = {"ms": None, "skipped": f"time budget of {settings.budget_s:g} s spent"}
            else:
                extra = run_case(case, deferred, device, row["dtype"], settings_for(case, row["dtype"]))
                row["providers"].update(extra["providers"])
            derive(row, copy_bw, targets_on, case, device)
            if bar is not None:
                bar.update(1)
            if checkpoint is not None:
                checkpoint(rows, skipped)
    if bar is not None:
        bar.close()
    return rows, skipped, copy_bw


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    # disable=None: a bar on a terminal, nothing in a log file.
    return tqdm(total=total, unit="case", disable=None, dynamic_ncols=True, leave=False)
