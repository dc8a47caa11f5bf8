"""InferenceService: ``plan.py`` decides (pure: the model to serve, the status),
``manifests.py`` builds the Deployment, Service, PDB and HPA (pure), ``handlers.py`` registers
the kopf handlers and does the I/O (imported only by ``kubeforge.main``)."""
