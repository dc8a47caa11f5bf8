"""CheckpointPolicy: ``plan.py`` decides (pure: storage checks, the inspector pass),
``manifests.py`` builds the store inspector pod (pure), ``handlers.py`` registers the kopf
handlers and does the I/O (imported only by ``kubeforge.main``)."""
