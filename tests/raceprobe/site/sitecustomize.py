"""Install the race probe in a subprocess of a probed test run (see tests/raceprobe).

Only once the program imports prometheus_client itself: the hook's fast path must stay free
of it, probe or not.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "__init__.py")


def _install_probe():
    spec = importlib.util.spec_from_file_location("_hcb_race_probe", _PROBE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["_hcb_race_probe"] = module
    spec.loader.exec_module(module)
    module.install()


class _AfterPrometheusValues(importlib.abc.MetaPathFinder):
    """Installs the probe right after prometheus_client.values is first imported."""

    def find_spec(self, name, path=None, target=None):
        if name != "prometheus_client.values":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _install_probe()

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("HCB_RACE_PROBE"):
    sys.meta_path.insert(0, _AfterPrometheusValues())
