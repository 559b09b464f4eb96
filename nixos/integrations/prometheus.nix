# Prometheus: the bundled alert rules, a scrape job, and the metrics port in the firewall.
{
  config,
  lib,
  ...
}:

let
  inherit (lib) mkIf mkMerge mkOption types;

  cfg = config.services.hydra-cachix-bridge;
  metrics = cfg.settings.metrics;
  share = "${cfg.package}/share/hydra-cachix-bridge";

  # A wildcard listen address is scraped on loopback; an IPv6 host needs brackets.
  scrapeHost =
    {
      "0.0.0.0" = "127.0.0.1";
      "" = "127.0.0.1";
      "::" = "::1";
    }
    .${metrics.listen_address} or metrics.listen_address;
  target =
    (if lib.hasInfix ":" scrapeHost then "[${scrapeHost}]" else scrapeHost)
    + ":${toString metrics.port}";
in
{
  _file = ./prometheus.nix;

  options.services.hydra-cachix-bridge = {
    metrics.openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the metrics port in the firewall.";
    };

    prometheus.rules = mkOption {
      type = types.bool;
      default = false;
      description = "Add the bundled alert rules and a scrape job to services.prometheus.";
    };

    prometheus.scrapeTarget = mkOption {
      type = types.str;
      readOnly = true;
      default = target;
      defaultText = lib.literalMD "`settings.metrics.listen_address:port`, bracketed for IPv6";
      description = "The host:port Prometheus scrapes.";
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = (cfg.prometheus.rules || cfg.metrics.openFirewall) -> metrics.enabled;
          message = "services.hydra-cachix-bridge: prometheus.rules and metrics.openFirewall need settings.metrics.enabled.";
        }
      ];
    }

    (mkIf cfg.metrics.openFirewall {
      networking.firewall.allowedTCPPorts = [ metrics.port ];
    })

    (mkIf cfg.prometheus.rules {
      services.prometheus.ruleFiles = [ "${share}/grafana/prometheus/hydra-cachix-bridge.rules.yaml" ];
      services.prometheus.scrapeConfigs = [
        {
          job_name = "hydra-cachix-bridge";
          static_configs = [ { targets = [ target ]; } ];
        }
      ];
    })
  ]);
}
