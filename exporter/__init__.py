"""Prometheus side of hydra-cachix-bridge: metric definitions and HTTP exposition."""
