"""``invoke bench``: the project's own OpenAI-compatible streaming load generator and its reports.

measure.py is one `invoke bench`: client.py times one streamed request; workload.py says what is
sent; sweep.py runs a concurrency sweep with warm-up, repeats and a budget; stats.py aggregates;
environment.py records what was measured on; report.py writes the table, JSON, CSV, the charts
(drawn by measure/chart.py) and the compare gate; page.py the one-file report.html.
"""
