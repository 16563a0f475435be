"""`python -m routerd.launch_router ARGS`: routerd with sgl-router's router flags
(`--worker-urls`, `--policy`, `--pd-disaggregation`, `--prefill URL PORT`, ...), as
`python -m sglang_router.launch_router ARGS` takes them."""

import sys

from . import run

if __name__ == "__main__":
    run("routerd", sys.argv[1:])
