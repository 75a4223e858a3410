"""fedhe: privacy-preserving federated learning (DP-SGD at each site, FedAvg over homomorphically
encrypted updates: packed BFV by default, CKKS optional).

This is the common package shared by the keyserver, the aggregator and the client agent.
"""

from importlib.metadata import version

__version__ = version("fedhe")
"""The installed distribution's version: pyproject.toml's ``[project] version``, its one source."""
