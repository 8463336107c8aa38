"""Search spaces shipped with the package: YAML files read with :mod:`importlib.resources`.

- ``elastic_rules.yaml``: the grid of elastic span rules ``(alpha, beta)`` the optimiser picks from.
"""
