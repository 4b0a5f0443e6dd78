"""Which implementation serves an op: the backend registry.

Names:
  "auto"    the native kernel for the tensor's device: "cpu" for CPU tensors; "cuda" for CUDA
            tensors when fastnin._C was built with CUDA, else "triton"; "torch" on other devices.
  "cpu"     the C++ kernels of csrc/cpu (CPU tensors only).
  "cuda"    the CUDA C++ kernels of csrc/cuda (CUDA tensors, when built with CUDA).
  "triton"  the Triton kernels of fastnin/triton (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).
  "torch"   the plain torch composition of fastnin/reference.py (any device).

The default comes from the environment variable FASTNIN_BACKEND (else "auto"); set_backend()
changes it for the process, use_backend() for the current thread / context only. A backend that
cannot serve a tensor raises RuntimeError: fastnin never falls back silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"fastnin: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


_default = _check_name(os.environ.get("FASTNIN_BACKEND", "auto").strip() or "auto")
# A ContextVar, not a global, so that use_backend() in one thread does not change another's;
# torch.compile (torch >= 2.14) guards on its value.
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastnin_backend", default=None)


def _torch_at_least(major: int, minor: int) -> bool:
    try:
        return tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (major, minor)
    except ValueError:  # an unparsable local version: assume a recent torch
        return True


def _override_now() -> str | None:
    return _override.get()


if not _torch_at_least(2, 14):
    # Dynamo before torch 2.14 cannot trace ContextVar.get (torch.compile(fullgraph=True) of any
    # fastnin module failed with "Unsupported method call ... ContextVar", seen on 2.13). There the
    # override is read once while tracing and taken as a constant: a compiled function keeps the
    # use_backend() it was compiled under (set_backend(), a plain global, is still guarded on).
    _override_now = torch._dynamo.assume_constant_result(_override_now)


def set_backend(name: str) -> None:
    """Set the process-wide default backend (one of BACKENDS)."""
    global _default
    _default = _check_name(name)


def get_backend() -> str:
    """The backend in force here: use_backend()'s if inside one, else set_backend()'s."""
    return _override_now() or _default


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the enclosed ops on backend `name` (this thread / context only)."""
    token = _override.set(_check_name(name))
    try:
        yield
    finally:
        _override.reset(token)


@functools.lru_cache(maxsize=None)
def cuda_kernels_built() -> bool:
    """Whether fastnin._C carries the CUDA kernels."""
    from . import _C  # noqa: F401

    return torch._C._dispatch_has_kernel_for_dispatch_key("fastnin::lrn", "CUDA")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def wrap_triton(kernel):
    """torch.library.wrap_triton(kernel) (a launch that torch.compile can trace), or under the
    Triton interpreter the kernel itself: the ops are then plain custom ops (fastnin/triton/
    __init__.py) and nothing traces into the launch. torch 2.14 does this itself; torch < 2.14
    refuses the interpreter's kernels ("wrap_triton only works on functions annotated with
    triton.jit", or an AttributeError for an autotuned one), which failed every Triton test under
    TRITON_INTERPRET=1 with torch 2.11 (the GPU image's version)."""
    if triton_interpreting():
        return kernel
    return torch.library.wrap_triton(kernel)


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"{type(e).__name__}: {e}"
    return None


@functools.lru_cache(maxsize=None)
def load_triton():
    """Import fastnin.triton, which registers the torch.ops.fastnin_triton.* ops."""
    err = _triton_import_error()
    if err is not None:
        raise RuntimeError(f"fastnin: backend 'triton' needs the triton package ({err})")
    from . import triton as triton_backend

    return triton_backend


def check_triton_interpreter() -> None:
    """Under TRITON_INTERPRET=1, raise a clear error where this triton and numpy cannot run
    fastnin's kernels. Called when fastnin.triton is imported (not per op: torch.compile traces the
    per-op path, and cannot trace a kernel launch there)."""
    if not triton_interpreting():
        return
    problem = _interpreter_problem()
    if problem is not None:
        import numpy
        import triton

        raise RuntimeError(
            f"fastnin: the Triton interpreter (TRITON_INTERPRET=1) of triton {triton.__version__} "
            f"cannot run a loop over a runtime bound with numpy {numpy.__version__} ({problem}); "
            "fastnin's Triton kernels have such loops. Use numpy < 2.4 or triton >= 3.8 for the "
            "interpreter (this does not concern Triton on a GPU)."
        )


@functools.lru_cache(maxsize=None)
def _interpreter_problem() -> str | None:
    """Run a one-loop kernel under the Triton interpreter; return the error, if any. triton 3.6's
    interpreter converts a scalar argument with int() of a 1-element array, which numpy >= 2.4
    refuses: every fastnin Triton kernel then failed with an InterpreterError naming numpy, not the
    cause (seen with torch 2.11, triton 3.6, numpy 2.4; triton 3.8 and numpy 2.3 both work)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _loop_probe(out_ptr, n):
        acc = 0
        for _ in range(0, n, 1):
            acc += 1
        tl.store(out_ptr, acc)

    # Outside any torch.func transform (the first Triton op may come under one): there a factory
    # function returns a functorch wrapper, whose storage the interpreter cannot read.
    with torch._C._DisableFuncTorch():
        out = torch.zeros(1, dtype=torch.int32)
        try:
            _loop_probe[(1,)](out, 3)
        except Exception as e:  # triton's InterpreterError wraps numpy's TypeError
            return f"{type(e).__name__}: {e}"
    return None if int(out) == 3 else f"a 3-step loop counted {int(out)}"


def available_backends() -> list[str]:
    """The backends this build and machine can run, besides "auto"."""
    names = ["cpu"]
    if cuda_kernels_built() and torch.cuda.is_available():
        names.append("cuda")
    if _triton_import_error() is None and (torch.cuda.is_available() or triton_interpreting()):
        names.append("triton")
    names.append("torch")
    return names


def backend_for(x: torch.Tensor, op: str) -> str:
    """Resolve the backend in force for an op on tensor `x`; raise if it cannot serve `x`."""
    name = get_backend()
    dev = x.device.type
    if name == "auto":
        if dev == "cpu":
            return "cpu"
        if dev == "cuda":
            return "cuda" if cuda_kernels_built() else _need_triton(op, dev)
        return "torch"
    if name == "cpu" and dev != "cpu":
        raise RuntimeError(f"fastnin.{op}: backend 'cpu' cannot serve a tensor on {x.device}")
    if name == "cuda":
        if dev != "cuda":
            raise RuntimeError(f"fastnin.{op}: backend 'cuda' cannot serve a tensor on {x.device}")
        if not cuda_kernels_built():
            raise RuntimeError(
                f"fastnin.{op}: backend 'cuda' is not available: fastnin._C was built without CUDA "
                "(reinstall with a CUDA toolkit, or FASTNIN_CUDA=1)"
            )
    if name == "triton":
        return _need_triton(op, dev)
    return name


def _need_triton(op: str, dev: str) -> str:
    load_triton()
    if dev == "cuda" or (dev == "cpu" and triton_interpreting()):
        return "triton"
    if dev == "cpu":
        raise RuntimeError(
            f"fastnin.{op}: backend 'triton' cannot serve a CPU tensor unless TRITON_INTERPRET=1 "
            "(the Triton interpreter) is set before fastnin is imported"
        )
    raise RuntimeError(f"fastnin.{op}: backend 'triton' cannot serve a tensor on device type {dev!r}")
