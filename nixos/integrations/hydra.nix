# Hydra RunCommand: a <runcommand> block that records every finished build.
# nixpkgs' Hydra module is services.hydra; Hydra's own flake module is services.hydra-dev.
# Both have `extraConfig` (lines of hydra.conf); the block goes to the one in use.
{
  config,
  lib,
  options,
  ...
}:

let
  inherit (lib) mkIf mkOption types;

  cfg = config.services.hydra-cachix-bridge;
  hydraModules = [
    "hydra"
    "hydra-dev"
  ];
  declared = name: options.services ? ${name};
  enabled = name: declared name && config.services.${name}.enable;

  runcommand = ''
    <runcommand>
      job = ${cfg.hydra.jobs}
      command = ${lib.getExe cfg.package} enqueue-hydra --config ${cfg.configFile}
    </runcommand>
  '';
in
{
  _file = ./hydra.nix;

  options.services.hydra-cachix-bridge.hydra = {
    enable = lib.mkEnableOption "a Hydra <runcommand> that records every finished build";

    jobs = mkOption {
      type = types.str;
      default = "*:*:*";
      description = "Hydra job pattern (project:jobset:job) of the <runcommand> block.";
    };

    module = mkOption {
      type = types.enum hydraModules;
      default = if enabled "hydra-dev" then "hydra-dev" else "hydra";
      defaultText = lib.literalMD ''`"hydra-dev"` when `services.hydra-dev.enable` is set, else `"hydra"`'';
      description = ''
        Which Hydra module gets the <runcommand>: `hydra` (nixpkgs, `services.hydra`) or
        `hydra-dev` (Hydra's own flake module, `services.hydra-dev`). That module must be
        enabled.
      '';
    };
  };

  config = mkIf (cfg.enable && cfg.hydra.enable) {
    assertions = [
      {
        assertion = enabled cfg.hydra.module;
        message = ''
          services.hydra-cachix-bridge.hydra.enable adds a <runcommand> to
          services.${cfg.hydra.module}.extraConfig, but services.${cfg.hydra.module} is not
          enabled. Enable Hydra (nixpkgs: services.hydra; Hydra's flake module:
          services.hydra-dev) or set services.hydra-cachix-bridge.hydra.module.
        '';
      }
    ];

    # RunCommand runs as hydra-queue-runner, a user Hydra's module defines: only add it to
    # the producers' group (no other Hydra user joins it).
    users.users = mkIf (cfg.group != "hydra" && enabled cfg.hydra.module) {
      hydra-queue-runner.extraGroups = [ cfg.group ];
    };

    # Only a declared option may be defined (the other module may not be imported).
    services = lib.genAttrs (lib.filter declared hydraModules) (name: {
      extraConfig = mkIf (cfg.hydra.module == name) runcommand;
    });
  };
}
