"""Who runs a case: each fastnin backend present, torch eager in NCHW and in channels_last, and
torch.compile (mode "default" on the CPU, "max-autotune" on the GPU).

The torch providers run the plain torch composition that fastnin replaces (fastnin/reference.py:
conv2d + bias + ReLU per stage, F.local_response_norm, adaptive_avg_pool2d), and a model through
fastnin's "torch" backend, which runs exactly those compositions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Provider:
    name: str  # "fastnin-cpu", "fastnin-cpu-cl", "fastnin-cuda", "fastnin-triton", "eager", "eager-cl", "compile"
    kind: str  # "fastnin" | "eager" | "compile"
    backend: str = "torch"  # the fastnin backend in force while it runs
    channels_last: bool = False
    compile_mode: str | None = None

    @property
    def is_fastnin(self) -> bool:
        return self.kind == "fastnin"

    def context(self):
        """The fastnin backend in force for this provider (torch providers: the plain composition)."""
        import fastnin

        return fastnin.use_backend(self.backend)

    def describe(self) -> str:
        if self.kind == "fastnin":
            layout = "channels_last input and weights (models: model.to(channels_last))" if self.channels_last else "NCHW input"
            return f"fastnin backend {self.backend!r}, {layout}"
        if self.kind == "eager":
            return "torch eager, " + ("channels_last" if self.channels_last else "NCHW")
        return f"torch.compile(mode={self.compile_mode!r}) of the eager composition, NCHW"


EAGER = Provider("eager", "eager")
EAGER_CL = Provider("eager-cl", "eager", channels_last=True)


def compile_provider(device: str) -> Provider:
    mode = "max-autotune" if torch.device(device).type == "cuda" else "default"
    return Provider("compile", "compile", compile_mode=mode)


def fastnin_backends(device: str, include_interpreter: bool = False) -> list[str]:
    """The fastnin backends that can serve tensors on `device` here ("torch" left out: it is the
    eager provider). The Triton interpreter (TRITON_INTERPRET=1 on the CPU) is a correctness tool
    thousands of times slower than a kernel: offered only when asked for."""
    import fastnin

    avail = fastnin.available_backends()
    dev = torch.device(device).type
    if dev == "cuda":
        return [b for b in ("cuda", "triton") if b in avail]
    if dev == "cpu":
        out = ["cpu"] if "cpu" in avail else []
        if include_interpreter and "triton" in avail:
            out.append("triton")
        return out
    return []


def all_providers(device: str, with_compile: bool, include_interpreter: bool = False) -> list[Provider]:
    provs = [Provider(f"fastnin-{b}", "fastnin", backend=b) for b in fastnin_backends(device, include_interpreter)]
    # The CPU kernels work in NHWC: fed NCHW they convert the input and the output, and a model's
    # pools and other torch layers between them run NCHW too. So the CPU backend is also timed
    # in channels_last, the layout torch's own CPU convolutions prefer (eager-cl): each side in
    # each layout, labelled, and every speedup stays against eager's faster layout.
    if "cpu" in [p.backend for p in provs]:
        provs.append(Provider("fastnin-cpu-cl", "fastnin", backend="cpu", channels_last=True))
    provs += [EAGER, EAGER_CL]
    if with_compile:
        provs.append(compile_provider(device))
    return provs


def select(providers: list[Provider], names: list[str] | None) -> list[Provider]:
    """Keep the providers named (exact names, or "fastnin" for every fastnin backend)."""
    if not names:
        return providers
    known = {p.name for p in providers} | {"fastnin"}
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"--providers: unknown or unavailable {bad}; available: {sorted(known)}")
    return [p for p in providers if p.name in names or ("fastnin" in names and p.is_fastnin)]
