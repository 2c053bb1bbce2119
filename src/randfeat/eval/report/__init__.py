"""`randfeat report`: paper-style tables and robustness curves of result files.

- [randfeat.eval.report.summary][]: the table's figures, from the rows of a result file.
- [randfeat.eval.report.render][]: the table as Markdown and CSV.
- [randfeat.eval.report.plot][]: robust accuracy against queries (matplotlib).
- [randfeat.eval.report.files][]: the files `randfeat report` writes.
"""
