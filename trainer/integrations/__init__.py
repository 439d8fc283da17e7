"""Per-rank ugro telemetry for training loops that a framework runs, one module per framework.

* ``ugro.trainer.integrations.hf`` — ``UgroCallback`` for the Hugging Face ``Trainer``
  (needs ``pip install 'ugro[hf]'``)
* ``ugro.trainer.integrations.lightning`` — ``UgroCallback`` for PyTorch Lightning's ``Trainer``
  (needs ``pip install 'ugro[lightning]'``)

This package imports nothing: importing ``ugro.trainer`` never loads a framework.
"""
