# Nix post-build-hook: the generated sh hook that drops an event into the spool.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.hydra-cachix-bridge;

  hook =
    pkgs.runCommand "hydra-cachix-bridge-post-build-hook" { nativeBuildInputs = [ cfg.package ]; }
      ''
        hydra-cachix-bridge hook-script --config ${cfg.configFile} \
          --tools-path ${
            lib.makeBinPath [
              pkgs.coreutils
              pkgs.gnused
            ]
          } > "$out"
        chmod 755 "$out"
      '';
in
{
  _file = ./post-build-hook.nix;

  options.services.hydra-cachix-bridge.postBuildHook.enable =
    lib.mkEnableOption "the bridge's sh post-build-hook in nix.settings";

  config = lib.mkIf (cfg.enable && cfg.postBuildHook.enable) {
    nix.settings.post-build-hook = "${hook}";
  };
}
