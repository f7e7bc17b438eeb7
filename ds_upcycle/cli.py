"""The `ds-upcycle` console script: a dispatcher over an explicit table of ``module:function``.

Each subcommand is a plain ``main(argv) -> int`` that raises ``ValueError`` for user mistakes;
:func:`ds_upcycle.errors.run_guarded` turns those into one ``error: ...`` line and exit code 2,
here and in the rank entry point (``python -m ds_upcycle.train``) alike.
"""

from __future__ import annotations

import importlib
import sys

from ds_upcycle.errors import run_guarded

# name -> ("module:function", one-line help). Imported lazily so `--help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("ds_upcycle.plan:main", "dense -> MoE parameters, FLOPs and per-rank memory, from config.json alone"),
    "configs": ("ds_upcycle.config:configs_main", "list the shipped ds_configs, by name, with a line on each"),
    "prepare-data": ("ds_upcycle.data:prepare_main", "tokenise a run's data into packed blocks on disk, in parallel"),
    "train": ("ds_upcycle.train:main", "validate a run config and start it through the deepspeed launcher"),
    "export": ("ds_upcycle.export:export_main", "a DeepSpeed checkpoint of ours -> a standard HF Mixtral folder"),
    "upcycle": ("ds_upcycle.export:upcycle_main", "offline: dense HF checkpoint -> HF Mixtral checkpoint, streamed"),
    "eval": ("ds_upcycle.evaluate:main", "held-out perplexity of a dense model, an exported Mixtral, or a checkpoint"),
    "check": ("ds_upcycle.tools.check:main", "upcycle a model and prove its logits equal the dense model's"),
    "ablate": ("ds_upcycle.tools.ablate:main", "run several configs on the same data and seed and compare them"),
    "bench": ("ds_upcycle.tools.bench:main", "benchmarks: speed and memory, as a Markdown table and JSON"),
    "make-tiny": ("ds_upcycle.tools.tiny:main", "write a tiny Llama checkpoint and corpus for the CPU debug config"),
    "demo": ("ds_upcycle.tools.demo:main", "the main job on the embedded default"),
    "two-hosts": ("ds_upcycle.tools.two_hosts:main", "two ssh hosts on this machine (loopback) to try multi-node runs"),
}

USAGE = """usage: ds-upcycle <command> [options]

Upcycle dense Llama-family checkpoints into DeepSpeed Mixture-of-Experts models.

commands:
{commands}

Run `ds-upcycle <command> --help` for a command's options.
"""


def _usage() -> str:
    width = max(map(len, COMMANDS))
    return USAGE.format(commands="\n".join(f"  {n.ljust(width)}  {h}" for n, (_, h) in COMMANDS.items()))


def resolve(name: str):
    """The ``main(argv) -> int`` function of a subcommand."""
    module, function = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_guarded(resolve(name), rest)


if __name__ == "__main__":
    sys.exit(main())
