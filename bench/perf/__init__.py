"""How fast lipia serves the checkout's hot paths, against a bare Starlette app on the same machine
in the same run.

``python -m bench.perf`` starts each server as its own process (one worker, the server options of
``lipia serve``), loads it with wrk (alternating the bare app and lipia, A B A B), and reports
ratios to the bare app rather than absolute figures: these machines are noisy, and a ratio from
one run is the figure that can be compared between runs. See BENCHMARKS.md for the figures and
what each optimisation gave.

* ``wrk.py``: runs wrk (installing Debian's package when it is missing) and reads its report.
* ``baseline.py``: the bare app, a constant JSON body at lipia's status path.
* ``servers.py``: the processes, and payments made through lipia's own API to load it with.
* ``scenarios.py``: one function per measurement.
* ``__main__.py``: the command line and the report.
"""
