"""`python -m lightning_clip.ablate`: the ablation runner's entry point (the runner is `lightning_clip.grid`)."""
import sys

from lightning_clip.grid.cli import main

if __name__ == "__main__":
    sys.exit(main())
