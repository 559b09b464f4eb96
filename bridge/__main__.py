"""Allow `python -m bridge`."""

from bridge.entry import main

if __name__ == "__main__":
    main()
