"""ugro's node exporter: GPU health through NVML, host health through psutil, on ``/metrics``.

It never imports torch, so it starts in well under a second on hosts without PyTorch.
"""
