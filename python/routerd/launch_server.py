"""`python -m routerd.launch_server ARGS`: SGLang workers plus routerd in front of them, as
`python -m sglang_router.launch_server` starts them. It runs `routerctl launch --with-router`:

- `--model-path`, `--dp-size` (workers, default 1), `--tp-size` (GPUs per worker), `--host`
  and `--port` (the router's address; workers listen on the next ports up) are understood;
- `--router-X V` flags go to routerd as `--X V` (`--router-policy cache_aware`);
- `--engine sim` runs simulated workers (no GPU); the default is `sglang`;
- every other flag goes to each worker's `python -m sglang.launch_server`.
"""

import sys

from . import run

# SGLang flags this launcher maps onto `routerctl launch` (each takes a value).
_MAPPED = {
    "--model-path": "--model-path",
    "--dp-size": "--dp-size",
    "--dp": "--dp-size",
    "--tp-size": "--gpus-per-worker",
    "--tp": "--gpus-per-worker",
    "--engine": "--engine",
}


def plan(argv):
    """The `routerctl` arguments for `python -m routerd.launch_server argv`."""
    launch = {"--dp-size": "1"}
    host, port = "127.0.0.1", 30000
    router, engine = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")

        def value():
            nonlocal i
            if eq:
                return inline
            i += 1
            if i >= len(argv):
                sys.exit(f"launch_server: {name} needs a value")
            return argv[i]

        if name in _MAPPED:
            launch[_MAPPED[name]] = value()
        elif name == "--host":
            host = value()
        elif name == "--port":
            port = int(value())
        elif name.startswith("--router-"):
            flag = "--" + name[len("--router-"):]
            router.append(f"--router-arg={flag}")
            # A router flag's value, when it has one: the next word unless it is a flag.
            if eq:
                router.append(f"--router-arg={inline}")
            else:
                while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    i += 1
                    router.append(f"--router-arg={argv[i]}")
        else:
            engine.append(arg)
        i += 1
    args = ["launch", "--with-router", "--router-host", host, "--router-port", str(port),
            "--host", host,
            "--base-port", str(port + 1)]
    for flag, v in launch.items():
        args += [flag, v]
    args += router
    if engine:
        args += ["--", *engine]
    return args


if __name__ == "__main__":
    run("routerctl", plan(sys.argv[1:]))
