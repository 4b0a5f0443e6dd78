"""The main job `python -m fastnin.bench` and its pieces: the quick CLI run and its JSON/Markdown,
--compare, --pytest-junit, provider errors reported (not raised), the model path (with a tiny
stand-in for fastnin.models), the case list, and the timing helpers."""

from __future__ import annotations

import json
import sys
import time
import types

import pytest
import torch
from torch import nn

import fastnin
from fastnin import bench
from fastnin.bench import cases, providers, report, runner, timing

# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def test_summarize():
    t = timing.summarize([0.004, 0.001, 0.003, 0.002, 0.100])
    assert t.median == pytest.approx(0.003)
    assert t.min == pytest.approx(0.001)
    assert t.n == 5
    assert t.iqr > 0
    assert t.ms == pytest.approx(3.0)
    with pytest.raises(ValueError):
        timing.summarize([])


def test_time_fn_measures_a_sleep():
    t = timing.time_fn(lambda: time.sleep(0.002), "cpu", warmup=1, min_reps=3, max_reps=6, target_s=0.01)
    assert 3 <= t.n <= 6
    assert 0.002 <= t.median < 0.05  # never below the sleep; loose above (loaded CI machines)
    with pytest.raises(ValueError, match="min_reps"):
        timing.time_fn(lambda: None, "cpu", min_reps=0)


def test_time_fn_counts_calls():
    calls = []
    t = timing.time_fn(lambda: calls.append(1), "cpu", warmup=2, min_reps=5, max_reps=5, target_s=10.0)
    assert t.n == 5 and len(calls) == 7


def test_reps_for_clamps():
    assert timing.reps_for(1.0, 0.1, 3, 50) == 3
    assert timing.reps_for(1e-9, 0.1, 3, 50) == 50
    assert timing.reps_for(0.01, 0.1, 3, 50) == 10


def test_rotation_count_cpu_is_one():
    assert timing.rotation_count(10, "cpu") == 1


@pytest.mark.skipif(not timing._RESETTABLE, reason="peak RSS cannot be reset on this machine")
def test_peak_memory_cpu_sees_an_allocation():
    mib = 2**20
    big = timing.peak_memory(lambda: torch.ones(64 * mib // 4), "cpu")
    assert big is not None and big >= 56 * mib, big
    small = timing.peak_memory(lambda: None, "cpu")
    assert small is not None and small < 16 * mib, small


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------


def _case(cases_list, cid):
    return next(c for c in cases_list if c.id == cid)


def test_issue_targets_are_on_the_issue_shapes():
    cs = cases.all_cases("cpu")
    lrn = _case(cs, "lrn alexnet.lrn1 fwd")
    assert lrn.shape == "16x96x55x55"
    assert [(t.metric, t.threshold) for t in lrn.targets if t.device == "cpu"] == [("vs_eager", 8.0)]
    lrn_b = _case(cs, "lrn alexnet.lrn1 fwdbwd")
    assert [(t.metric, t.threshold) for t in lrn_b.targets if t.device == "cpu"] == [("vs_eager", 5.0)]
    gap = _case(cs, "gap gap.384x13 fwdbwd")
    assert gap.shape == "64x384x13x13"
    assert [(t.metric, t.threshold) for t in gap.targets if t.device == "cpu"] == [("vs_eager", 1.0)]
    for b in ("cifar.b1", "cifar.b2", "cifar.b3"):
        f, fb = _case(cs, f"mlpconv {b} fwd"), _case(cs, f"mlpconv {b} fwdbwd")
        assert f.batch == fb.batch == 32
        assert [t.threshold for t in f.targets if t.device == "cpu"] == [1.15]
        assert [t.threshold for t in fb.targets if t.device == "cpu"] == [1.0]
    # The GPU batch is the issues' 128; --batch overrides every case.
    assert {c.batch for c in cases.all_cases("cpu", batch=3)} == {3}


def test_quick_shrinks_every_case():
    cs = cases.all_cases("cpu", quick=True)
    assert cs and all(c.batch == 2 and not c.targets for c in cs)
    assert {c.op for c in cs if c.group == "ops"} == {"mlpconv", "lrn", "gap"}
    assert {c.op for c in cs if c.group == "models"} <= set(cases.QUICK_MODELS)
    for c in cs:
        if c.op == "mlpconv":
            assert c.flops() < 1e8
            assert min(cases.out_hw(c.spec)) >= 1


def test_mlpconv_flops_and_op_bytes():
    c = cases.Case("t", "ops", "mlpconv", "fwd", 2, dict(cin=3, h=4, w=4, k=3, stride=1, padding=1, chans=(5, 7)))
    assert c.flops() == 2 * 2 * 16 * (27 * 5 + 5 * 7)
    assert cases.replace(c, mode="fwdbwd").flops() == 3 * c.flops()
    lrn = cases.Case("l", "ops", "lrn", "fwd", 2, dict(c=3, h=4, w=5))
    assert lrn.bytes(torch.float32) == 4 * 2 * (2 * 3 * 4 * 5)
    assert lrn.bytes(torch.bfloat16) == lrn.bytes(torch.float32) / 2


def test_select():
    cs = cases.all_cases("cpu")
    assert {c.op for c in cases.select(cs, ["lrn"], ["none"], False)} == {"lrn"}
    assert all(c.name.startswith("mlpconv cifar") for c in cases.select(cs, ["cifar"], ["none"], False))
    default = cases.select(cs, None, None, False)
    full = cases.select(cs, None, None, True)
    assert len(default) < len(full) == len(cs)


# ----------------------------------------------------------------------------------------------
# the CLI
# ----------------------------------------------------------------------------------------------

QUICK1 = ["--quick", "--ops", "cifar.b3+gap", "--models", "none", "--no-progress"]  # 2 tiny cases


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick CLI run on two small cases, shared by the tests below."""
    d = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTNIN_COMMIT", "abc1234")
    try:
        argv = ["--quick", "--ops", "cifar.b3", "--models", "none", "--no-progress"]
        argv += ["--json", str(d / "r.json"), "--markdown", str(d / "r.md"), "--results-dir", str(d / "res")]
        rc = bench.main(argv)
    finally:
        mp.undo()
    return rc, d


def test_quick_cli_writes_valid_json_and_markdown(quick_run, capsys):
    rc, d = quick_run
    assert rc == 0
    data = json.loads((d / "r.json").read_text())
    m = data["meta"]
    assert m["commit"] == "abc1234" and m["torch"] == torch.__version__ and m["device_type"] == "cpu"
    assert "--quick" in m["command"]
    ids = [r["case"] for r in data["rows"]]
    assert ids == [f"mlpconv cifar.b3{g} {m}" for g in ("", "+gap") for m in ("fwd", "fwdbwd")]
    for r in data["rows"]:
        assert set(r["providers"]) == {"fastnin-cpu", "fastnin-cpu-cl", "eager", "eager-cl"}
        for name, e in r["providers"].items():
            assert "error" not in e, (name, e)
            assert e["ms"] > 0 and e["n"] >= 2
            assert e["max_err"] < 1e-5, (r["case"], name, e["max_err"])
        eager_best = min(r["providers"]["eager"]["ms"], r["providers"]["eager-cl"]["ms"])
        for name in ("fastnin-cpu", "fastnin-cpu-cl"):  # each layout against eager's faster one
            d_ = r["fastnin"][name]
            assert d_["vs_eager"] == pytest.approx(eager_best / r["providers"][name]["ms"])
            assert d_["vs_compile"] is None and d_["tflops"] > 0
    md = (d / "r.md").read_text()
    assert md.startswith("# fastnin benchmark:")
    assert (
        "| case | shape | fastnin-cpu ms | fastnin-cpu-cl ms | eager ms | eager-cl ms | cpu x eager | cpu x compile |"
        in md
    )
    assert sum(line.startswith("| mlpconv cifar.b3") and "| 2x12x3x4 " in line for line in md.splitlines()) == 4
    assert "## Peak memory" in md
    assert "torch.compile: not run" in md
    # --results-dir: <device slug>-<commit>.json and .md
    res = sorted(p.name for p in (d / "res").iterdir())
    slug = report.device_slug("cpu")
    assert res == [f"{slug}-abc1234.json", f"{slug}-abc1234.md"]
    assert json.loads((d / "res" / res[0]).read_text())["rows"] == data["rows"]


def test_compare(quick_run, tmp_path, capsys):
    _, d = quick_run
    old = json.loads((d / "r.json").read_text())
    # An "old" run in which fastnin was twice as slow: the new speedups are twice the old.
    fast = ("fastnin-cpu", "fastnin-cpu-cl")
    for r in old["rows"]:
        for name in fast:
            r["providers"][name]["ms"] *= 2
            r["fastnin"][name]["vs_eager"] /= 2
    old["meta"]["commit"] = "old0001"
    new = json.loads((d / "r.json").read_text())
    cmp = report.compare(new, old)
    assert cmp["old_commit"] == "old0001" and len(cmp["rows"]) == 4 * len(fast)  # 4 cases
    for c in cmp["rows"]:
        assert c["change_vs_eager"] == pytest.approx(2.0)
        assert c["time_ratio"] == pytest.approx(0.5)
    assert "old0001" in report.compare_md(cmp)
    # Through the CLI.
    (tmp_path / "old.json").write_text(json.dumps(old))
    rc = bench.main(
        QUICK1 + ["--compare", str(tmp_path / "old.json"), "--json", str(tmp_path / "new.json")]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "compared with commit old0001" in out
    got = json.loads((tmp_path / "new.json").read_text())["compare"]["rows"]
    assert {c["case"] for c in got} == {"mlpconv cifar.b3+gap fwd", "mlpconv cifar.b3+gap fwdbwd"}
    assert bench.main(["--quick", "--compare", str(tmp_path / "missing.json")]) == 2


def test_provider_error_is_reported_not_raised(monkeypatch, tmp_path):
    def broken(case):
        def f(*a, **k):
            raise RuntimeError("kernel exploded")

        return f

    monkeypatch.setattr(cases, "_fastnin_op", broken)
    rc = bench.main(["--quick", "--ops", "gap.384x13", "--models", "none", "--no-progress",
                     "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")])
    assert rc == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert len(rows) == 2
    for r in rows:
        e = r["providers"]["fastnin-cpu"]
        assert e["ms"] is None and "kernel exploded" in e["error"]
        assert r["providers"]["eager"]["ms"] > 0  # the others still measured
        assert r["fastnin"] == {}
    md = (tmp_path / "r.md").read_text()
    assert "ERROR gap gap.384x13 fwd [fp32] fastnin-cpu: RuntimeError: kernel exploded" in md
    assert "| ERR |" in md


def test_junit_summary(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        """<?xml version="1.0"?><testsuites>
        <testsuite name="pytest" tests="4" failures="1" errors="1" skipped="1" time="2.5">
        <testcase classname="tests.test_lrn" name="test_fwd[cuda-bf16]">
          <failure message="AssertionError: max err 0.5 &gt; 0.01">trace</failure></testcase>
        <testcase classname="tests.test_gap" name="test_bwd">
          <error message="RuntimeError: CUDA error">trace2</error></testcase>
        <testcase classname="tests.test_gap" name="test_ok"/>
        <testcase classname="tests.test_gap" name="test_skip"><skipped message="no"/></testcase>
        </testsuite></testsuites>"""
    )
    s = report.junit_summary(xml)
    assert (s["tests"], s["failures"], s["errors"], s["skipped"]) == (4, 1, 1, 1)
    assert [f["test"] for f in s["failed"]] == ["tests.test_lrn::test_fwd[cuda-bf16]", "tests.test_gap::test_bwd"]
    md = report.parity_md(s)
    assert "4 tests, 1 failed, 1 errors, 1 skipped" in md
    assert "AssertionError: max err 0.5 > 0.01" in md and "RuntimeError: CUDA error" in md
    assert report.junit_summary(tmp_path / "nope.xml")["missing"]
    # Through the CLI: the parity section lands in the JSON and the Markdown.
    rc = bench.main(QUICK1 + ["--pytest-junit", str(xml),
                     "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")])
    assert rc == 0
    assert json.loads((tmp_path / "r.json").read_text())["parity"]["failures"] == 1
    assert "## Parity tests (pytest)" in (tmp_path / "r.md").read_text()


def test_plot(quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, d = quick_run
    report.plot(json.loads((d / "r.json").read_text()), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["--dtype", "fp8"],
        ["--quick", "--full"],
        ["--batch", "0"],
        ["--providers", "nonsense"],
        ["--ops", "none", "--models", "none"],
    ],
)
def test_bad_arguments_exit_2(argv):
    assert bench.main(argv + ["--no-progress"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_exit_2():
    assert bench.main(["--device", "cuda", "--quick"]) == 2


# ----------------------------------------------------------------------------------------------
# models, through a stand-in for fastnin.models
# ----------------------------------------------------------------------------------------------


class _TinyNiN(nn.Module):
    """A two-block NiN of fastnin modules, with dropout (train mode differs from eval)."""

    def __init__(self, in_channels=3, num_classes=10):
        super().__init__()
        self.b1 = fastnin.nn.MLPConv(in_channels, [8, 6], 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.b2 = fastnin.nn.MLPConv(6, [8, num_classes], 3, padding=1, gap=True)

    def forward(self, x):
        return self.b2(self.drop(self.pool(self.b1(x))))


class _Fragile(_TinyNiN):
    """Fails under every fastnin backend but "torch": a provider error to report."""

    def forward(self, x):
        if fastnin.get_backend() != "torch":
            raise RuntimeError("no kernel for this model")
        return super().forward(x)


def _standin_models():
    m = types.ModuleType("fastnin.models")
    m.list_models = lambda: ["lenet", "nin_cifar10"]
    m.input_size = lambda name: (1, 12, 10) if name == "lenet" else (3, 8, 8)

    def get(name, num_classes=10, in_channels=3, **kw):
        return (_Fragile if name == "lenet" else _TinyNiN)(in_channels, num_classes)

    m.get = get
    return m


def test_models_through_a_standin(monkeypatch, tmp_path):
    fake = _standin_models()
    monkeypatch.setitem(sys.modules, "fastnin.models", fake)
    monkeypatch.setattr(fastnin, "models", fake, raising=False)
    rc = bench.main(["--quick", "--ops", "none", "--models", "all", "--no-progress",
                     "--json", str(tmp_path / "r.json")])
    assert rc == 0
    rows = {r["case"]: r for r in json.loads((tmp_path / "r.json").read_text())["rows"]}
    assert set(rows) == {"model lenet infer", "model lenet train", "model nin_cifar10 infer", "model nin_cifar10 train"}
    for mode in ("infer", "train"):
        r = rows[f"model nin_cifar10 {mode}"]
        assert r["shape"] == "2x3x8x8"
        for name in ("fastnin-cpu", "fastnin-cpu-cl", "eager", "eager-cl"):
            e = r["providers"][name]
            assert "error" not in e, (name, e)
            assert e["ms"] > 0 and e["max_err"] < 1e-5, (name, e)
        assert r["fastnin"]["fastnin-cpu"]["images_s"] == pytest.approx(2 / (r["providers"]["fastnin-cpu"]["ms"] / 1e3))
        # The fragile model: fastnin's provider fails, the torch ones run, nothing raised.
        f = rows[f"model lenet {mode}"]
        assert "no kernel for this model" in f["providers"]["fastnin-cpu"]["error"]
        assert f["providers"]["eager"]["ms"] > 0 and f["shape"] == "2x1x12x10"


class _PlainTinyNiN(nn.Module):
    """The textbook twin of _TinyNiN: plain torch layers, the same state_dict keys."""

    def __init__(self, in_channels=3, num_classes=10):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.b2 = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 1), nn.ReLU())

    def forward(self, x):
        return self.b2(self.drop(self.pool(self.b1(x)))).mean(dim=(2, 3))


def test_models_use_the_textbook_twin_when_offered(monkeypatch, tmp_path):
    fake = _standin_models()
    built = []

    def twin(name, num_classes=10, in_channels=3, **kw):
        built.append((name, in_channels))
        return _PlainTinyNiN(in_channels, num_classes)

    fake.twin = twin
    monkeypatch.setitem(sys.modules, "fastnin.models", fake)
    monkeypatch.setattr(fastnin, "models", fake, raising=False)
    rc = bench.main(["--quick", "--ops", "none", "--models", "nin_cifar10", "--no-progress",
                     "--json", str(tmp_path / "r.json")])
    assert rc == 0
    assert ("nin_cifar10", 3) in built
    for r in json.loads((tmp_path / "r.json").read_text())["rows"]:
        for name in ("eager", "eager-cl"):
            e = r["providers"][name]
            assert "note" not in e and "error" not in e, e
            assert e["max_err"] < 1e-5  # the twin computes the same function with the same weights


def test_training_step_error_ignores_the_timed_steps(monkeypatch):
    """The timed SGD steps move the provider's weights; the error check must still compare the
    model it was given with the reference (it once compared the trained one: 2e-3 off)."""
    fake = _standin_models()
    monkeypatch.setitem(sys.modules, "fastnin.models", fake)
    monkeypatch.setattr(fastnin, "models", fake, raising=False)
    case = next(c for c in cases.all_cases("cpu", quick=True) if c.id == "model nin_cifar10 train")
    from fastnin.bench.providers import Provider

    prov = Provider("fastnin-cpu", "fastnin", backend="cpu")
    prep = cases.prepare(case, prov, "cpu", torch.float32)
    losses = [prep.fn() for _ in range(5)]
    assert all(loss.dim() == 0 and torch.isfinite(loss) for loss in losses)
    err = prep.error()
    assert err["rel"] < 1e-5


def test_models_missing_is_a_note(monkeypatch, capsys):
    monkeypatch.setattr(cases, "models_module", lambda: None)
    assert bench.main(["--quick", "--ops", "cifar.b3+gap", "--models", "all", "--no-progress"]) == 0
    assert "models: skipped, fastnin.models is not part of this install" in capsys.readouterr().out


def test_dtype_parsing():
    assert runner.parse_dtype("float16") == "fp16" and runner.parse_dtype("BF16") == "bf16"
    with pytest.raises(ValueError, match="--dtype"):
        runner.parse_dtype("int8")


def test_budget_skips_and_lists_the_rest(tmp_path):
    rc = bench.main(["--quick", "--ops", "cifar.b3", "--models", "none", "--no-progress", "--budget", "0",
                     "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")])
    assert rc == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["rows"] == [] and data["complete"] is True
    assert len(data["skipped"]) == 4 and all("time budget" in s["reason"] for s in data["skipped"])
    assert "skipped mlpconv cifar.b3 fwd [fp32]: time budget of 0 s spent" in (tmp_path / "r.md").read_text()


def test_target_cases_get_more_interleaved_rounds(monkeypatch):
    """A case whose target is checked on this device gets target_rounds rounds of at least one call
    per provider (A B A B ...), the others the base settings: a noise burst in one round then moves
    the target case's medians little."""
    order = []
    sample = timing.sample

    def record(fn, device, reps):
        order.append(fn)
        return sample(fn, device, reps)

    monkeypatch.setattr(timing, "sample", record)
    small = {c.id: c for c in cases.all_cases("cpu", batch=2)}  # the issue shapes at batch 2
    targeted, plain = small["gap gap.384x13 fwd"], small["gap imagenet.gap fwd"]
    assert any(t.device == "cpu" for t in targeted.targets) and not any(t.device == "cpu" for t in plain.targets)
    settings = runner.Settings(warmup=0, rounds=1, min_reps=3, max_reps=8, target_s=0.0, target_rounds=5,
                               warm_calls=0)
    base = [p for p in providers.all_providers("cpu", with_compile=False) if p.name in ("fastnin-cpu", "eager")]
    rows, skipped, _ = runner.run_all([targeted, plain], base, "cpu", ["fp32"], settings, targets_on=True,
                                      progress=False)
    assert skipped == []
    a, b = order[0], order[2]
    assert a is not b
    # round 0: each provider's sizing call, then its share; rounds 1-4: A B, A B, ...
    assert order[:12] == [a, a, b, b] + [a, b] * 4
    n = {r["case"]: {name: e["n"] for name, e in r["providers"].items()} for r in rows}
    assert n[targeted.id] == {"fastnin-cpu": 6, "eager": 6}  # 1 sizing call + 5 rounds of 1
    assert n[plain.id] == {"fastnin-cpu": 3, "eager": 3}  # 1 + 1 round of 2
    # Without targets (--quick, --batch) every case gets the base settings.
    rows, _, _ = runner.run_all([targeted], base, "cpu", ["fp32"], settings, targets_on=False, progress=False)
    assert {e["n"] for e in rows[0]["providers"].values()} == {3}
    # for_targets never lowers what the base settings ask.
    assert runner.Settings(rounds=20, min_reps=30).for_targets().rounds == 20
    assert runner.Settings(rounds=20, min_reps=30).for_targets().min_reps == 30


def test_short_calls_warm_up_untimed_at_each_turn(monkeypatch):
    """On the CPU a provider whose call is shorter than warm_below_s makes warm_calls untimed calls
    at the start of each of its turns, and its cold sizing call is no sample; a longer one (here:
    every call, with warm_below_s=0) is timed from its first call on. The GPU settings warm none."""
    timed, calls = [], []

    def record(fn, device, reps):
        timed.append((fn, reps))
        return [1e-4] * reps  # 0.1 ms a call, without running it

    monkeypatch.setattr(timing, "sample", record)
    case = {c.id: c for c in cases.all_cases("cpu", batch=2)}["gap imagenet.gap fwd"]
    prov = [p for p in providers.all_providers("cpu", with_compile=False) if p.name in ("fastnin-cpu", "eager")]
    real_prepare = runner.prepare

    def counting_prepare(case, provider, device, dtype):
        prep = real_prepare(case, provider, device, dtype)
        fn = prep.fn

        def counted():
            calls.append(provider.name)
            return fn()

        prep.fn = counted
        return prep

    monkeypatch.setattr(runner, "prepare", counting_prepare)
    base = dict(warmup=0, rounds=3, min_reps=6, max_reps=6, target_s=0.0)
    row = runner.run_case(case, prov, "cpu", "fp32", runner.Settings(**base, warm_calls=2, warm_below_s=1e-3))
    # Sizing call, then per round: 2 untimed calls and 2 timed ones (6 samples over 3 rounds).
    assert {e["n"] for e in row["providers"].values()} == {6}
    assert [r for _, r in timed] == [1, 2, 1, 2] + [2, 2] * 2
    # Untimed: the peak-memory call and the 2 warm calls of each of the 3 turns, per provider.
    assert calls.count("fastnin-cpu") == calls.count("eager") == 1 + 3 * 2
    assert calls[2:4] == ["fastnin-cpu"] * 2  # after the peak-memory calls: fastnin's first turn
    timed.clear()
    calls.clear()
    row = runner.run_case(case, prov, "cpu", "fp32", runner.Settings(**base, warm_calls=2, warm_below_s=0.0))
    assert {e["n"] for e in row["providers"].values()} == {7}  # the sizing call is a sample, + 3 x 2
    assert calls.count("fastnin-cpu") == calls.count("eager") == 1
    assert runner.Settings.for_device("cuda").warm_calls == 0 and runner.Settings.for_device("cpu").warm_calls > 0
