"""hydra-cachix-bridge: push Hydra builds to Nix binary caches without slowing Hydra down."""

from __future__ import annotations

DISTRIBUTION = "hydra-cachix-bridge"


def __getattr__(name: str) -> str:
    """`bridge.__version__`, computed on first use (the producers' fast path never needs it)."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = package_version()
    globals()["__version__"] = value
    return value


def package_version() -> str:
    """The version in pyproject.toml, its one source: read from the file in a checkout, else
    from the installed distribution's metadata (which the build copied from it)."""
    import tomllib
    from importlib import metadata
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    except (OSError, ValueError):
        project = {}
    if project.get("name") == DISTRIBUTION and isinstance(project.get("version"), str):
        return str(project["version"])
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"
