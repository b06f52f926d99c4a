"""Dynamo's marks on library functions, applied when Dynamo is imported, not before.

``torch.compiler.nonstrict_trace`` imports ``torch._dynamo``, which takes longer than
``import torch`` itself (5.9-8.5 s against 4.9-7.1 s on a 2-core AMD EPYC VM, torch 2.15):
applied at import, it made ``import label_relaxation`` cost about twice what ``import torch``
does, for users who never compile. Dynamo resolves a function's globals when it traces, and
``torch.compile`` imports ``torch._dynamo`` before it traces anything, so a mark applied right
after that import is in place for every trace.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch

_DYNAMO = "torch._dynamo"


def nonstrict_trace_on_import(namespace: dict[str, Any], name: str) -> None:
    """Replace ``namespace[name]`` by its ``torch.compiler.nonstrict_trace`` once Dynamo loads.

    Args:
        namespace: A module's globals, where callers look the function up by ``name``.
        name: The function's name in ``namespace``.
    """
    function = namespace[name]

    def mark() -> None:
        namespace[name] = torch.compiler.nonstrict_trace(function)

    _run_after_dynamo_import(mark)


def _run_after_dynamo_import(callback: Callable[[], None]) -> None:
    """Call ``callback`` now if ``torch._dynamo`` is loaded, else right after it loads."""
    if _DYNAMO in sys.modules:
        callback()
        return
    for finder in sys.meta_path:
        if isinstance(finder, _DynamoImportHook):
            finder.callbacks.append(callback)
            return
    sys.meta_path.insert(0, _DynamoImportHook([callback]))


class _DynamoImportHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: hands ``torch._dynamo``'s spec a loader that runs the callbacks."""

    def __init__(self, callbacks: list[Callable[[], None]]) -> None:
        self.callbacks = callbacks

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        """Locate ``torch._dynamo`` with the other finders and wrap its loader; ``None`` else."""
        if fullname != _DYNAMO:
            return None
        # Out of the way first: one import needs it, and the other finders must not meet it.
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _LoaderThenCallbacks(spec.loader, self.callbacks)
                return spec
        return None


class _LoaderThenCallbacks(importlib.abc.Loader):
    """Delegates to ``loader``, and runs the callbacks once the module's body has run."""

    def __init__(self, loader: importlib.abc.Loader, callbacks: list[Callable[[], None]]):
        self._loader = loader
        self._callbacks = callbacks

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        """The wrapped loader's module."""
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        """Run the module's body, then the callbacks."""
        self._loader.exec_module(module)
        for callback in self._callbacks:
            callback()

    def __getattr__(self, name: str) -> Any:
        # get_source, get_resource_reader, is_package... as the wrapped loader has them.
        return getattr(self._loader, name)
