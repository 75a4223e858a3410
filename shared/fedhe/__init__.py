"""fedhe: privacy-preserving federated learning (DP-SGD at each site, CKKS-encrypted FedAvg).

This is the common package shared by the keyserver, the aggregator and the client agent.
"""

__version__ = "0.1.0"
