"""The fedhe aggregator: sites, jobs and rounds; sums encrypted updates without any secret key."""
