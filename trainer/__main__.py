"""`python -m trainer ...` runs the same Hydra app as the `plait` console script."""

from trainer.cli import main

main()
