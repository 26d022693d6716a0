"""`python -m zili ...` (and `torchrun -m zili ...`) runs the same CLI as the `zili` script."""

from zili.cli import main

if __name__ == "__main__":
    main()
