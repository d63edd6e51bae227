"""The task registry: ``@register_task`` classes by name, and ``get_task`` (a registered name, or
``"module:name"`` / ``"file.py:name"``, imported first)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Iterable

from .base import Task
from .files import TaskFileNotFoundError

__all__ = ["register_task", "get_task", "list_tasks"]

_REGISTRY: dict[str, Task] = {}
_CANONICAL: dict[str, str] = {}  # key -> canonical name


def register_task(name: str | type | None = None, *, aliases: Iterable[str] = (), overwrite: bool = False):
    """Class decorator registering a :class:`Task` subclass under ``name`` (default: ``cls.name``).

    Usable bare (``@register_task``) when the class sets ``name``. Names are case-insensitive.
    Re-registering a name raises unless ``overwrite=True`` (re-importing the same module is fine).
    """
    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"register_task expects a Task subclass, got {cls!r}")
        task_name = (name if isinstance(name, str) else None) or cls.name
        if not task_name:
            raise ValueError(f"{cls.__name__}: give register_task a name or set the class attribute 'name'")
        cls.name = task_name
        instance = cls()
        keys = [task_name.lower()] + [a.lower() for a in aliases]
        for key in keys:
            old = _REGISTRY.get(key)
            if old is not None and not overwrite and type(old).__qualname__ != cls.__qualname__:
                raise ValueError(f"task name {key!r} is already registered by {type(old).__qualname__}")
        for key in keys:
            _REGISTRY[key] = instance
            _CANONICAL[key] = task_name
        return cls

    if isinstance(name, type):
        return deco(name)
    return deco


def _import_task_source(spec: str) -> None:
    """Import a module ('pkg.mod') or file ('path/to/tasks.py') so its @register_task calls run."""
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec)
        if not path.is_file():
            raise TaskFileNotFoundError(f"task file not found: {path}")
        mod_name = f"zo_deepspeed_user_tasks_{abs(hash(str(path.resolve())))}"
        if mod_name in sys.modules:
            return
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
    else:
        importlib.import_module(spec)


def get_task(name: str | Task) -> Task:
    """The registered task instance for ``name`` (case-insensitive).

    ``name`` may also be ``"module.path:task"`` or ``"path/to/file.py:task"``: the module/file is
    imported first so that its ``@register_task`` classes are registered.
    """
    if isinstance(name, Task):
        return name
    key = name.strip()
    if key.lower() not in _REGISTRY and ":" in key:
        source, _, key = key.rpartition(":")
        _import_task_source(source)
    try:
        return _REGISTRY[key.lower()]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(list_tasks())}") from None


def list_tasks() -> list[str]:
    """Canonical names of the registered tasks, sorted."""
    return sorted(set(_CANONICAL.values()))
