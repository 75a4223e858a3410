"""The fedhe keyserver: creates federations' CKKS contexts and releases them by role."""
