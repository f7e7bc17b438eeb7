"""`ds-upcycle demo`: the main job on the embedded default.

Current scope: upcycle a tiny local Llama online on 2 CPU ranks (ep 2) through the real
`deepspeed` launcher and prove the step-0 parity.
"""

from __future__ import annotations

import argparse
import sys

from ds_upcycle.launch import launcher_cmd, run_launcher


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ds-upcycle demo",
        description="Run the main job on the embedded default: upcycle a tiny local Llama to 8 experts "
        "top-2 on 2 CPU ranks (ep 2) through the deepspeed launcher and check step-0 parity.",
    )
    p.add_argument("--nprocs", type=int, default=2, help="ranks to launch (default 2)")
    args = p.parse_args(argv)
    cmd = launcher_cmd("ds_upcycle.parity", ["--ep-size", str(args.nprocs)], num_gpus=args.nprocs)
    return run_launcher(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
