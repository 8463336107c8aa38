"""stage=rules: the elastic rule grid, the per-(head, rule, length) loss table and per-head span scaling."""
