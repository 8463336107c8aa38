"""Calibration data: procedurally generated long-context tasks answered by the model itself."""
