"""The service layer's structure: subsystems built by composition (no mixins, no attribute stubs for another
module's class) and each serving its verbs through one table."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import daemon.service
from daemon.service.ftrace import FtraceSubsystem
from daemon.service.kernel import KernelVerbs
from daemon.service.kprobes import KprobeSubsystem, RetprobeSubsystem
from daemon.service.livepatch import LivepatchSubsystem
from schemas import VERBS

ROOT = Path(daemon.service.__file__).parent


def service_modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages([str(ROOT)], prefix="daemon.service.")]


def test_no_module_of_the_service_declares_attributes_for_another() -> None:
    """A ``TYPE_CHECKING`` block in the service is how a mixin declared what another part set: none is left."""
    offenders = [str(path.relative_to(ROOT)) for path in sorted(ROOT.rglob("*.py"))
                 if "TYPE_CHECKING" in path.read_text()]
    assert offenders == []


def test_no_service_class_is_a_mixin_of_another() -> None:
    """Besides exceptions (a refusal's code is inherited), no class of the service inherits from another one."""
    mixed = []
    for name in service_modules():
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != name or issubclass(cls, BaseException):
                continue
            for base in cls.__mro__[1:]:
                if base.__module__.startswith("daemon.service"):
                    mixed.append(f"{name}.{cls_name}({base.__module__}.{base.__name__})")
    assert mixed == []


def test_each_subsystem_serves_its_verbs_through_one_table() -> None:
    """Every subsystem names its verbs in ``verbs()``; together they are the catalog, each verb once."""
    subsystems = (KernelVerbs, FtraceSubsystem, LivepatchSubsystem, KprobeSubsystem, RetprobeSubsystem)
    source = {cls: inspect.getsource(cls.verbs) for cls in subsystems}
    served = [verb for verb in VERBS if any(f'"{verb}"' in text for text in source.values())]
    assert sorted(served) == sorted(VERBS)
    for verb in VERBS:
        assert sum(f'"{verb}"' in text for text in source.values()) == 1, verb
