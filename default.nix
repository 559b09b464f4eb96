# Non-flake entry point:
#   nix-build -A package            # the package
#   imports = [ (import ./. { }).module ];   # the NixOS module
#   nix-build -A vmTest             # the NixOS VM test (needs KVM)
{
  pkgs ? import <nixpkgs> { },
}:
{
  package = pkgs.callPackage ./nixos/package.nix { };
  module = ./nixos/module.nix;
  vmTest = pkgs.testers.runNixOSTest (import ./nixos/tests/hydra-cachix-bridge.nix);
}
