"""``fedhe demo``: a whole federation (keyserver, aggregator, DP-SGD agents) on one machine.

A tool, not a service: it starts the three roles as separate processes and drives them over
REST, so it depends on every role and nothing depends on it.
"""
