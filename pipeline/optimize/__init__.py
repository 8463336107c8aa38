"""stage=optimize: choose one elastic rule per head by 0/1 MILP, as a Pareto front over the profile lengths."""
