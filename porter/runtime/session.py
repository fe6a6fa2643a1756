"""ONNX Runtime sessions: which device, which providers, which options, and the optimized-model cache.

Device resolution:

* ``cpu``       the CPU provider, intra-op threads fitted to the CPUs this process may use (affinity, cgroup
                quota, one thread per physical core).
* ``cuda``      the CUDA provider (conv algorithm search and workspace tuned for convnets), CPU for the rest.
                Asked for where it can't run, it is a ``RuntimeSetupError`` naming what is missing: the GPU
                build of onnxruntime, the NVIDIA driver, a visible GPU, or the CUDA / cuDNN libraries.
* ``tensorrt``  TensorRT, then CUDA, then CPU; only when asked for (engine builds take minutes), engines and
                timing caches kept in the cache directory.
* ``openvino``  Intel's OpenVINO through its plugin execution provider for ONNX Runtime (``onnxruntime-ep-openvino``,
                ``pip install 'porter[openvino]'``), registered once with
                ``onnxruntime.register_execution_provider_library``, so the session API stays onnxruntime's; its CPU
                inference precision is set explicitly (``SessionConfig.precision``). The plugin offers Intel devices
                only: elsewhere it is a ``RuntimeSetupError`` naming the CPU's vendor.
* ``auto``      CUDA when a GPU and the CUDA provider really work (a session is created and its providers
                checked, since the GPU wheel lists CUDA as available even on machines without a GPU), else
                CPU; the choice and the reason are reported.

Graph optimization runs at level ALL once per (model, device, precision, onnxruntime version, machine); the
optimized model is saved under ``$PORTER_CACHE`` (default ``~/.cache/porter``) ``/ort`` and later sessions
load it with optimization off. Nothing here imports torch or TensorFlow.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import io
import math
import os
import platform
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..cache import cache_dir
from ..errors import RuntimeSetupError, UsageError
from ..options import DEVICES
from .openvino import OPENVINO_EP

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
GPU_WHEEL_HINT = "pip uninstall onnxruntime && pip install onnxruntime-gpu"
CUDA_LIBS_HINT = "pip install 'onnxruntime-gpu[cuda,cudnn]', or put the CUDA toolkit and cuDNN on LD_LIBRARY_PATH"


# --- what the machine can do --------------------------------------------------------------------------------------

def available_memory() -> int | None:
    """Bytes of memory the machine can give now (Linux MemAvailable, else free physical pages); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(need: int, what: str, fix: str) -> None:
    """Refuse up front what can't fit in memory (over half of what is available), instead of being OOM-killed."""
    free = available_memory()
    if free is not None and need > free // 2:
        raise UsageError(f"{what} needs {need / 2**30:.1f} GiB, more than half the {free / 2**30:.1f} GiB of memory "
                         f"available; {fix}")


@functools.lru_cache(maxsize=1)
def cpu_threads() -> int:
    """Intra-op threads for this process: usable CPUs (affinity and cgroup quota), one per physical core."""
    try:
        logical = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        logical = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota:
        logical = min(logical, quota)
    total, physical = _cpu_topology()
    if total and physical and physical < total:  # hyperthreads add little to conv/matmul kernels
        logical = max(1, logical * physical // total)
    return max(1, logical)


def _cgroup_cpu_quota() -> int | None:
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()  # cgroup v2: "max 100000" or "200000 100000"
        if text and text[0] != "max":
            return max(1, math.ceil(int(text[0]) / int(text[1])))
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v1
        q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if q > 0 and p > 0:
            return max(1, math.ceil(q / p))
    except (OSError, ValueError):
        pass
    return None


def _cpu_topology() -> tuple[int, int]:
    """(logical CPUs, physical cores) from /proc/cpuinfo, or (0, 0) where it can't be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 0, 0
    logical, cores, phys = 0, set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor":
            logical += 1
        elif key == "physical id":
            phys = value
        elif key == "core id":
            cores.add((phys, value))
    return logical, (len(cores) or logical)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``avx512_bf16``, ``amx_bf16``, ...) from /proc/cpuinfo; empty where unknown."""
    try:
        m = re.search(r"^(flags|Features)\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return frozenset()
    return frozenset(m.group(2).split()) if m else frozenset()


def _cpu_fingerprint() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^(flags|Features)\s*:(.*)$", text, re.M)
        name = re.search(r"^model name\s*:(.*)$", text, re.M)
        return hashlib.sha1(((m.group(2) if m else "") + (name.group(1) if name else "")).encode()).hexdigest()[:8]
    except OSError:
        return platform.processor() or "cpu"


def _ort():
    import onnxruntime as ort

    return ort


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


@functools.lru_cache(maxsize=1)
def cuda_problem() -> str | None:
    """None if CUDA should work here, else one sentence naming everything that is missing."""
    ort = _ort()
    if CUDA_EP not in ort.get_available_providers():
        return (f"the installed onnxruntime {ort.__version__} is the CPU-only wheel ({GPU_WHEEL_HINT})")
    problems = []
    driver = _driver_problem()
    if driver:
        problems.append(driver)
    libs = _missing_provider_libs("cuda")
    if libs:
        problems.append(f"CUDA libraries not found: {', '.join(libs)} ({CUDA_LIBS_HINT})")
    elif not _can_load("libcudnn.so.9") and not _can_load("libcudnn.so"):
        problems.append(f"cuDNN 9 (libcudnn.so.9) not found ({CUDA_LIBS_HINT})")
    return "; ".join(problems) or None


@functools.lru_cache(maxsize=1)
def tensorrt_problem() -> str | None:
    ort = _ort()
    if TRT_EP not in ort.get_available_providers():
        return f"the installed onnxruntime {ort.__version__} has no TensorRT provider ({GPU_WHEEL_HINT})"
    cuda = cuda_problem()
    if cuda:
        return cuda
    libs = _missing_provider_libs("tensorrt")
    if libs:
        return f"TensorRT libraries not found: {', '.join(libs)} (pip install tensorrt, or add TensorRT's lib directory to LD_LIBRARY_PATH)"
    return None


def _driver_problem() -> str | None:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 not found: install the driver, or run on a machine with a GPU)"
    try:
        rc = lib.cuInit(0)
        if rc == 100:  # CUDA_ERROR_NO_DEVICE
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            return "the NVIDIA driver sees no GPU" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
        if rc in (35, 803):  # CUDA_ERROR_INSUFFICIENT_DRIVER, CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
            return f"the NVIDIA driver is too old or mismatched for this CUDA (cuInit error {rc}; update the driver)"
        if rc != 0:
            return f"the NVIDIA driver is installed but failed to initialise (cuInit error {rc}; check nvidia-smi)"
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
            return f"the NVIDIA driver sees no GPU{hint}"
    except AttributeError:
        return "libcuda.so.1 is not a working NVIDIA driver library"
    return None


@functools.lru_cache(maxsize=None)
def _can_load(name: str) -> bool:
    try:
        ctypes.CDLL(name)
        return True
    except OSError:
        return False


def _preload_cuda_libs() -> None:
    """Let onnxruntime load CUDA/cuDNN from the nvidia-* pip packages, if installed. Silent."""
    ort = _ort()
    if hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
            ort.preload_dlls()


@functools.lru_cache(maxsize=None)
def _missing_provider_libs(kind: str) -> tuple[str, ...]:
    """Shared libraries the provider plugin needs and the loader can't find (libcuda.so.1 is reported apart)."""
    _preload_cuda_libs()
    capi = Path(_ort().__file__).parent / "capi"
    plugin = capi / f"libonnxruntime_providers_{kind}.so"
    if not plugin.exists():
        return (plugin.name,)
    with contextlib.suppress(OSError):
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
    try:
        ctypes.CDLL(str(plugin))
        return ()
    except OSError as e:
        first = str(e)
    try:  # name every missing library, not just the first the loader tripped on
        out = subprocess.run(["ldd", str(plugin)], capture_output=True, text=True, timeout=20).stdout
        missing = [line.split("=>")[0].strip() for line in out.splitlines() if "not found" in line]
        missing = [m for m in missing if not m.startswith("libcuda.so")]
        if missing:
            return tuple(missing)
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^:\s]+\.so[.\d]*)", first)
    name = m.group(1) if m else first
    return () if name.startswith("libcuda.so") else (name,)


def resolve_device(requested: str) -> tuple[str, str]:
    """Map ``auto|cuda|tensorrt|openvino|cpu`` to the device to try, with a note saying why (empty when asked for)."""
    if requested not in DEVICES:
        raise UsageError(f"unknown device {requested!r}; choose one of: {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu", ""
    if requested == "openvino":
        from .openvino import openvino_devices

        problem = openvino_devices()[1]
        if problem:
            raise RuntimeSetupError(f"device 'openvino' is not available: {problem}; use --device cpu")
        return "openvino", ""
    if requested == "cuda":
        problem = cuda_problem()
        if problem:
            raise RuntimeSetupError(f"device 'cuda' is not available: {problem}; use --device cpu (device='cpu') or auto")
        return "cuda", ""
    if requested == "tensorrt":
        problem = tensorrt_problem()
        if problem:
            fallback = "cpu" if cuda_problem() else "cuda or cpu"  # suggest cuda only where it would start
            raise RuntimeSetupError(f"device 'tensorrt' is not available: {problem}; use --device {fallback}")
        return "tensorrt", ""
    problem = cuda_problem()
    if problem:
        return "cpu", f"auto: running on CPU; CUDA is unavailable: {problem.split('; ')[0]}"
    return "cuda", "auto: running on CUDA"


# --- sessions -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SessionConfig:
    device: str  # cpu | cuda | tensorrt | openvino (resolved)
    fp16: bool = False  # TensorRT: builds fp16 engines (the model itself stays fp32)
    precision: str | None = None  # OpenVINO: fp32 | bf16 | int8 (a QDQ model); None: OpenVINO's own default
    threads: int | None = None  # CPU intra-op threads; None: fitted to the machine
    spin: bool = True  # let idle ORT worker threads spin (lower latency; off when other threads need the CPU)
    cache: bool = True  # save and reuse the optimized model
    cache_dir: str | None = None
    device_id: int = 0
    max_batch: int = 64  # TensorRT optimization profile: batch 1 .. max_batch
    opt_batch: int = 32
    log_level: int = 4  # ORT logging: 0 verbose .. 4 fatal (its errors reach the user as porter's own messages)


@dataclass
class SessionInfo:
    providers: list[str]
    optimized_from_cache: bool = False
    cache_path: str | None = None
    notes: list[str] = field(default_factory=list)


def providers_for(config: SessionConfig, input_profiles: dict[str, tuple[Any, ...]] | None = None) -> list:
    """The provider list (names with options) for a resolved device."""
    cuda_opts = {
        "device_id": str(config.device_id),
        "cudnn_conv_algo_search": "EXHAUSTIVE",  # convnets: pick the fastest conv kernel per shape, once
        "cudnn_conv_use_max_workspace": "1",
        "do_copy_in_default_stream": "1",
        "arena_extend_strategy": "kSameAsRequested",
    }
    if config.device == "openvino":  # added by device in session_options (ORT puts the CPU after it)
        return []
    if config.device == "cpu":
        return [CPU_EP]
    if config.device == "cuda":
        return [(CUDA_EP, cuda_opts), CPU_EP]
    trt_dir = cache_dir("tensorrt", config.cache_dir)
    trt_dir.mkdir(parents=True, exist_ok=True)
    trt_opts: dict[str, Any] = {
        "device_id": str(config.device_id),
        "trt_fp16_enable": "1" if config.fp16 else "0",
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(trt_dir),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(trt_dir),
        "trt_max_workspace_size": str(4 << 30),
    }
    shapes = _trt_profiles(input_profiles or {}, config.max_batch, config.opt_batch)
    if shapes:
        trt_opts.update(shapes)
    return [(TRT_EP, trt_opts), (CUDA_EP, cuda_opts), CPU_EP]


def _trt_profiles(inputs: dict[str, tuple[Any, ...]], max_batch: int, opt_batch: int) -> dict[str, str]:
    """Explicit min/opt/max shapes so one engine covers batch 1..max_batch (else TRT rebuilds per shape)."""
    mins, opts, maxs = [], [], []
    for name, shape in inputs.items():
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            return {}  # other dynamic dims: let TensorRT build per shape
        rest = "x".join(str(d) for d in shape[1:])
        fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        lo, mid, hi = (fixed, fixed, fixed) if fixed else (1, min(opt_batch, max_batch), max_batch)
        mins.append(f"{name}:{lo}x{rest}")
        opts.append(f"{name}:{mid}x{rest}")
        maxs.append(f"{name}:{hi}x{rest}")
    if not mins:
        return {}
    return {"trt_profile_min_shapes": ",".join(mins), "trt_profile_opt_shapes": ",".join(opts),
            "trt_profile_max_shapes": ",".join(maxs)}


def session_options(config: SessionConfig, optimize: bool = True):
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = config.log_level
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    so.intra_op_num_threads = config.threads or (cpu_threads() if config.device in ("cpu", "openvino") else 1)
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spin else "0")
    if config.device == "cpu":
        so.add_session_config_entry("session.set_denormal_as_zero", "1")
    if config.device == "openvino":
        from .openvino import add_openvino

        add_openvino(so, config)
    return so


def cache_key(model_bytes: bytes, config: SessionConfig, variant: str = "") -> str:
    ort = _ort()
    h = hashlib.sha256(model_bytes).hexdigest()[:20]
    machine = _cpu_fingerprint() if config.device == "cpu" else f"gpu{config.device_id}"
    return f"{h}-{config.device}{variant}-ort{ort.__version__}-{platform.machine()}-{machine}"


def create_session(model: bytes | str, config: SessionConfig, *, variant: str = "",
                   input_profiles: dict[str, tuple[Any, ...]] | None = None,
                   transform: Callable[[], bytes] | None = None):
    """An InferenceSession for ``model`` (serialized bytes, or a path for external-data models) on
    ``config.device``, through the optimized-model cache.

    ``variant`` and ``transform`` describe a derived model (e.g. "-fp16" and the fp16 conversion): the cache
    is keyed on the original bytes plus the variant, so a cache hit skips the transform too.
    Returns ``(session, SessionInfo)``. Raises RuntimeSetupError if the requested GPU provider did not
    start (onnxruntime would silently fall back to CPU).
    """
    ort = _ort()
    providers = providers_for(config, input_profiles)
    info = SessionInfo(providers=[])
    cached: Path | None = None
    if config.cache and isinstance(model, bytes) and config.device not in ("tensorrt", "openvino"):
        # TensorRT and OpenVINO cache their compiled graphs instead (those can't be saved as ONNX)
        cached = cache_dir("ort", config.cache_dir) / f"{cache_key(model, config, variant)}.onnx"
    session = None
    if cached is not None and cached.is_file():
        try:
            session = ort.InferenceSession(str(cached), sess_options=session_options(config, optimize=False),
                                           providers=providers)
            info.optimized_from_cache, info.cache_path = True, str(cached)
        except Exception:  # noqa: BLE001 - a stale or corrupt cache entry: rebuild it
            with contextlib.suppress(OSError):
                cached.unlink()
            session = None
    if session is None:
        source = transform() if transform is not None else model
        so = session_options(config)
        tmp = None
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".opt-", suffix=".onnx", dir=cached.parent)
                os.close(fd)
                so.optimized_model_filepath = tmp
            except OSError as e:
                info.notes.append(f"optimized-model cache not writable ({e.strerror}); optimizing on every load")
                tmp = None
        try:
            session = _new_session(source, so, providers)
            if tmp and Path(tmp).is_file() and Path(tmp).stat().st_size > 0:
                os.replace(tmp, cached)
                info.cache_path = str(cached)
        finally:
            if tmp and Path(tmp).exists():
                with contextlib.suppress(OSError):
                    Path(tmp).unlink()
    info.providers = list(session.get_providers())
    want = {"cuda": CUDA_EP, "tensorrt": TRT_EP, "openvino": OPENVINO_EP}.get(config.device)
    if want and want not in info.providers:
        raise RuntimeSetupError(f"onnxruntime could not start {want} for this model (it fell back to "
                                f"{', '.join(info.providers)}); check the GPU drivers and CUDA libraries, or use --device cpu")
    return session, info


def _new_session(model: bytes | str, so, providers):
    ort = _ort()
    try:
        return ort.InferenceSession(model, sess_options=so, providers=providers or None)
    except Exception as e:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph/NotImplemented types
        msg = " ".join(str(e).split())
        if "NOT_IMPLEMENTED" in msg or "Could not find an implementation" in msg:
            raise RuntimeSetupError(f"onnxruntime has no kernel for part of this model on "
                                    f"{', '.join(p if isinstance(p, str) else p[0] for p in providers)}: {msg[:300]}") from None
        raise RuntimeSetupError(f"onnxruntime could not load the model: {msg[:400]}") from None


def describe_providers(providers: Sequence[str]) -> str:
    short = {CPU_EP: "CPU", CUDA_EP: "CUDA", TRT_EP: "TensorRT", OPENVINO_EP: "OpenVINO"}
    return " > ".join(short.get(p, p) for p in providers)
