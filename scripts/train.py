"""Train with a recipe: `composer -n N scripts/train.py yamls/<recipe>.yaml key=value ...`
(or `python scripts/train.py ...` for one process). Everything is built in m3composer.train."""
from m3composer.train import main

if __name__ == "__main__":
    main()
