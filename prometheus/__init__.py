"""Prometheus's configuration and recording rules: data only, a package so that an installed
ugro finds them (``importlib.resources.files("ugro.prometheus")``) as the checkout does."""
