"""``python -m stroma``: the demo and the effect-log tools (see ``stroma.cli``)."""

from stroma.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
