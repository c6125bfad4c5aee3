"""Where TPU nodes come from: Cloud TPU (the v2 API) or a local simulated pod.

Providers create, describe and delete nodes. They never SSH: they hand out
workers' addresses, and the fan-out layer takes it from there.
"""
