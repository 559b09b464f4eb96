# Grafana: the bundled dashboard and the Grafana-managed alert rules, provisioned from the
# package. The rules name the Prometheus data source through one environment variable,
# HYDRA_CACHIX_BRIDGE_PROMETHEUS_DS_UID, which Grafana expands in provisioning files.
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

  options.services.hydra-cachix-bridge.grafana = {
    provisionDashboards = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Provision the bundled dashboard into services.grafana.";
    };

    provisionAlerts = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Provision the bundled Grafana-managed alert rules
        (services.grafana.provision.alerting.rules.path). Use either these or the
        Prometheus rules (prometheus.rules), not both, or every alert is sent twice.
      '';
    };

    prometheusDatasourceUid = lib.mkOption {
      type = lib.types.str;
      example = "P1809F7CD0C75ACF3";
      description = ''
        The uid of the Prometheus data source that scrapes the bridge: the alert rules
        query it. Set as HYDRA_CACHIX_BRIDGE_PROMETHEUS_DS_UID in grafana.service.
      '';
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      (lib.mkIf cfg.grafana.provisionDashboards {
        services.grafana.provision.dashboards.settings.providers = [
          {
            name = "hydra-cachix-bridge";
            folder = "Nix";
            options.path = "${cfg.package}/share/hydra-cachix-bridge/grafana/dashboards";
          }
        ];
      })
      (lib.mkIf cfg.grafana.provisionAlerts {
        services.grafana.provision.alerting.rules.path = "${cfg.package}/share/hydra-cachix-bridge/grafana/provisioning/alerting/hydra-cachix-bridge.yaml";
        systemd.services.grafana.environment.HYDRA_CACHIX_BRIDGE_PROMETHEUS_DS_UID =
          cfg.grafana.prometheusDatasourceUid;
      })
    ]
  );
}
