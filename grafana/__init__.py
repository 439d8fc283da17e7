"""Grafana dashboards generated from Python with grafana-foundation-sdk.

``python -m ugro.grafana build|check`` writes or checks grafana/dashboards/*.json.
"""
