"""``python -m kubeforge_runtime.train --config FILE``: the worker entry point torchrun starts.

Exit codes are the pod contract's (``kubeforge.api.contract.ExitCode``): 0 done, 75
preempted (SIGTERM honoured, checkpoint requested), 78 configuration error (never retried),
anything else a retryable failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kubeforge.api.contract import CONFIG_FILE_NAME, CONFIG_MOUNT_DIR, ENV_CONFIG_FILE, ExitCode

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
    return int(trainer.run())


if __name__ == "__main__":
    sys.exit(main())
