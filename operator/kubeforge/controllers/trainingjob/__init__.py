"""TrainingJob: ``plan.py`` decides (pure), ``manifests.py`` builds the children (pure),
``handlers.py`` registers the kopf handlers and does the I/O (imported only by ``kubeforge.main``)."""
