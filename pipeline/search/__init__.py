"""The adapter-composition search of stage=adapters: its space, its Optuna study, and the shared fit-and-score
harness of trials and baselines."""
