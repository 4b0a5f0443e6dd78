"""Every Triton kernel launch compiles for the H100 (sm_90) to a cubin, without a GPU.

The other Triton tests run the kernels under the interpreter on this machine, which never lowers
them; tests/_triton_aot.py records the launchers' launches (every dtype, stage count, width class,
gap, LRN and GAP layout) and compiles each, every autotune config included, through Triton's JIT
path against a stand-in driver for sm_90, checking shared memory against the 227 KB a block may
have. It found fp32 configs of the chain kernels at 272-288 KB. On a GPU machine the kernels are
compiled for real by the other tests, so this one is skipped there.
"""

import os
import subprocess
import sys

import pytest
from conftest import HAS_CUDA, HAS_TRITON

import fastnin

_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_triton_aot.py")
# The subprocess imports the same fastnin as this test run (installed, or an in-place build).
_CWD = os.path.dirname(os.path.dirname(os.path.abspath(fastnin.__file__)))


@pytest.mark.skipif(not HAS_TRITON, reason="triton missing")
@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the Triton tests compile the kernels for real")
def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_CWD, env.get("PYTHONPATH")) if p)
    # 459 specializations: 194 s cold on 2 cores (one compile process per core; ~6 min in one), a
    # few seconds once Triton's cache (~/.triton/cache) holds them.
    out = subprocess.run(
        [sys.executable, _SCRIPT, "--arch", "90"], env=env, capture_output=True, text=True, timeout=1500, cwd=_CWD
    )
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-6000:]
    assert "0 failed" in out.stdout, report[-6000:]
