"""Train with a recipe: `composer -n N scripts/train.py yamls/<recipe>.yaml key=value ...`
(or `python scripts/train.py ...` for one process). Everything is built in m3composer.train."""
from m3composer.checkpoints import CheckpointError
from m3composer.config import ConfigError
from m3composer.train import main

if __name__ == "__main__":
    try:
        main()
    # a bad recipe (or a missing optional package), a refused checkpoint: one line, not a traceback
    except (ConfigError, CheckpointError) as err:
        raise SystemExit(f"scripts/train.py: error: {err}")
