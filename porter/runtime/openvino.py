"""OpenVINO as a device of porter's one session API: Intel's plugin execution provider for ONNX Runtime
(``onnxruntime-ep-openvino``, the ``porter[openvino]`` extra), registered once with
``onnxruntime.register_execution_provider_library`` and added to a session by device
(``SessionOptions.add_provider_for_devices``), its CPU inference precision set explicitly. The plugin offers Intel
CPUs, GPUs and NPUs only: elsewhere ``openvino_devices`` says so, naming the CPU's vendor.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

from ..cache import cache_dir
from ..errors import RuntimeSetupError

OPENVINO_EP = "OpenVINOExecutionProvider"
OPENVINO_HINT = "pip install 'porter[openvino]', which installs the onnxruntime-ep-openvino plugin"
# OpenVINO CPU inference precision hints (load_config), by porter's precision name; None: OpenVINO's own default
OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32", None: None}


def _ort():
    import onnxruntime as ort

    return ort


@functools.lru_cache(maxsize=1)
def openvino_devices() -> tuple[tuple[Any, ...], str | None]:
    """(the OpenVINO plugin's CPU devices, None), or ((), one sentence saying why there are none)."""
    try:
        import onnxruntime_ep_openvino as plugin
    except ImportError:
        return (), f"the OpenVINO plugin is not installed ({OPENVINO_HINT})"
    ort = _ort()
    if not hasattr(ort, "register_execution_provider_library"):
        return (), f"onnxruntime {ort.__version__} can't load plugin execution providers (1.23 or newer can)"
    name = plugin.get_ep_name()
    try:
        ort.register_execution_provider_library(name, plugin.get_library_path())
    except Exception as e:  # noqa: BLE001 - ORT raises its own types; registered twice is fine
        if "already" not in str(e).lower():
            return (), f"the OpenVINO plugin did not load: {' '.join(str(e).split())[:200]}"
    cpus = [d for d in ort.get_ep_devices() if d.device.type == ort.OrtHardwareDeviceType.CPU]
    devices = tuple(d for d in cpus if d.ep_name == name)
    if not devices:
        vendor = next((d.device.vendor for d in cpus if d.device.vendor), "unknown")
        return (), (f"the OpenVINO plugin offers no device on this machine (it runs on Intel CPUs, GPUs and NPUs; "
                    f"this CPU's vendor is {vendor})")
    return devices, None


def add_openvino(so, config) -> None:
    """The OpenVINO plugin on the CPU, its inference precision set (a hint in ``load_config``), its compiled-model
    cache in porter's cache directory."""
    import json

    from .session import cpu_threads

    devices, problem = openvino_devices()
    if problem:
        raise RuntimeSetupError(f"device 'openvino' is not available: {problem}; use --device cpu")
    options = {"device_type": "CPU", "num_of_threads": str(config.threads or cpu_threads())}
    hint = OPENVINO_PRECISION.get(config.precision)
    if hint:
        options["load_config"] = json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": hint}})
    if config.cache:
        folder = cache_dir("openvino", config.cache_dir)
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
            options["cache_dir"] = str(folder)
    so.add_provider_for_devices(list(devices), options)
