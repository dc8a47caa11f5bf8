"""``python -m kubeforge_runtime.train --config FILE``: the worker entry point torchrun starts.

Exit codes are the pod contract's (``kubeforge.api.contract.ExitCode``): 0 done, 75
preempted (SIGTERM honoured, checkpoint requested), 78 configuration error (never retried),
79 ``spec.resumeFrom`` names no loadable checkpoint (never retried), anything else a
retryable failure. torchrun reports every worker failure as 1, so a worker that ends with
78 or 79 also writes it to the launcher's ``KUBEFORGE_FATAL_FILE``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from kubeforge.api.contract import CONFIG_FILE_NAME, CONFIG_MOUNT_DIR, ENV_CONFIG_FILE, ENV_FATAL_FILE, ExitCode
from kubeforge.store import ResumeSourceError

from kubeforge_runtime.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kubeforge_runtime.train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.environ.get(ENV_CONFIG_FILE, f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}"),
                    help=f"trainer config YAML (default: ${ENV_CONFIG_FILE} or the mounted ConfigMap)")
    args = ap.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config)
        from kubeforge_runtime.train.loop import Trainer  # torch is imported only for a valid config

        trainer = Trainer(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        # ValueError here comes from checks of inputs the config names (paths, tokenizer, shapes)
        print(f"kubeforge: configuration error: {e}", file=sys.stderr, flush=True)
        return int(ExitCode.CONFIG_ERROR)
    try:
        return int(trainer.run())
    except ResumeSourceError as e:
        return fatal(ExitCode.RESUME_SOURCE_INVALID, f"kubeforge: cannot resume: {e}")


def fatal(code: ExitCode, message: str) -> int:
    """Print ``message`` and leave it with ``code`` where the launcher finds it (torchrun turns
    the code into 1)."""
    print(message, file=sys.stderr, flush=True)
    where = os.environ.get(ENV_FATAL_FILE)
    if where:
        tmp = Path(f"{where}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"code": int(code), "message": message}))
        tmp.replace(where)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
