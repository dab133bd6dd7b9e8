"""``python -m batchnorm COMMAND ...``: the same as the installed ``batchnorm`` command (exit status included)."""

from .cli import main

if __name__ == "__main__":
    main()
