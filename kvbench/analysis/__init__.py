"""Reading results back and drawing them: rows, summaries with bootstrap CIs, tables, figures, paper figures.

``load`` reads rows and predictions and computes the summaries (one bootstrap), ``tables`` writes markdown/CSV
tables, ``figures`` draws the general figures, ``papers`` the figures and tables of one paper each, and ``cli``
is ``python -m kvbench.results`` / ``python -m kvbench.plots``. ``names`` (file and label names) is stdlib only,
so light modules such as ``kvbench.loggers`` import it without pandas or matplotlib; nothing here imports
matplotlib until a figure module is imported.
"""
