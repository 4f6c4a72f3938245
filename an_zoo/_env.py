"""The hardware and software a measurement ran on, described the same way everywhere numbers are recorded
(export matrix, benchmarks, validation results)."""
import importlib.metadata
import os
import platform
from typing import Any, Dict, Optional

import torch

__all__ = ['cpu_name', 'device_name', 'package_version', 'describe_environment']


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name where there is one)."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            name = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '')
    except OSError:
        name = ''
    return name or platform.processor() or platform.machine() or 'unknown'


def device_name(device: Optional[torch.device] = None) -> str:
    """A one-line hardware description of ``device`` (default: the CPU), e.g. ``'AMD EPYC 7B13 (CPU, 2 threads)'``."""
    device = torch.device(device or 'cpu')
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    if device.type == 'mps':
        return 'Apple MPS'
    return f'{cpu_name()} (CPU, {torch.get_num_threads()} threads)'


def package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_environment(*packages: str) -> Dict[str, Any]:
    """Versions (python, torch, timm, an_zoo and ``packages``) and the machine, as recorded next to measured numbers."""
    import timm
    env: Dict[str, Any] = {'python': platform.python_version(), 'torch': torch.__version__, 'timm': timm.__version__,
                           'an_zoo': package_version('an_zoo')}
    env.update({name: package_version(name) for name in packages})
    env['machine'] = f'{platform.system()} {platform.machine()}, {cpu_name()}, {os.cpu_count()} CPU threads'
    env['gpu'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return env
