"""Plug-ins by import path: a job names a function as `package.module:function` or `path/to/file.py:function`.

A module path is imported as usual (it must be importable wherever the function runs: installed, on PYTHONPATH, or
shipped with the job's working directory on a cluster). A file path is loaded from that file, relative to the
directory the command runs in unless absolute, so a script next to the job needs no packaging. `load_callable` is
called when the job is loaded (so a wrong name is refused before anything starts) and again in each process that
runs the function; the loaded function is cached per process.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path


class PluginError(ValueError):
    """A plug-in spec that names nothing callable; the message says which key, which spec, and why."""


def split_spec(spec: str) -> tuple[str, str]:
    """(`module or file`, `function`) of a `where:function` spec; raises PluginError for any other shape."""
    where, sep, name = str(spec).rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise PluginError(f"{spec!r} is not of the form 'package.module:function' or 'path/to/file.py:function'")
    return where, name


def checked_spec(spec: str) -> str:
    """The spec with a file path made absolute (other processes, e.g. Ray workers, may run elsewhere), after
    checking that it loads; for the config's validators."""
    where, name = split_spec(spec)
    if where.endswith(".py"):
        spec = f"{Path(where).resolve()}:{name}"
    load_callable(spec)
    return spec


@functools.cache
def load_callable(spec: str) -> Callable:
    """The function a spec names (see the module docstring)."""
    where, name = split_spec(spec)
    if where.endswith(".py"):
        path = Path(where).resolve()
        if not path.is_file():
            raise PluginError(f"{spec!r}: no file {path}")
        module_name = f"pear_ray_plugin_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:
            del sys.modules[module_name]
            raise PluginError(f"{spec!r}: loading {path} failed: {type(error).__name__}: {error}") from error
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as error:
            raise PluginError(f"{spec!r}: cannot import {where!r} ({error}); install it, put it on PYTHONPATH, or "
                              "name a file: 'path/to/file.py:function'") from error
    function = getattr(module, name, None)
    if not callable(function):
        raise PluginError(f"{spec!r}: {where} has no function {name!r}")
    return function
