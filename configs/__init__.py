"""Run configurations clbench ships: ``--config NAME`` finds ``NAME.yaml`` here (``clbench.config.shipped_configs``)."""
