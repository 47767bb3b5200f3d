"""Side-by-side benchmark of funnel-kpi against a raw consumer and a naive Faust agent (issue 8).

Run with ``python -m bench.run`` (``make bench``); see ``bench/README.md``.
"""
