"""Entry point: ``python -m chat`` and the ``chat`` console script."""

from __future__ import annotations


def main() -> None:
    from chat.cli import run

    run()


if __name__ == "__main__":
    main()
