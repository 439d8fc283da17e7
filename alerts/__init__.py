"""ugro's alert rules: thresholds in ``thresholds.yml``, rules generated into ``rules.yml``."""
