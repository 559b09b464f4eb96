# The hydra-cachix-bridge package, built from this repository.
{
  lib,
  python3Packages,
}:

python3Packages.buildPythonApplication {
  pname = "hydra-cachix-bridge";
  # One source for the version: pyproject.toml.
  version = (lib.importTOML ../pyproject.toml).project.version;
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../README.md
      ../bridge
      ../exporter
      ../grafana
      ../contrib
    ];
  };

  build-system = [ python3Packages.setuptools ];

  dependencies = with python3Packages; [
    click
    prometheus-client
    watchdog
    # The hydra-db extra: Hydra's PostgreSQL as a source ([hydra_db]).
    psycopg
  ];

  # The test suite needs a writable Nix store and runs nix-build; run it with
  # `bash scripts/test.sh` from a checkout, or the NixOS VM test in nixos/tests/.
  doCheck = false;
  pythonImportsCheck = [
    "bridge"
    "exporter"
  ];

  postInstall = ''
    mkdir -p $out/share/hydra-cachix-bridge
    cp -r grafana contrib $out/share/hydra-cachix-bridge/
  '';

  meta = {
    description = "Push every Hydra build to Cachix or any Nix binary cache, asynchronously, with retries and Prometheus metrics";
    homepage = "https://github.com/hydra-cachix-bridge/hydra-cachix-bridge";
    license = lib.licenses.mit;
    mainProgram = "hydra-cachix-bridge";
    platforms = lib.platforms.linux;
  };
}
