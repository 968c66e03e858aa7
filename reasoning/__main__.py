"""`python -m reasoning ...` (also `accelerate launch -m reasoning ...`)."""

from reasoning.cli import app

if __name__ == "__main__":
    app()
