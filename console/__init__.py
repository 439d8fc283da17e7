"""The terminal side of ugro: ``ugro watch`` (a live view of a job) and ``ugro report`` /
``ugro compare`` (a job's figures over its lifetime), all read from Prometheus's recording rules
and Alertmanager's API, like the Grafana dashboard."""
