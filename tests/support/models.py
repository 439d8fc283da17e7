"""Trainer settings the tests share."""

from __future__ import annotations

# The reference trainer's model at its smallest useful size: two ranks on two CPU cores take
# many steps a second, so the series a test waits for appear within its scrape interval.
SMALL_MODEL = ["--batch-size", "8", "--context", "32", "--width", "64", "--depth", "1"]
