"""ugro's monitoring catalogue: every signal's name, selector, threshold and PromQL, once.

* ``names``       scrape jobs and their selectors, the labels rules join on, throttle reasons;
* ``promql``      the few PromQL building blocks more than one rule needs;
* ``recording``   the measurement rules (no thresholds): prometheus/rules/recording.yml;
* ``goodput``     the categories a job's time is split into (which phases make each), for the
                  recording rules and ``ugro report``;
* ``conditions``  one rule per state the alerts fire on and the console shows, with its
                  threshold: a condition series exists exactly while its state holds, and its
                  value is the measurement the state is about.

Alerts are ``condition + for:``; the dashboards, ``ugro watch`` and ``ugro report`` read the
same recorded series, so no condition is written twice. ``python -m ugro.alerts build``
writes both rule files from here; ``check`` fails while either is stale.
"""
