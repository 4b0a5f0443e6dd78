"""Build fastnin._C: the CPU kernels always, the CUDA kernels when a toolkit is found.

Environment:
  FASTNIN_CUDA=1 / 0      force / skip the CUDA sources (default: build them when torch is a
                          CUDA build and a CUDA toolkit is found)
  CUDA_HOME / CUDA_PATH   the toolkit; otherwise found from the real location of `nvcc`
  TORCH_CUDA_ARCH_LIST    GPU targets (default "8.0;9.0": A100 and H100/H200)
  MAX_JOBS                parallel compile jobs (ninja)
  DEBUG=1                 -O0 -g
  FASTNIN_SANITIZE=1      CPU kernels only, built with AddressSanitizer + UBSan (-O1 -g); import
                          with LD_PRELOAD=$(gcc -print-file-name=libasan.so) (see .ci/run)
"""

import glob
import os
import re
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"fastnin setup: {msg}", file=sys.stderr)


def _toolkit_of_nvcc(nvcc):
    """The toolkit directory of an nvcc executable, following symlinks and wrapper scripts.

    Some machines put a shell script at /usr/local/bin/nvcc that execs the real compiler
    (/usr/local/cuda-13.0/bin/nvcc); torch's own guess, dirname(dirname(which nvcc)) = /usr/local,
    then fails at link time. So: resolve links, and if the file is a script, take the absolute
    path of an nvcc it names.
    """
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        head = b""
    if head.startswith(b"#!"):
        for cand in re.findall(rb"(/[^\s\"']+/bin/nvcc)\b", head):
            cand = os.path.realpath(cand.decode())
            if cand != real and os.access(cand, os.X_OK):
                return _toolkit_of_nvcc(cand)
    home = os.path.dirname(os.path.dirname(real))
    return home if os.path.isdir(os.path.join(home, "include")) else None


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _toolkit_of_nvcc(nvcc)
        if home:
            return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def decide_cuda():
    import torch

    flag = os.environ.get("FASTNIN_CUDA", "").strip()
    cuda_home = find_cuda_home()
    if flag == "0":
        return False, cuda_home, "FASTNIN_CUDA=0"
    if flag == "1":
        if cuda_home is None:
            raise RuntimeError("FASTNIN_CUDA=1 but no CUDA toolkit found: set CUDA_HOME")
        return True, cuda_home, "FASTNIN_CUDA=1"
    if torch.version.cuda is None:
        return False, cuda_home, f"torch {torch.__version__} is not a CUDA build"
    if cuda_home is None:
        return False, None, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return True, cuda_home, f"torch CUDA {torch.version.cuda}, toolkit {cuda_home}"


def make_extensions():
    use_cuda, cuda_home, why = decide_cuda()
    sanitize = os.environ.get("FASTNIN_SANITIZE", "0") == "1"
    if sanitize and use_cuda:
        use_cuda, why = False, "FASTNIN_SANITIZE=1 builds the CPU kernels only"
    if use_cuda:
        # cpp_extension reads CUDA_HOME when it is imported: set it first.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # No -march=native: the machine that builds and the one that runs may differ. The CPU
    # kernels pick AVX2/AVX-512 at run time (target_clones); GEMMs go to MKL/oneDNN.
    cxx = opt + ["-fopenmp", "-Wall", "-Wno-unknown-pragmas",]
    link = ["-fopenmp"]
    if sanitize:
        # ---- sanitizer build (FASTNIN_SANITIZE=1), for CI's sanitizer step only ----
        # Any UB aborts (no recover). vptr is off: torch's classes cross shared libraries, whose
        # typeinfo UBSan's vptr check confuses with a type mismatch.
        san = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all",
               "-fno-omit-frame-pointer"]
        cxx = ["-O1", "-g"] + [f for f in cxx if f not in ("-O3", "-O0", "-g")] + san
        link = link + san
        _log("FASTNIN_SANITIZE=1: -fsanitize=address,undefined (CPU kernels only)")
    define_macros = [("Py_LIMITED_API", "0x030A0000")]
    include_dirs = [os.path.join(HERE, "csrc")]
    if use_cuda and cuda_sources:
        nvcc = opt + ["-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills", "--threads=2"]
        ext = CUDAExtension(
            "fastnin._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros + [("FASTNIN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
            py_limited_api=True,
        )
        _log(f"building CPU + CUDA kernels ({why}; TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}; "
             f"{len(cuda_sources)} .cu files)")
    else:
        if use_cuda:
            why += ", but csrc/cuda has no .cu file yet"
        ext = CppExtension(
            "fastnin._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
            py_limited_api=True,
        )
        _log(f"building CPU kernels only ({why})")
    return [ext], BuildExtension.with_options(use_ninja=True)


ext_modules, build_ext = make_extensions()
setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
