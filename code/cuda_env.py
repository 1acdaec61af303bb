"""Does this torch build fit this machine's NVIDIA driver and GPUs? One message when it does not.

The default torch wheel on Linux is a CUDA 13 build: it needs driver 580 or newer and dropped the
V100 (compute capability 7.0). On an older driver torch sees no GPU and a training script with
`--device auto` would quietly train on the CPU, for days. `cuda_setup_problem()` compares what
`nvidia-smi` lists with what torch sees, and names the driver, the build and the pip command.

    python code/cuda_env.py      # the driver, the CUDA build and each GPU's compute capability
"""
import argparse
import re
import shutil
import subprocess
from typing import List, NamedTuple, Optional

import torch

from cli import HelpFormatter

WHEEL_INDEX = "https://download.pytorch.org/whl"
# the oldest Linux driver each CUDA major version runs on (NVIDIA's CUDA toolkit release notes)
MIN_DRIVER = {13: 580, 12: 525, 11: 450}


class Gpu(NamedTuple):
    name: str
    driver: str
    capability: Optional[str]  # "9.0"; None where nvidia-smi is too old to report it


def nvidia_smi_gpus(timeout: float = 10.0) -> List[Gpu]:
    """The GPUs the driver lists; [] without nvidia-smi or when it fails (no driver loaded)."""
    if shutil.which("nvidia-smi") is None:
        return []
    for fields in ("name,driver_version,compute_cap", "name,driver_version"):  # compute_cap: driver >= 510
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            return []
        if out.returncode == 0:
            rows = [[part.strip() for part in line.split(",")] for line in out.stdout.splitlines() if line.strip()]
            return [Gpu(row[0], row[1], row[2] if len(row) > 2 else None) for row in rows if len(row) >= 2]
    return []


def driver_cuda_major(driver: str) -> Optional[int]:
    """The newest CUDA major version a driver runs ("550.54" -> 12)."""
    match = re.match(r"(\d+)", driver)
    if not match:
        return None
    major = int(match.group(1))
    return next((cuda for cuda, oldest in sorted(MIN_DRIVER.items(), reverse=True) if major >= oldest), None)


def suggested_build(gpus: List[Gpu]) -> str:
    """The wheel index that fits the driver and the GPUs: cu130 where it can, else cu126."""
    driver_ok = all((driver_cuda_major(g.driver) or 0) >= 13 for g in gpus)
    volta = any(g.capability is not None and float(g.capability) < 7.5 for g in gpus)
    return "cu130" if driver_ok and not volta else "cu126"


def install_command(build: str) -> str:
    # uninstall first: pip keeps an installed torch that satisfies "torch", whatever its CUDA build
    return f"pip uninstall -y torch && pip install torch --index-url {WHEEL_INDEX}/{build}"


def describe(gpus: List[Gpu]) -> str:
    names = sorted({g.name + (f" (compute capability {g.capability})" if g.capability else "") for g in gpus})
    return f"{len(gpus)} GPU(s): {', '.join(names)}; driver {gpus[0].driver}"


def torch_build() -> str:
    return f"torch {torch.__version__} " + (f"built for CUDA {torch.version.cuda}" if torch.version.cuda
                                              else "(a CPU-only build)")


def cuda_setup_problem(gpus: Optional[List[Gpu]] = None) -> Optional[str]:
    """Why torch cannot use the GPUs nvidia-smi lists, with the fix; None when it can (or there are none)."""
    if torch.cuda.is_available():
        return unsupported_gpu_problem()
    gpus = nvidia_smi_gpus() if gpus is None else gpus
    if not gpus:
        return None
    build = suggested_build(gpus)
    head = f"nvidia-smi lists {describe(gpus)}, but {torch_build()} sees no GPU"
    if torch.version.cuda is None:
        why = "install a CUDA build"
    else:
        driver_cuda = driver_cuda_major(gpus[0].driver)
        built = int(torch.version.cuda.split(".")[0])
        if driver_cuda is not None and built > driver_cuda:
            why = (f"a CUDA {built} build needs driver >= {MIN_DRIVER[built]}; update the driver, or install a "
                   f"build this driver runs")
        else:
            why = "check CUDA_VISIBLE_DEVICES and that the driver works (nvidia-smi), or reinstall torch"
    return f"{head}: {why}: {install_command(build)} (--device cpu trains on the CPU anyway)"


def unsupported_gpu_problem() -> Optional[str]:
    """A GPU this build has no kernels for (a V100 under a CUDA 13 build): it is visible, then fails."""
    archs = torch.cuda.get_arch_list()
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        if archs and not gpu_has_kernels(major, minor, archs):
            name = torch.cuda.get_device_name(index)
            return (f"{name} (compute capability {major}.{minor}) has no kernels in {torch_build()} "
                    f"(it has {' '.join(archs)}): {install_command('cu126')}")
    return None


def gpu_has_kernels(major: int, minor: int, archs: List[str]) -> bool:
    """sm_XY runs on X.Y and newer minors of major X; compute_XY (PTX) is compiled for any newer GPU."""
    for arch in archs:
        kind, _, number = arch.partition("_")
        digits = re.match(r"(\d+?)(\d)[a-z]?$", number)
        if not digits:
            continue
        arch_major, arch_minor = int(digits.group(1)), int(digits.group(2))
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return True
        if kind == "compute" and (arch_major, arch_minor) <= (major, minor):
            return True
    return False


def main(argv=None):
    argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter).parse_args(argv)
    gpus = nvidia_smi_gpus()
    print(torch_build())
    print(f"nvidia-smi: {describe(gpus)}" if gpus else "nvidia-smi: no GPU listed")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            print(f"cuda:{index} {torch.cuda.get_device_name(index)}, compute capability {major}.{minor}")
        print(f"kernels for: {' '.join(torch.cuda.get_arch_list())}")
    problem = cuda_setup_problem(gpus)
    if problem:
        print(f"problem: {problem}")
    else:
        print("torch can use every GPU listed" if gpus or torch.cuda.is_available() else "no NVIDIA GPU: training runs on the CPU")
    return 1 if problem else 0


if __name__ == "__main__":
    raise SystemExit(main())
