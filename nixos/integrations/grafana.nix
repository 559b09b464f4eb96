# Grafana: the bundled dashboards, provisioned from the package.
{
  config,
  lib,
  ...
}:

let
  cfg = config.services.hydra-cachix-bridge;
in
{
  _file = ./grafana.nix;

  options.services.hydra-cachix-bridge.grafana.provisionDashboards = lib.mkOption {
    type = lib.types.bool;
    default = false;
    description = "Provision the bundled dashboard into services.grafana.";
  };

  config = lib.mkIf (cfg.enable && cfg.grafana.provisionDashboards) {
    services.grafana.provision.dashboards.settings.providers = [
      {
        name = "hydra-cachix-bridge";
        folder = "Nix";
        options.path = "${cfg.package}/share/hydra-cachix-bridge/grafana/dashboards";
      }
    ];
  };
}
