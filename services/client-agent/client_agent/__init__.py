"""The fedhe client agent: trains with DP-SGD at a site, encrypts and uploads its update."""
