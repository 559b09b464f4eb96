"""hydra-cachix-bridge: push Hydra builds to Nix binary caches without slowing Hydra down."""

__version__ = "0.1.0"
