"""`python -m pipcook_sandbox ...` is the `pipcook-sandbox` command."""
from pipcook_sandbox.runner.cli import entry

if __name__ == "__main__":
    entry()
