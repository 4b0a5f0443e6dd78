"""Backend selection: names, defaults, scoping, and clear errors instead of silent fallbacks."""

import os
import subprocess
import sys
import threading

import pytest
import torch

import fastnin
from fastnin import _backend

from conftest import HAS_CUDA, HAS_TRITON, INTERPRET


# Subprocesses import the same fastnin as this test run (installed, or an in-place build).
_CWD = os.path.dirname(os.path.dirname(os.path.abspath(fastnin.__file__)))


def _x():
    return torch.randn(2, 4, 5, 5)


def test_names_and_default():
    assert fastnin.BACKENDS == ("auto", "cpu", "cuda", "triton", "torch")
    assert fastnin.get_backend() == os.environ.get("FASTNIN_BACKEND", "auto")
    avail = fastnin.available_backends()
    assert "cpu" in avail and "torch" in avail
    assert ("cuda" in avail) == (HAS_CUDA and _backend.cuda_kernels_built())


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        fastnin.set_backend("cudnn")
    with pytest.raises(ValueError, match="unknown backend"):
        with fastnin.use_backend("fast"):
            pass


def test_set_backend_and_context_manager_nest_and_restore():
    before = fastnin.get_backend()
    try:
        fastnin.set_backend("torch")
        assert fastnin.get_backend() == "torch"
        with fastnin.use_backend("cpu"):
            assert fastnin.get_backend() == "cpu"
            with fastnin.use_backend("torch"):
                assert fastnin.get_backend() == "torch"
            assert fastnin.get_backend() == "cpu"
        assert fastnin.get_backend() == "torch"
    finally:
        fastnin.set_backend(before)


def test_use_backend_restores_after_an_exception():
    before = fastnin.get_backend()
    with pytest.raises(KeyError):
        with fastnin.use_backend("torch"):
            raise KeyError("boom")
    assert fastnin.get_backend() == before


def test_use_backend_is_local_to_a_thread():
    default = fastnin.get_backend()
    other = "torch" if default != "torch" else "cpu"
    seen = []
    with fastnin.use_backend(other):
        inner = fastnin.get_backend()
        t = threading.Thread(target=lambda: seen.append(fastnin.get_backend()))
        t.start()
        t.join()
    assert inner == other
    assert seen == [default]


def test_auto_resolves_by_device():
    with fastnin.use_backend("auto"):
        assert _backend.backend_for(_x(), "op") == "cpu"
        assert _backend.backend_for(torch.empty(1, device="meta"), "op") == "torch"


def test_cpu_backend_and_torch_backend_agree():
    x = _x()
    with fastnin.use_backend("torch"):
        ref = fastnin.local_response_norm(x, 3)
    with fastnin.use_backend("cpu"):
        ours = fastnin.local_response_norm(x, 3)
    torch.testing.assert_close(ours, ref)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without a GPU")
def test_cuda_backend_refuses_a_cpu_tensor():
    with fastnin.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot serve a tensor on cpu"):
            fastnin.global_avg_pool2d(_x())


@pytest.mark.needs_cuda
def test_cpu_backend_refuses_a_cuda_tensor():
    with fastnin.use_backend("cpu"):
        with pytest.raises(RuntimeError, match="backend 'cpu' cannot serve a tensor on cuda"):
            fastnin.global_avg_pool2d(_x().cuda())


def test_triton_without_interpreter_refuses_cpu_tensors():
    # A fresh interpreter without TRITON_INTERPRET: the Triton backend must refuse CPU tensors
    # with a clear error rather than fall back to another backend.
    code = (
        "import torch, fastnin\n"
        "x = torch.randn(2, 3, 4, 4)\n"
        "with fastnin.use_backend('triton'):\n"
        "    try:\n"
        "        fastnin.global_avg_pool2d(x)\n"
        "    except RuntimeError as e:\n"
        "        print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=_CWD)
    assert "ERR" in out.stdout, out.stdout + out.stderr
    # Without triton installed (a CPU-only torch has none) the error names the missing package.
    assert ("TRITON_INTERPRET=1" if HAS_TRITON else "needs the triton package") in out.stdout, out.stdout


def test_env_var_sets_the_default():
    code = "import fastnin; print(fastnin.get_backend())"
    env = dict(os.environ, FASTNIN_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=_CWD)
    assert out.stdout.strip().splitlines()[-1] == "torch", out.stderr
    env["FASTNIN_BACKEND"] = "nonsense"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=_CWD)
    assert out.returncode != 0 and "unknown backend 'nonsense'" in out.stderr


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="Triton interpreter not enabled")
def test_broken_triton_interpreter_gets_a_clear_error(monkeypatch):
    # triton 3.6's interpreter with numpy >= 2.4 fails every kernel with an InterpreterError about
    # numpy arrays; the probe run when fastnin.triton is imported names the versions and the fix
    # instead. Here the probe is made to report a failure (this machine's triton and numpy work, as
    # the Triton tests show).
    assert _backend._interpreter_problem() is None
    _backend.check_triton_interpreter()
    monkeypatch.setattr(_backend, "_interpreter_problem", lambda: "InterpreterError: probe")
    with pytest.raises(RuntimeError, match=r"Triton interpreter .* numpy < 2.4 or triton >= 3.8"):
        _backend.check_triton_interpreter()
