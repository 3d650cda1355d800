"""The audit's report, which the audit writes and the model card shows, one module per reason to change:

- verdict.py: whether an audit can judge the protection, the line a merge is held under, what it did not measure;
- summary.py: what an attacker gets, one row per (method, attack), and the plain-words verdict;
- tables.py: audit.md's tables and `write_report` (audit.json, audit.md, audit.png);
- plot.py: audit.png.

Plain Python on the audit's results (matplotlib only for the plot), so the card and the demo read it without the
audit's engine. `trap2_hf.audit` exports `format_table` and `write_report`."""
