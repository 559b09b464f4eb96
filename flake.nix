{
  description = "hydra-cachix-bridge: push every Hydra build to Cachix or any Nix binary cache without slowing Hydra down";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: {
        default = pkgs.callPackage ./nixos/package.nix { };
        hydra-cachix-bridge = self.packages.${pkgs.system}.default;
      });

      nixosModules.default = ./nixos/module.nix;
      nixosModules.hydra-cachix-bridge = ./nixos/module.nix;

      checks = forAllSystems (pkgs: {
        vm-test = pkgs.testers.runNixOSTest (import ./nixos/tests/hydra-cachix-bridge.nix);
      });
    };
}
