"""`python -m avdsl ...`: the same command line as the `avdsl` console script."""
from .cli import run

if __name__ == "__main__":
    run()
