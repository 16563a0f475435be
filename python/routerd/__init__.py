"""routerd for Python users: the `routerd` and `routerctl` executables ship in this wheel;
`python -m routerd.launch_router` and `python -m routerd.launch_server` start them the way
`sglang_router.launch_router` and `sglang_router.launch_server` are started. Python stays out
of the request path: each launcher replaces itself with the executable (os.execv), so exit
codes and signals are routerd's own."""

import os
import shutil
import sys
import sysconfig

__all__ = ["executable", "run"]


def executable(name):
    """The path of `name` (routerd or routerctl) installed with this package, else on PATH."""
    here = os.path.join(sysconfig.get_path("scripts"), name)
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    found = shutil.which(name)
    if found is None:
        sys.exit(f"routerd: the {name} executable is not installed (pip install routerd)")
    return found


def run(name, args):
    """Replaces this process with `name args` (never returns)."""
    path = executable(name)
    os.execv(path, [name, *args])
