"""A registry that imports in the supervisor but fails in any other process
(as a module with an environment-dependent import can): spawned children
cannot load it, and the worker must refuse to start with that reason."""

import os

from stem import TaskRegistry

if os.environ.get("STEM_TEST_REGISTRY_PID") != str(os.getpid()):
    raise ImportError("this registry only imports in its supervisor (broken on purpose in children)")

registry = TaskRegistry()
registry.task("parent_only.noop")(lambda ctx: None)
