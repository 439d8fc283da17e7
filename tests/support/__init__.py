"""What the tests share, whatever folder they are in.

The light helpers are importable from the package itself; the harness that starts servers and
trainers lives in its own modules, so a unit test that only scrapes imports none of it:

* ``exposition`` — scrape a /metrics endpoint, parse its samples
* ``waiting`` — poll until a condition holds
* ``net`` — a free loopback port, a JSON request
* ``servers`` — how Prometheus and Alertmanager are started: binary, image or skip
* ``receivers`` — local Slack webhook and SMTP recorders
* ``stack`` — ``AlertStack``: Prometheus and Alertmanager with the test overlay
* ``training`` — ``TrainingJob``: the reference trainer under torchrun, registered
* ``fake_gpu`` — a node exporter over the scripted NVML double
* ``models`` — small-model trainer settings
"""

from tests.support.exposition import Samples, sample, sample_values, scrape
from tests.support.waiting import wait_for

__all__ = ["Samples", "sample", "sample_values", "scrape", "wait_for"]
