"""`python -m cribo ...` (and `torchrun -m cribo train ...`) entry point."""

from cribo.cli import main

if __name__ == "__main__":
    main()
